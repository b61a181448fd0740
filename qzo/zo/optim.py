"""``qzo.ZO``: the zeroth-order optimizer loop that strategies and rules plug into.

One ``step(closure)``: the strategy perturbs and evaluates through a probe (every
perturbation is seed-replayed in place, nothing the size of the trainables is stored), the
rule applies the update fused with the restore, and a :class:`StepRecord` (seeds,
coefficients, losses, lr) is kept as ``last_record`` for the step log. With the log, a run
is reproducible from the base model and the config alone (the replay contract).

Step seeds are a pure function of ``(seed, step, j)``, so resuming needs only the step
counter: a resumed run draws exactly the seeds the uninterrupted run would have drawn.

Who owns what. A strategy decides: the direction, the projected gradient along it, the
reported loss (an :class:`~qzo.zo.strategies.Estimate` with just those). The probe records
what the step did: the perturbation left applied, every loss, the forwards it ran; and it
decides *how* a pool is evaluated (:attr:`ZO.batched`: one stacked forward, or one by one).
The optimizer completes the estimate from the probe (a strategy that states one of those
is checked against it), applies the normalizer and the clip (its own options), and hands
the estimate to the rule. The strategy's mean, where it keeps one, is read one way:
``strategy.mu_for(name)``. Nothing here knows model code: the closure is the only link.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..errors import NonFiniteLossError, QzoError
from ..noise.contract import step_seed
from ..noise.passes import Candidate, noise_cache, perturb_params_
from .distributed import Distributed
from .normalize import Normalize, clip_grad
from .params import ParamSet, as_param_set
from .rules import SGD, Rule
from .schedule import Schedule
from .strategies import SPSA, Estimate, Strategy

__all__ = ["ZO", "StepRecord", "step_seed"]


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


class _Probe:
    """The strategy's handle on the trainables and the closure for one step, and the record of what it did.

    The probe owns everything the step did: ``applied`` / ``applied_mu`` (the perturbation
    on the trainables now, x = theta + sum coef * z(seed) + applied_mu * mu), ``losses``
    (every evaluation, in order), ``forwards`` / ``forward_calls`` (added to the optimizer's
    counters when the step ends, also when it fails). Strategies move with :meth:`move_to`
    (an absolute target, reached from whatever is applied in one pass), so the same code
    works whether a pool was evaluated one by one (the last candidate left applied) or
    batched (nothing applied); whether it is batched is the probe's :attr:`batched`.
    """

    def __init__(self, opt: "ZO", closure: Callable[[], object], params: ParamSet, batched: bool = False):
        self._opt = opt
        self._closure = closure
        self.params = params  # this step's trainables, with their noise scales
        self.eps = opt.eps
        self.batched = batched
        self.applied: dict[int, float] = {}
        self.applied_mu = 0.0
        self.losses: list[float] = []
        self.forwards = 0  # loss evaluations (a batched pool of K counts K)
        self.forward_calls = 0  # model forwards that ran
        self._total_rows: int | None = None

    def perturb(self, terms: list[tuple[int, float]], mu_coef: float = 0.0) -> None:
        seeds = [int(s) for s, _ in terms]
        coefs = [float(c) for _, c in terms]
        perturb_params_(self.params, seeds, coefs, mu_for=self._opt.strategy.mu_for, mu_coef=mu_coef)
        for s, c in zip(seeds, coefs):
            self.applied[s] = self.applied.get(s, 0.0) + c
        self.applied_mu += mu_coef

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
            self.perturb(delta, mu_coef=mu_delta)
        # book-keep the target itself, not a float sum that may be off by an ulp
        self.applied = {s: c for s, c in target.items() if c != 0.0}
        self.applied_mu = float(mu_coef)

    def _check_finite(self, loss: float, index: int) -> None:
        if not math.isfinite(loss):
            self.restore()
            step = self._opt.steps + 1
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
        dist = self._opt.distributed
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
        dist = self._opt.distributed
        mine = [i for i in range(len(relative)) if dist is None or dist.owns(i)]
        values = []
        if mine:
            with torch.no_grad():
                values = evaluate(self.params, [relative[i] for i in mine], mu_for=self._opt.strategy.mu_for)
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
        dist = self._opt.distributed
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
        dist = self._opt.distributed
        mine = slice(0, total_rows) if dist is None else dist.rows(total_rows) if dist.owns(0) else None
        losses, counts = [], []
        if mine is not None:
            with torch.no_grad():
                out, cnt = self._closure.evaluate_rows(self.params, relative[mine],
                                                       mu_for=self._opt.strategy.mu_for)
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


class ZO:
    """Zeroth-order optimizer: forward passes only, seed-replayed in-place perturbations.

    Args:
        params: what to train: ``qzo.lora(...)``'s result, a ``ParamSet``, or (as with torch
            optimizers) an iterable of tensors or of ``(name, tensor)`` pairs.
        strategy: how directions are drawn and the slope estimated (default ``qzo.SPSA()``).
        rule: how the estimate becomes an update (default ``qzo.SGD(lr=1e-4)``); ``lr=`` is a
            shortcut that builds ``SGD(lr)`` when ``rule`` is not given.
        eps: perturbation scale.
        seed: base seed of the run; step seeds are derived from it and the step number.
        schedule: a :class:`qzo.zo.schedule.Schedule` scaling the rule's lr per step
            (default: constant).
        clip: limit the projected gradient to ``[-clip, clip]`` (QZO's directional-derivative
            clipping, C = 100 in that paper); default: the trainables' own ``clip``
            (``qzo.scales(..., clip=...)``), else none. The step log records the clipped value.
        normalize: scale-free steps for any strategy: ``"spread"`` divides the projected
            gradient by the spread of the step's losses (FZOO), ``"rms"`` by a running RMS of
            past ones, or a :class:`qzo.zo.normalize.Normalize`; ``None``: off. Applied before
            the clip; see ``qzo.zo.normalize``.
        noise_scale: LoRA-aware (group-aware) directions: fnmatch pattern -> scale of the noise
            that tensor draws (:meth:`qzo.zo.params.ParamSet.with_noise`); ``{"*lora_A*": 0}``
            perturbs and updates LoRA's B alone, ``{"*lora_A*": 0.5}`` explores A at half of
            B's scale. ``None``: every tensor draws plain noise (MeZO).
        noise_scale_steps: apply ``noise_scale`` for the first this many steps only, then
            plain noise everywhere (e.g. B only until B has moved off zero); ``None``: always.
        batched: evaluate a strategy's pool in one stacked forward (LoRA trainables and a
            :class:`qzo.CausalLMLoss` closure; see ``qzo.targets.candidates``). How the probe evaluates,
            not what the strategy decides, so it is the optimizer's; a strategy built with
            ``batched=True`` (the older spelling) turns it on too.
        distributed: a :class:`qzo.distributed.Distributed`: spread each step's evaluations
            (candidate-parallel) and the batch (data-parallel: pass each rank its shard of the
            batch) over ``torch.distributed`` ranks; only losses cross ranks. ``None``: one
            process.

    ``forwards`` counts loss evaluations (a batched pool of K counts K, so budgets compare
    across ``batched``); ``forward_calls`` counts the model forwards that actually ran.

    Example::

        opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-3), eps=1e-2)
        loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(
        self,
        params,
        strategy: Strategy | None = None,
        rule: Rule | str | None = None,
        eps: float = 1e-3,
        seed: int = 0,
        lr: float | None = None,
        schedule: Schedule | None = None,
        clip: float | None = None,
        normalize: str | Normalize | None = None,
        distributed: Distributed | None = None,
        noise_scale: dict[str, float] | None = None,
        noise_scale_steps: int | None = None,
        batched: bool = False,
    ):
        self.params: ParamSet = as_param_set(params)
        self.strategy = strategy if strategy is not None else SPSA()
        if rule is None or rule == "sgd":
            rule = SGD(lr=lr if lr is not None else 1e-4)
        elif isinstance(rule, str):
            raise ValueError(f"unknown rule {rule!r}; pass 'sgd' or a rule object (qzo.SGD, qzo.Momentum, qzo.Adam, qzo.Sign)")
        elif lr is not None:
            raise ValueError("pass lr to the rule object (e.g. qzo.SGD(lr=...)), not to both")
        self.rule = rule
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.seed = int(seed)
        self.schedule = schedule if schedule is not None else Schedule()
        # qzo.scales(..., clip=C) carries QZO's clip along with the trainables it is meant for
        self.clip = clip if clip is not None else getattr(self.params, "clip", None)
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0 (QZO uses 100), got {self.clip}")
        self.normalize = Normalize(normalize) if isinstance(normalize, str) else normalize
        self.distributed = distributed
        self.batched = bool(batched) or bool(getattr(self.strategy, "batched", False))
        if noise_scale_steps is not None and (not isinstance(noise_scale_steps, int) or noise_scale_steps < 0):
            raise ValueError(f"noise_scale_steps must be an int >= 0 (or None: always), got {noise_scale_steps!r}")
        if noise_scale_steps is not None and not noise_scale:
            raise ValueError("noise_scale_steps limits noise_scale to the first steps, but no noise_scale was given")
        self.noise_scale, self.noise_scale_steps = (dict(noise_scale) if noise_scale else None), noise_scale_steps
        self._scaled = self.params.with_noise(self.noise_scale) if self.noise_scale else self.params
        self.strategy.bind(self.params)
        self.rule.bind(self.params)
        self.steps = 0
        self.forwards = 0  # loss evaluations (a batched pool of K counts K)
        self.forward_calls = 0  # model forwards actually run (a batched pool counts 1)
        self.last_record: StepRecord | None = None

    @property
    def lr(self) -> float:
        return self.rule.lr

    def lr_at(self, step: int) -> float:
        """Learning rate of 1-based ``step``: the rule's lr times the schedule's factor."""
        return self.rule.lr * self.schedule.factor(step)

    def params_at(self, step: int) -> ParamSet:
        """The trainables 1-based ``step`` perturbs and updates, with their noise scales (``noise_scale``)."""
        if self.noise_scale_steps is not None and step > self.noise_scale_steps:
            return self.params
        return self._scaled

    def _draw_seeds(self, step: int, drawn: list[int]) -> Callable[[int], list[int]]:
        """The step's seed source; every seed it hands out is appended to ``drawn`` (the step log's seeds)."""

        def draw(n: int) -> list[int]:
            seeds = [step_seed(self.seed, step, len(drawn) + j) for j in range(n)]
            drawn.extend(seeds)
            return seeds

        return draw

    def _complete(self, est: Estimate, probe: _Probe, drawn: list[int]) -> None:
        """Fill in what the step did from the probe's record; a strategy that stated it must agree."""
        applied = [(s, c) for s, c in probe.applied.items()]
        if est.applied is not None and ([(int(s), float(c)) for s, c in est.applied if c != 0.0] != applied
                                        or float(est.applied_mu) != probe.applied_mu):
            probe.restore()
            raise QzoError(f"{type(self.strategy).__name__} says it left {est.applied} (mean x {est.applied_mu}) on "
                           f"the trainables, but the probe applied {applied} (mean x {probe.applied_mu}); drop "
                           "Estimate.applied (the probe keeps it) or move with probe.move_to")
        est.applied, est.applied_mu = applied, probe.applied_mu
        if est.losses is None:
            est.losses = list(probe.losses)
        if not est.seeds:
            est.seeds = list(drawn)
        if est.mu is None:
            est.mu = self.strategy.mu_for

    def step(self, closure: Callable[[], object]) -> float:
        """One ZO step. ``closure()`` returns the scalar loss (it is called under no-grad).

        Returns the step's training loss. Raises :class:`qzo.errors.NonFiniteLossError` (with
        the trainables restored) if any evaluation is NaN or inf.
        """
        step = self.steps + 1
        lr = self.lr_at(step)
        if self.distributed is not None:
            self.distributed.step = step
        params = self.params_at(step)
        probe = _Probe(self, closure, params, batched=self.batched)
        drawn: list[int] = []
        try:
            est: Estimate = self.strategy.estimate(probe, self._draw_seeds(step, drawn))
            self._complete(est, probe, drawn)
            if not math.isfinite(est.grad):
                probe.restore()
                raise NonFiniteLossError(f"projected gradient is {est.grad} at step {step}; trainables restored", step)
            if self.normalize is not None:
                est.grad = self.normalize(est, self.eps)
            if self.clip is not None:
                est.grad = clip_grad(est.grad, self.clip)
            self.rule.apply(params, est, lr)
            self.strategy.after_update(params)
        finally:
            self.forwards += probe.forwards  # evaluations that ran count, also in a step that failed
            self.forward_calls += probe.forward_calls
            noise_cache.clear()  # the cache holds one step's noise at most (CPU path)
        self.steps = step
        self.last_record = StepRecord(
            step=step,
            seeds=list(est.seeds),
            direction=list(est.direction),
            grad=est.grad,
            losses=list(est.losses),
            loss=est.loss,
            lr=lr,
            forwards=self.forwards,
            direction_mu=est.direction_mu,
        )
        return est.loss

    def state_dict(self) -> dict:
        """Everything besides the trainables needed to continue bit-exactly."""
        return {
            "steps": self.steps,
            "forwards": self.forwards,
            "forward_calls": self.forward_calls,
            "seed": self.seed,
            "eps": self.eps,
            "strategy": self.strategy.state_dict(),
            "rule": self.rule.state_dict(),
            "normalize": self.normalize.state_dict() if self.normalize is not None else {},
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.forwards = int(state["forwards"])
        self.forward_calls = int(state.get("forward_calls", self.forwards))  # older checkpoints: never batched
        self.seed = int(state["seed"])
        self.eps = float(state["eps"])
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.rule.load_state_dict(state.get("rule", {}))
        if self.normalize is not None:
            self.normalize.load_state_dict(state.get("normalize", {}))

    def __repr__(self) -> str:
        return f"ZO({self.params.numel:,} values, strategy={self.strategy!r}, rule={self.rule!r}, eps={self.eps})"
