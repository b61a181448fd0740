"""Update rules: turn a strategy's :class:`~qzo.strategies.Estimate` into a parameter change.

A rule receives the trainables at ``theta + applied`` (the strategy's leftover
perturbation) and must leave them at the updated ``theta'``. For state-free rules this is
one fused pass per tensor (``qzo.perturb.perturb_``): the undo terms and the update terms
are merged per seed, so restoring costs nothing extra. Rules with dense state (momentum,
Adam) come with the steering issue and follow the same interface.
"""

from __future__ import annotations

from .params import ParamSet
from .perturb import combine, perturb_
from .strategies import Component, Estimate

__all__ = ["Rule", "SGD"]


class Rule(Component):
    """Base class: ``apply`` moves the trainables from ``theta + applied`` to ``theta'``."""

    def __init__(self, lr: float):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)

    def apply(self, params: ParamSet, est: Estimate, lr: float) -> None:
        raise NotImplementedError


class SGD(Rule):
    """theta <- (1 - lr * weight_decay) * theta - lr * grad * d, fused with the restore.

    Args:
        lr: learning rate.
        weight_decay: decoupled weight decay (AdamW-style: applied to theta, not to the
            estimate); 0 disables it.
    """

    def __init__(self, lr: float, weight_decay: float = 0.0):
        super().__init__(lr)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)

    def update_terms(self, est: Estimate, lr: float) -> tuple[float, list[int], list[float]]:
        """The single pass ``x = scale * x + sum coef * z`` that takes theta + applied to theta'."""
        scale = 1.0 - lr * self.weight_decay
        undo = [(s, -scale * c) for s, c in est.applied]
        step = [(s, -lr * est.grad * c) for s, c in est.direction]
        seeds, coefs = combine(undo, step)
        return scale, seeds, coefs

    def apply(self, params: ParamSet, est: Estimate, lr: float) -> None:
        scale, seeds, coefs = self.update_terms(est, lr)
        for t in params:
            perturb_(t.tensor, t.stream, seeds, coefs, scale=scale)
