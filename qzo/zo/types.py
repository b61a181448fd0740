"""The vocabulary of a ZO step, shared by strategies, rules, the probe and the optimizer.

    Probe        what a strategy may do during a step (move the trainables, evaluate)
    Estimate     what a strategy decided (direction, projected gradient) plus what the step did
    StepRecord   one line of the step log: enough to replay the step exactly
    Component    what strategies and rules share: a registered name, checkpointable state

The step goes one way, ``ZO.step -> strategy.estimate(probe) -> probe -> noise passes ->
kernel``; what flows back up is data (losses, an :class:`Estimate`), never a call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

__all__ = ["Probe", "Estimate", "StepRecord", "Component"]


class Probe(Protocol):
    """What a strategy may do during a step (implemented by :class:`qzo.zo.probe.StepProbe`).

    Targets are absolute (relative to theta, the values before the step): :meth:`move_to`
    reaches one from whatever is applied now, so a strategy never has to know what the
    previous evaluation left on the trainables (a batched pool leaves nothing, a one-by-one
    pool its last candidate).
    """

    eps: float
    #: the closure evaluates a pool in one stacked forward (``qzo.ZO(batched=True)``): see :meth:`evaluate_pool`
    batched: bool

    def move_to(self, terms: list[tuple[int, float]], mu_coef: float = 0.0) -> None:
        """Put the trainables at ``theta + sum coef * z(seed) + mu_coef * mu`` (one pass)."""

    def evaluate(self) -> float:
        """Run the closure once at the current (perturbed) values; returns a finite float."""

    def evaluate_group(self, targets: list[tuple[list[tuple[int, float]], float] | None]) -> list[float]:
        """The loss at each target (``None``: here), in order; the last stays applied.

        Evaluations that do not depend on each other belong in one group: a distributed
        optimizer runs a group's forwards on different ranks (``qzo.distributed``).
        """

    def evaluate_pool(self, targets: list[tuple[list[tuple[int, float]], float] | None]) -> list[float]:
        """A group of independent targets the way the probe evaluates pools: one stacked forward when it is
        :attr:`batched` (leading ``None`` targets, "here", run first on their own; nothing stays applied),
        else :meth:`evaluate_group` (the last target stays applied). Continue with :meth:`move_to` either way."""

    def rows(self) -> int:
        """Rows of the closure's batch (per-example strategies; needs ``qzo.CausalLMLoss`` and LoRA)."""

    def evaluate_rows(self, candidates: list[tuple[list[tuple[int, float]], float]]) -> tuple[list[float], list[float]]:
        """Row i's loss at target i, all rows in one forward: ``(losses, token weights)``; nothing moves."""

    def evaluate_batch(self, candidates: list[tuple[list[tuple[int, float]], float]]) -> list[float]:
        """The loss at each ``(terms, mu_coef)`` target, all in one stacked forward; the trainables stay put.

        Needs a closure that can batch (``qzo.CausalLMLoss``) and LoRA trainables; see ``qzo.targets.candidates``.
        """


@dataclass
class Estimate:
    """The result of a strategy's step, before the update.

    A strategy fills in what it *decided*: ``direction``, ``grad``, ``loss`` (and
    ``direction_mu`` / ``spread`` where it has them). What the step *did* is the probe's
    record, and ``qzo.ZO`` completes the estimate from it: ``applied`` / ``applied_mu``
    (what is still on the trainables), ``losses`` (every evaluation, in order), ``seeds``
    (every seed drawn) and ``mu`` (the strategy's :attr:`Strategy.mean`). A strategy that
    states one of those anyway is checked against the probe's record.

    Attributes:
        direction: ``(seed, coef)`` terms of the update direction d = sum coef * z(seed).
        grad: projected gradient along d; the plain SGD update is ``theta -= lr * grad * d``.
        applied: ``(seed, coef)`` terms of the perturbation still on the trainables
            (x = theta + sum coef * z); the rule undoes it in the same pass as the update.
        losses: every loss evaluated this step, in evaluation order (PerExample: per row).
        loss: the step's reported training loss.
        seeds: every seed drawn this step (for the step log and replay).
        direction_mu: coefficient of the strategy's dense mean (LDSD's mu) in d.
        applied_mu: coefficient of that mean in the leftover perturbation.
        mu: the strategy's mean, name -> tensor (``None``: no mean); data, not a callback.
        spread: the losses whose standard deviation ``qzo.ZO(normalize="spread")`` divides
            by (``None``: all of ``losses``; FZOO leaves its baseline out).
    """

    direction: list[tuple[int, float]]
    grad: float
    applied: list[tuple[int, float]] | None = None
    losses: list[float] | None = None
    loss: float = float("nan")
    seeds: list[int] = field(default_factory=list)
    direction_mu: float = 0.0
    applied_mu: float = 0.0
    mu: dict | None = None
    spread: list[float] | None = None


@dataclass
class StepRecord:
    """What one step did: enough to replay it exactly (one line of the step log)."""

    step: int
    seeds: list[int]
    direction: list[tuple[int, float]]
    grad: float
    losses: list[float]
    loss: float
    lr: float
    forwards: int
    direction_mu: float = 0.0  # coefficient of the strategy's mean in the direction (LDSD)

    def to_json(self) -> dict:
        d = asdict(self)
        d["direction"] = [[int(s), float(c)] for s, c in self.direction]
        return d


class Component:
    """What strategies and rules share: a registered name, checkpointable state and a readable repr.

    A concrete class sets :attr:`name` and is registered under it in its family's
    :attr:`registry` (``Strategy.registry``, ``Rule.registry``) when it is defined: there is no
    table to keep in step. Its constructor is its schema: a config's ``optim.strategy:
    {name: gv, pool: 4}`` is ``GV(pool=4)`` (``qzo.config.schema.component`` builds it and
    reports what the constructor refuses under the config key that fed it).
    """

    #: the name configs, the CLI and the planner use (``optim.strategy.name``); ``None`` on the bases
    name: str | None = None
    #: name -> class, one per family; set on the family's base class
    registry: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            family = next(base for base in cls.__mro__ if "registry" in base.__dict__ and base is not Component)
            family.registry[cls.name] = cls

    def state_dict(self) -> dict:
        """State for checkpoints (tensors allowed); stateless components return ``{}``."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_brief(v)}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _brief(value) -> str:
    """``repr`` for settings; state tensors (Adam moments, LDSD's mean) as a count, not their values."""
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)}>"
    n = _count_tensors(value)
    return f"<{n} tensors>" if n else repr(value)


def _count_tensors(value) -> int:
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, dict):
        return sum(_count_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_tensors(v) for v in value)
    return 0
