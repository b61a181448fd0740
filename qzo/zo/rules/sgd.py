"""SGD: the state-free rule, one fused restore-and-update pass per tensor."""

from __future__ import annotations

from ...noise.passes import combine, perturb_params_
from ..params import ParamSet
from ..types import Estimate
from .base import Rule

__all__ = ["SGD"]


class SGD(Rule):
    """theta <- (1 - lr * weight_decay) * theta - lr * grad * d, fused with the restore.

    The undo terms and the update terms are merged per seed, so restoring costs nothing
    extra: SPSA's whole step is three passes (+eps, -2 eps, restore+update).

    Args:
        lr: learning rate.
        weight_decay: decoupled weight decay; 0 disables it.
    """

    name = "sgd"

    def update_terms(self, est: Estimate, lr: float) -> tuple[float, list[int], list[float], float]:
        """``(scale, seeds, coefs, mu_coef)`` of the one pass taking theta + applied to theta'."""
        scale = 1.0 - lr * self.weight_decay
        undo = [(s, -scale * c) for s, c in est.applied]
        step = [(s, -lr * est.grad * c) for s, c in est.direction]
        seeds, coefs = combine(undo, step)
        mu_coef = -scale * est.applied_mu - lr * est.grad * est.direction_mu
        return scale, seeds, coefs, mu_coef

    def apply(self, params: ParamSet, est: Estimate, lr: float) -> None:
        scale, seeds, coefs, mu_coef = self.update_terms(est, lr)
        perturb_params_(params, seeds, coefs, mean=est.mu, mu_coef=mu_coef, scale=scale)
