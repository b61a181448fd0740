"""``optim.lr: auto``: an lr range test for zeroth-order steps, run once at the start of a run.

The most common complaint about MeZO is a run that does not move, or blows up, until its lr
is found by hand; working lrs reported for it span 1e-6 to 4e-2, and on qzo's demo task the
best lr of LoRA's B factors (8e-3) is 27x that of the norm gains (3e-4). The test: from
``lr_min``, one ZO step at a time on one fixed batch, the lr grows by ``growth`` each step
until the batch's loss rises past ``blowup`` x where it started (or is not finite). That lr
is where steps stop descending and start to throw the trainables around; the run's lr is
it divided by ``backoff``, since a long run blows up at a lower lr than a few steps show
(measured in ``benchmarks/auto_lr.py``, which also checks the result against swept lrs).

It costs the test's forwards (``forwards``, counted in the run's budget: the optimizer that
trains starts its count there) and leaves the trainables exactly as they were. Everything in
it is a pure function of the seeds, so the same run finds the same lr; a resumed run reads
it back from the run folder instead of testing again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import NonFiniteLossError, QzoError
from .params import ParamSet

__all__ = ["LrSearch", "find_lr"]


@dataclass
class LrSearch:
    """What the range test tried and chose (written to the run folder as ``auto_lr.json``)."""

    lr: float  # the chosen lr
    blowup_lr: float | None  # the first lr whose step sent the loss past the limit (None: none did)
    lrs: list[float] = field(default_factory=list)  # the lr of each step of the test
    losses: list[float] = field(default_factory=list)  # the loss each step reported (inf: not finite)
    forwards: int = 0  # loss evaluations the test ran

    def to_json(self) -> dict:
        """JSON has no inf: a loss that was not finite is written as null."""
        return {**asdict(self), "losses": [v if math.isfinite(v) else None for v in self.losses]}

    @classmethod
    def from_json(cls, data: dict) -> "LrSearch":
        losses = [math.inf if v is None else float(v) for v in data.get("losses", [])]
        return cls(float(data["lr"]), data.get("blowup_lr"), list(data.get("lrs", [])), losses,
                   int(data.get("forwards", 0)))


def find_lr(params: ParamSet, make_opt: Callable[[float], object], closure: Callable[[], object],
            lr_min: float = 1e-6, growth: float = 2.0, max_steps: int = 30, blowup: float = 1.25,
            backoff: float = 64.0) -> LrSearch:
    """The lr of a run: ``blowup_lr / backoff`` from a range test on ``closure`` (one fixed batch).

    Args:
        params: the trainables (restored to their values when the test ends).
        make_opt: ``lr -> qzo.ZO`` with the run's strategy and rule and a constant schedule.
        closure: the loss of one fixed batch (the same batch every step: only the trainables move).
        lr_min, growth, max_steps: the lrs tried, ``lr_min * growth ** i``.
        blowup: the test stops at the first step whose loss exceeds this times the first step's.
        backoff: the chosen lr is the blow-up lr divided by this.
    """
    if not (lr_min > 0 and growth > 1 and max_steps >= 2 and blowup > 1 and backoff >= 1):
        raise QzoError(f"find_lr needs lr_min > 0, growth > 1, max_steps >= 2, blowup > 1 and backoff >= 1; got "
                       f"{lr_min}, {growth}, {max_steps}, {blowup}, {backoff}")
    start = {k: v.clone() for k, v in params.state_dict().items()}
    opt = make_opt(lr_min)
    search = LrSearch(lr=math.nan, blowup_lr=None)
    try:
        for i in range(max_steps):
            lr = lr_min * growth ** i
            opt.rule.lr = lr
            try:
                loss = float(opt.step(closure))
            except NonFiniteLossError:  # the step restored the trainables; this lr is past any use
                loss = math.inf
            search.lrs.append(lr)
            search.losses.append(loss)
            if not math.isfinite(loss) or loss > blowup * search.losses[0]:
                search.blowup_lr = lr
                break
    finally:
        search.forwards = int(opt.forwards)
        params.load_state_dict(start)
    top = search.blowup_lr if search.blowup_lr is not None else search.lrs[-1] * growth
    search.lr = top / backoff
    return search
