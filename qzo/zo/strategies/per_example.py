"""Per-example directions: every row of the batch gets its own perturbation inside one forward.

The idea of GRZO (arXiv 2606.02857, github LiyanTan111/GRZO-public): a two-point probe per
*example* instead of per batch. With B rows and seeds s_1..s_B, two forwards give

    l_i^+ = loss of row i at theta + eps z_i,     l_i^- = loss of row i at theta - eps z_i
    g_i = (l_i^+ - l_i^-) / (2 eps)               (row i's slope along its own z_i)
    g_hat = sum_i w_i g_i z_i                     (w_i: row i's share of the labelled tokens)

g_hat estimates the gradient of the batch's token-mean loss (each g_i z_i is an unbiased
estimate of row i's), with B directions for the two forwards MeZO spends on one. On LoRA the
rows' perturbations live inside the adapter matmuls (``qzo.targets.candidates``, one candidate per row),
so a step costs about two ordinary forwards.

How this differs from GRZO's code: GRZO shares one noise tensor per factor and gives each
row random sign vectors on both sides of it (Flipout), which is cheap on a GPU and
approximate (first-order in the perturbation); here each row has its own seed-replayed
Gaussian z_i, exactly the noise the in-place path would add, so the estimate equals the one
computed row by row (tested). GRZO divides by the standard deviation of the rows'
half-differences; that is ``qzo.ZO(normalize="spread")`` here (the spread is taken over
(l_i^+ - l_i^-) / 2), which composes with any rule.

``grad`` is the RMS of the g_i and the direction's coefficients are w_i g_i / grad, so
``grad * d`` is g_hat.
"""

from __future__ import annotations

import math
from typing import Callable

from ..types import Estimate, Probe
from .base import Strategy, weighted_slopes

__all__ = ["PerExample"]


class PerExample(Strategy):
    """A two-point probe per row of the batch, all rows in one forward each way (GRZO's idea).

    Cost: 2 forwards a step (``opt.forwards`` counts each as one evaluation of the batch);
    needs LoRA trainables and a ``qzo.CausalLMLoss`` closure. The seeds of a step are one
    per row, so a step log records B seeds.
    """

    name = "per_example"

    forwards_per_step = 2

    def estimate(self, probe: Probe, draw_seeds: Callable[[int], list[int]]) -> Estimate:
        eps = probe.eps
        seeds = draw_seeds(probe.rows())
        plus, weights = probe.evaluate_rows([([(s, eps)], 0.0) for s in seeds])
        minus, _ = probe.evaluate_rows([([(s, -eps)], 0.0) for s in seeds])
        slopes = [(fp - fm) / (2.0 * eps) for fp, fm in zip(plus, minus)]
        direction, grad = weighted_slopes(seeds, slopes, weights, len(slopes))
        loss = math.fsum(w * 0.5 * (fp + fm) for w, fp, fm in zip(weights, plus, minus))
        # the step log keeps every row's loss (the probe records the two batch losses)
        return Estimate(direction=direction, grad=grad, losses=plus + minus, loss=loss,
                        spread=[0.5 * (fp - fm) for fp, fm in zip(plus, minus)])
