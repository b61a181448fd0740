"""FZOO: N one-sided probes whose own losses weight their directions, against one shared baseline.

"FZOO: Fast Zeroth-Order Optimizer" (ICLR 2026, github DKmiyan/FZOO). Per step, N probes
f_i = f(theta + eps z_i) and a baseline b give the directional derivatives
g_i = (f_i - b) / eps, and the estimate is

    g_hat = sum_i g_i z_i / M,        M = N      when b = f(theta)      (baseline "theta")
                                      M = N - 1  when b = mean_j f_j    (baseline "mean")

Both are unbiased estimates of the smoothed gradient: E[g_i z_i] = grad f for b = f(theta);
centring on the probes' own mean removes 1/N of each probe's signal, which N - 1 restores,
and saves the forward at theta. Every evaluation enters the estimate, so the estimate's
variance falls as 1/N at N (+1) forwards: that is where pool strategies that only *rank*
their pool (GV, Greedy) lose per forward.

GV is the sign-only relative of this: its guiding vector weights the pool by
+-1/|group| by which side of the split a loss falls, i.e. the signs of the centred ranks,
and then spends two more forwards on a probe along it. FZOO keeps the magnitudes and
needs no extra probe.

FZOO's paper also divides the step by the standard deviation of the step's losses; in qzo
that is the optimizer's ``normalize="spread"`` option (``qzo.ZO``), which composes with
every strategy, so it is not baked in here.

How the estimate is expressed: ``grad`` is the RMS of the g_i over M (a magnitude, what
clipping and normalization act on) and the direction's coefficients are g_i / (M grad),
so ``grad * d`` is exactly g_hat.
"""

from __future__ import annotations

import math
from typing import Callable

from ..types import Estimate, Probe
from .base import Strategy, weighted_slopes

__all__ = ["FZOO", "BASELINES"]

BASELINES = ("theta", "mean")


class FZOO(Strategy):
    """N one-sided probes, each weighted by its loss against a shared baseline (FZOO).

    Cost: ``probes + 1`` forwards a step with ``baseline="theta"``, ``probes`` with
    ``baseline="mean"``. The reported loss is the baseline f(theta) (or the probes' mean).

    Args:
        probes: N, the one-sided probes per step (FZOO uses 8; at least 2 for ``"mean"``).
        baseline: ``"theta"`` (evaluate f(theta), FZOO's choice) or ``"mean"`` (the probes'
            mean, one forward fewer).
        batched: evaluate the probes in one stacked forward (LoRA trainables and a
            ``qzo.CausalLMLoss`` closure); ``opt.forwards`` still counts every evaluation.
    """

    name = "fzoo"
    pool_arg = "probes"

    def __init__(self, probes: int = 4, baseline: str = "theta", batched: bool = False):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        least = 2 if baseline == "mean" else 1
        if int(probes) < least:
            raise ValueError(f"FZOO with baseline {baseline!r} needs probes >= {least}, got {probes}")
        self.probes, self.baseline = int(probes), baseline
        self.batched = bool(batched)
        self.forwards_per_step = self.probes + (1 if baseline == "theta" else 0)

    def estimate(self, probe: Probe, draw_seeds: Callable[[int], list[int]]) -> Estimate:
        eps = probe.eps
        seeds = draw_seeds(self.probes)
        targets = [([(seed, eps)], 0.0) for seed in seeds]
        # f(theta) and the probes in one group (a distributed run spreads it over ranks; a batched probe
        # evaluates f(theta) first, on its own, then the probes in one stacked forward)
        losses = probe.evaluate_pool(([None] if self.baseline == "theta" else []) + targets)
        probe_losses = losses[1:] if self.baseline == "theta" else losses
        if self.baseline == "theta":
            base, m = losses[0], self.probes
        else:
            base, m = math.fsum(probe_losses) / self.probes, self.probes - 1
        slopes = [(f - base) / eps for f in probe_losses]
        direction, grad = weighted_slopes(seeds, slopes, [1.0 / m] * len(slopes), m)
        # one by one, the last probe is still on the trainables (the probe knows; the rule undoes it in its pass)
        return Estimate(direction=direction, grad=grad, loss=base, spread=probe_losses)
