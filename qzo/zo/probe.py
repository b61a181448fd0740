"""The probe: a strategy's handle on the trainables and the closure during one step, and the record of what it did.

A strategy moves the trainables (:meth:`StepProbe.move_to`: one in-place noise pass from
wherever they are) and evaluates the loss there, one target, a group (which ranks of a
``torch.distributed`` run may split) or a stacked pool (one forward). The probe keeps every
loss and the perturbation left applied, which ``qzo.ZO`` reads back when the strategy
returns; it knows the optimizer's settings only through what it is built with.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import NonFiniteLossError, QzoError
from ..noise.passes import Candidate, perturb_params_
from .distributed import Distributed
from .params import ParamSet

__all__ = ["StepProbe"]


class StepProbe:
    """The strategy's handle on the trainables and the closure for one step, and the record of what it did.

    The probe owns everything the step did: ``applied`` / ``applied_mu`` (the perturbation
    on the trainables now, x = theta + sum coef * z(seed) + applied_mu * mu), ``losses``
    (every evaluation, in order), ``forwards`` / ``forward_calls`` (added to the optimizer's
    counters when the step ends, also when it fails). Strategies move with :meth:`move_to`
    (an absolute target, reached from whatever is applied in one pass), so the same code
    works whether a pool was evaluated one by one (the last candidate left applied) or
    batched (nothing applied); whether it is batched is the probe's :attr:`batched`.
    """

    def __init__(self, closure: Callable[[], object], params: ParamSet, eps: float, step: int,
                 distributed: Distributed | None = None, mean: dict | None = None, batched: bool = False):
        self._closure = closure
        self.params = params  # this step's trainables, with their noise scales
        self.eps = eps
        self.step = step  # 1-based, for error messages
        self.distributed = distributed
        self.mean = mean  # the strategy's dense mean (name -> tensor), handed down as data
        self.batched = batched
        self.applied: dict[int, float] = {}
        self.applied_mu = 0.0
        self.losses: list[float] = []
        self.forwards = 0  # loss evaluations (a batched pool of K counts K)
        self.forward_calls = 0  # model forwards that ran
        self._total_rows: int | None = None

    def _delta(self, terms: list[tuple[int, float]], mu_coef: float) -> tuple[list[tuple[int, float]], float, dict]:
        """(terms, mu coefficient) that lead from the applied perturbation to the target; and the target."""
        target: dict[int, float] = {}
        for s, c in terms:
            target[int(s)] = target.get(int(s), 0.0) + float(c)
        # applied seeds first, then new ones: a fixed order, so the float summation is replayable
        order = list(self.applied) + [s for s in target if s not in self.applied]
        delta = [(s, target.get(s, 0.0) - self.applied.get(s, 0.0)) for s in order]
        return [(s, c) for s, c in delta if c != 0.0], float(mu_coef) - self.applied_mu, target

    def move_to(self, terms: list[tuple[int, float]], mu_coef: float = 0.0) -> None:
        """Put the trainables at ``theta + sum coef * z(seed) + mu_coef * mu``, in one pass from where they are."""
        delta, mu_delta, target = self._delta(terms, mu_coef)
        if delta or mu_delta:
            perturb_params_(self.params, [s for s, _ in delta], [c for _, c in delta], mean=self.mean,
                            mu_coef=mu_delta)
        # book-keep the target itself, not a float sum that may be off by an ulp
        self.applied = {s: c for s, c in target.items() if c != 0.0}
        self.applied_mu = float(mu_coef)

    def _check_finite(self, loss: float, index: int) -> None:
        if not math.isfinite(loss):
            self.restore()
            step = self.step
            raise NonFiniteLossError(
                f"loss is {loss} at step {step} (evaluation {index} of the step); the "
                "trainables were restored to their values before the step. Lower optim.lr or optim.eps, "
                "or check the data for empty targets.",
                step=step,
            )

    def evaluate(self) -> float:
        """The loss where the trainables are now (a group of one evaluation)."""
        return self.evaluate_group([None])[0]

    def _run_closure(self) -> tuple[float, int | None]:
        with torch.no_grad():
            value = self._closure()
        self.forward_calls += 1
        loss = float(value.detach().float().item() if isinstance(value, torch.Tensor) else value)
        return loss, getattr(self._closure, "tokens", None)

    def _record(self, losses: list[float]) -> list[float]:
        for loss in losses:
            self.losses.append(loss)
            self._check_finite(loss, len(self.losses))
        return losses

    def evaluate_group(self, targets: list[tuple[list[tuple[int, float]], float] | None]) -> list[float]:
        """The loss at each ``(terms, mu_coef)`` target (``None``: where the trainables are), in order.

        The evaluations of a group do not depend on each other, which is what lets a
        distributed optimizer (``qzo.distributed``) run them on different ranks: every rank
        makes the same perturbation passes (so all hold bit-identical trainables) and runs
        only the forwards of its slot. The last target stays applied.
        """
        dist = self.distributed
        values = []
        for i, target in enumerate(targets):
            if target is not None:
                self.move_to(*target)
            values.append(self._run_closure() if dist is None or dist.owns(i) else None)
        self.forwards += len(targets)
        losses = [v[0] for v in values] if dist is None else dist.reduce_losses(values)
        return self._record(losses)

    def evaluate_pool(self, targets: list[tuple[list[tuple[int, float]], float] | None]) -> list[float]:
        """Independent targets evaluated as a pool: one stacked forward when :attr:`batched`, else a group.

        Batched, leading ``None`` targets ("here": theta, since a pool starts a step) run first on
        their own and nothing stays applied; one by one the last target stays applied.
        """
        if not self.batched:
            return self.evaluate_group(targets)
        here = 0
        while here < len(targets) and targets[here] is None:
            here += 1
        if any(t is None for t in targets[here:]):
            raise ValueError("a batched pool takes 'here' (None) targets only before the others")
        return (self.evaluate_group([None] * here) if here else []) + self.evaluate_batch(targets[here:])

    def evaluate_batch(self, candidates: list[tuple[list[tuple[int, float]], float]]) -> list[float]:
        """The loss at each ``(terms, mu_coef)`` target in one stacked forward; the trainables do not move.

        Counts ``len(candidates)`` evaluations in ``opt.forwards`` (they are that many loss
        evaluations) and one in ``opt.forward_calls`` (one forward ran). Needs a closure with
        ``evaluate_candidates`` (:class:`qzo.CausalLMLoss`).
        """
        evaluate = getattr(self._closure, "evaluate_candidates", None)
        if evaluate is None:
            raise QzoError(
                f"the strategy was built with batched=True, but the closure given to opt.step "
                f"({type(self._closure).__name__}) cannot evaluate a pool in one forward. Pass "
                "qzo.CausalLMLoss(model, batch) instead of a lambda, or build the strategy with batched=False.")
        relative = []
        for terms, mu_coef in candidates:
            delta, mu_delta, _ = self._delta(terms, mu_coef)
            relative.append(Candidate(tuple(delta), mu_delta))
        dist = self.distributed
        mine = [i for i in range(len(relative)) if dist is None or dist.owns(i)]
        values = []
        if mine:
            with torch.no_grad():
                values = evaluate(self.params, [relative[i] for i in mine], mean=self.mean)
            self.forward_calls += 1
        self.forwards += len(relative)
        losses = [float(v) for v in torch.as_tensor(values).detach().float().cpu().tolist()]
        if len(losses) != len(mine):
            raise ValueError(f"evaluate_candidates returned {len(losses)} losses for {len(mine)} candidates")
        if dist is not None:
            ran = dict(zip(mine, losses))
            tokens = getattr(self._closure, "tokens", None)
            losses = dist.reduce_losses([(ran[i], tokens) if i in ran else None for i in range(len(relative))],
                                        "pool losses")
        return self._record(losses)

    def rows(self) -> int:
        """How many rows the closure's batch has (what :meth:`evaluate_rows` perturbs one by one)."""
        rows = getattr(self._closure, "rows", None)
        if rows is None or not hasattr(self._closure, "evaluate_rows"):
            raise QzoError(
                f"a per-example strategy perturbs each row of the batch inside one forward, but the closure given to "
                f"opt.step ({type(self._closure).__name__}) cannot. Pass qzo.CausalLMLoss(model, batch) instead of a "
                "lambda (LoRA trainables), or use another strategy.")
        dist = self.distributed
        if dist is None:
            return int(rows)
        if self._total_rows is None:  # the whole batch: every data shard's rows (the closure holds this rank's)
            self._total_rows = dist.total_rows(int(rows) if dist.owns(0) else None)
        return self._total_rows

    def evaluate_rows(self, candidates: list[tuple[list[tuple[int, float]], float]]) -> tuple[list[float], list[float]]:
        """Row i's loss at target i (absolute, as :meth:`move_to` takes), all rows in one forward; nothing moves.

        Returns ``(losses, weights)``: each row's token-mean loss and its share of the batch's
        labelled tokens. Counts one evaluation in ``opt.forwards`` (one batch loss, a
        perturbation per row) and one forward call.
        """
        total_rows = self.rows()
        relative = []
        for terms, mu_coef in candidates:
            delta, mu_delta, _ = self._delta(terms, mu_coef)
            relative.append(Candidate(tuple(delta), mu_delta))
        dist = self.distributed
        mine = slice(0, total_rows) if dist is None else dist.rows(total_rows) if dist.owns(0) else None
        losses, counts = [], []
        if mine is not None:
            with torch.no_grad():
                out, cnt = self._closure.evaluate_rows(self.params, relative[mine],
                                                       mean=self.mean)
            self.forward_calls += 1
            losses = [float(v) for v in out.detach().float().cpu().tolist()]
            counts = [float(c) for c in cnt.detach().float().cpu().tolist()]
        if dist is not None:  # one group: the shards of slot 0 run it, every rank gets every row
            losses, counts = dist.gather_rows(total_rows, mine, losses, counts)
        self.forwards += 1
        total = sum(counts)
        if not total:
            raise QzoError("no row of the batch has a labelled token: there is no loss to estimate")
        batch_loss = math.fsum(f * c for f, c in zip(losses, counts)) / total
        self.losses.append(batch_loss)
        self._check_finite(batch_loss, len(self.losses))
        return losses, [c / total for c in counts]

    def restore(self) -> None:
        """Undo every perturbation applied during this step."""
        self.move_to([])
