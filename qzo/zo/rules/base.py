"""The rule interface: turn a strategy's estimate into a parameter change, fused with the restore.

A rule receives the trainables at ``theta + applied`` (the strategy's leftover
perturbation) and must leave them at the updated ``theta'``. The projected gradient of a
step is the dense vector ``grad * d`` with ``d`` the estimate's direction (seeds and
coefficients, plus the strategy's mean for LDSD); it is regenerated chunk by chunk and
never held whole.
"""

from __future__ import annotations

from ..params import ParamSet
from ..types import Component, Estimate

__all__ = ["Rule"]


class Rule(Component):
    """Base class: ``apply`` moves the trainables from ``theta + applied`` to ``theta'``.

    Args:
        lr: base learning rate (a schedule in ``qzo.ZO`` scales it per step).
        weight_decay: decoupled weight decay (applied to theta, not to the estimate).
    """

    registry: dict[str, type] = {}

    def __init__(self, lr: float, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)

    def bind(self, params: ParamSet) -> None:
        """Called once by ``qzo.ZO`` with the trainables (to size dense state)."""

    def apply(self, params: ParamSet, est: Estimate, lr: float) -> None:
        raise NotImplementedError
