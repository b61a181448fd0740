"""SPSA: MeZO's two-point estimate along one Gaussian direction."""

from __future__ import annotations

from typing import Callable

from ..types import Estimate, Probe
from .base import Strategy

__all__ = ["SPSA"]


class SPSA(Strategy):
    """MeZO's two-point estimate along one Gaussian direction (Malladi et al., 2023).

    Per step: draw seed s, evaluate f(theta + eps z) and f(theta - eps z), and estimate
    g = (f+ - f-) / (2 eps) along d = z. Costs 2 forwards a step. The reported loss is
    (f+ + f-) / 2, as MeZO logs it. The trainables are left at theta - eps z; the rule's
    fused pass restores and updates at once.
    """

    name = "spsa"

    forwards_per_step = 2

    def estimate(self, probe: Probe, draw_seeds: Callable[[int], list[int]]) -> Estimate:
        (seed,) = draw_seeds(1)
        eps = probe.eps
        # one group: +eps z then -2 eps z from there (two ranks can run one side each)
        f_plus, f_minus = probe.evaluate_group([([(seed, eps)], 0.0), ([(seed, -eps)], 0.0)])
        grad = (f_plus - f_minus) / (2.0 * eps)
        return Estimate(direction=[(seed, 1.0)], grad=grad, loss=0.5 * (f_plus + f_minus))
