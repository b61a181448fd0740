"""Learning-rate schedules: a factor per step that multiplies the rule's base lr."""

from __future__ import annotations

import math

__all__ = ["Schedule", "SCHEDULES"]

SCHEDULES = ("constant", "linear", "cosine")


class Schedule:
    """lr(step) = base_lr * factor(step), with 1-based steps.

    ``warmup_steps`` ramps linearly from ``1/warmup_steps`` to 1; then ``constant`` stays at
    1, ``linear`` and ``cosine`` decay to ``min_ratio`` at ``total_steps``.

    Args:
        kind: ``constant``, ``linear`` or ``cosine``.
        total_steps: the run's length (needed by the decaying schedules).
        warmup_steps: linear warm-up length; 0 for none.
        min_ratio: final factor of the decaying schedules.
    """

    def __init__(self, kind: str = "constant", total_steps: int | None = None, warmup_steps: int = 0,
                 min_ratio: float = 0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
        if kind != "constant" and not total_steps:
            raise ValueError(f"the {kind} schedule needs total_steps")
        if warmup_steps < 0 or not 0 <= min_ratio <= 1:
            raise ValueError(f"need warmup_steps >= 0 and min_ratio in [0, 1], got {warmup_steps}, {min_ratio}")
        self.kind, self.total_steps, self.warmup_steps, self.min_ratio = kind, total_steps, warmup_steps, min_ratio

    def factor(self, step: int) -> float:
        if self.warmup_steps and step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape

    def __repr__(self) -> str:
        return (f"Schedule({self.kind!r}, total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"min_ratio={self.min_ratio})")
