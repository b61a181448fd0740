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
``strategy.mean`` (a mapping handed down, never a callback). Nothing here knows model code: the closure is the
only link.
"""

from __future__ import annotations

import math
from typing import Callable

from ..errors import NonFiniteLossError, QzoError
from ..noise.contract import step_seed
from ..noise.passes import noise_cache
from .distributed import Distributed
from .normalize import Normalize, clip_grad
from .params import ParamSet, as_param_set
from .probe import StepProbe
from .rules import SGD, Rule
from .schedule import Schedule
from .strategies import SPSA, Strategy
from .types import Estimate, StepRecord

__all__ = ["ZO"]


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
        subsample: perturb and update only a random share of the trainable tensors each step
            (each kept with this probability, at least one; :meth:`qzo.ParamSet.subsample`):
            fewer values a step, as LDSD's code (about 10% of tensors) and Sparse MeZO do.
            ``None``: every tensor, every step.
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
        subsample: float | None = None,
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
        if subsample is not None and not 0 < subsample <= 1:
            raise ValueError(f"subsample must be in (0, 1] (a share of the tensors), got {subsample!r}")
        self.subsample = subsample
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
        params = self.params if self.noise_scale_steps is not None and step > self.noise_scale_steps else self._scaled
        return params if self.subsample is None else params.subsample(self.subsample, self.seed, step)

    def _draw_seeds(self, step: int, drawn: list[int]) -> Callable[[int], list[int]]:
        """The step's seed source; every seed it hands out is appended to ``drawn`` (the step log's seeds)."""

        def draw(n: int) -> list[int]:
            seeds = [step_seed(self.seed, step, len(drawn) + j) for j in range(n)]
            drawn.extend(seeds)
            return seeds

        return draw

    def _complete(self, est: Estimate, probe: StepProbe, drawn: list[int]) -> None:
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
            est.mu = self.strategy.mean

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
        probe = StepProbe(closure, params, self.eps, step, self.distributed, self.strategy.mean, self.batched)
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
