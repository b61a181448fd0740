"""``ZOTrainerMixin``: a transformers ``Trainer`` whose step is a ``qzo.ZO`` step, and ``ZOTrainer``.

The Trainer keeps everything it owns (data loading, evaluation, callbacks, logging, saving,
its lr scheduler); the mixin replaces the two things ZO does not have, the backward pass and
the torch optimizer:

    training_step    one ``qzo.ZO.step`` on the batch (the closure: ``compute_loss``, or
                     ``qzo.CausalLMLoss`` where it is the same loss, see ``qzo.hf.loss``);
                     returns the step's loss as the Trainer's training loss
    create_optimizer a ``qzo.ZO`` over the trainables, behind :class:`~qzo.hf.optimizer.ZOOptimizer`
                     (the slot the scheduler drives; its lr is qzo's, ``qzo.hf.optimizer``)
    save_model       the Trainer's files plus ``qzo/`` (step log, trainables, rule state;
                     ``qzo.hf.state``), so ``resume_from_checkpoint`` continues bit-exactly
    log              qzo's numbers (``zo/grad``, ``zo/loss_min``, ``zo/loss_max``, ``zo/forwards``)
                     beside the Trainer's, to every ``report_to``; the Trainer's ``grad_norm``
                     (of gradients that do not exist) is dropped

The options that exist for a backward pass are refused at construction (``qzo.hf.refuse``).
qzo's step counter is the Trainer's ``global_step``: step seeds are a function of
``(TrainingArguments.seed, step)``, so a resumed run draws the seeds the uninterrupted run drew.
"""

from __future__ import annotations

import logging

import torch
from transformers import Trainer

from ..errors import QzoError
from ..noise.contract import sampling_seed
from ..zo.optim import ZO
from ..zo.strategies import STRATEGIES, Strategy
from .loss import SameNoise, closure_for
from .optimizer import TrainerLR, ZOOptimizer, build_rule
from .refuse import UnsupportedOption, refuse_arguments, refuse_trainer
from .state import load_state, log_values, save_state
from .trainables import freeze, model_trainables, settle_cpu_4bit, trainable_names

__all__ = ["ZOTrainerMixin", "ZOTrainer", "ZO_LOSSES"]

logger = logging.getLogger(__name__)

#: ``zo_loss``: take qzo.CausalLMLoss where it equals the trainer's loss, require it, or always call compute_loss
ZO_LOSSES = ("auto", "fast", "trainer")


class ZOTrainerMixin:
    """Zeroth-order steps inside a transformers ``Trainer`` (or a subclass: put the mixin first).

    Every Trainer argument keeps its meaning: ``learning_rate``, ``lr_scheduler_type`` and
    ``warmup_steps`` set qzo's lr (bit-exactly the lr the Trainer logs), ``seed`` seeds the
    noise, ``logging_steps`` / ``report_to`` carry qzo's numbers, ``save_steps`` writes the
    adapter plus qzo's state. Options for a backward pass are refused (``qzo.hf.refuse``).

    Args:
        strategy: how directions are drawn (a ``qzo.Strategy`` or its name; default ``qzo.SPSA()``).
        rule: ``"sgd"`` (default), ``"momentum"``, ``"adam"``, ``"sign"`` built with the Trainer's
            ``learning_rate`` and ``weight_decay``, or a rule object whose lr is ``learning_rate``.
        eps: perturbation scale.
        params: what to train (``qzo.lora(...)``, ``qzo.scales(...)``, any ``qzo.ParamSet``);
            default: the parameters that require grad (a peft model's adapters).
        zo_loss: ``"auto"``: ``qzo.CausalLMLoss`` where it equals the trainer's loss (faster, and
            needed by ``batched=True``), else ``compute_loss``; ``"fast"``: always the former
            (an error where it does not apply); ``"trainer"``: always ``compute_loss``.
        clip, normalize, noise_scale, noise_scale_steps, batched: as ``qzo.ZO`` takes them.
        *args, **kwargs: the trainer class's own arguments.
    """

    #: classes whose ``compute_loss`` is the plain token-mean cross entropy (``qzo.hf.loss.fast_loss_blocker``)
    plain_loss_owners: tuple[type, ...] = (Trainer,)

    def __init__(self, *args, strategy: Strategy | str | None = None, rule="sgd", eps: float = 1e-3, params=None,
                 zo_loss: str = "auto", clip: float | None = None, normalize=None, noise_scale=None,
                 noise_scale_steps: int | None = None, batched: bool = False, **kwargs):
        if zo_loss not in ZO_LOSSES:
            raise UnsupportedOption(f"zo_loss={zo_loss!r}; choose one of {', '.join(ZO_LOSSES)}")
        if isinstance(strategy, str):
            if strategy not in STRATEGIES:
                raise UnsupportedOption(f"strategy {strategy!r} is not a qzo strategy; choose one of "
                                        f"{', '.join(STRATEGIES)}")
            strategy = STRATEGIES[strategy]()
        self.zo_settings = dict(strategy=strategy, eps=eps, clip=clip, normalize=normalize, noise_scale=noise_scale,
                                noise_scale_steps=noise_scale_steps, batched=batched)
        self.zo_rule, self.zo_loss = rule, zo_loss
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:  # before TRL prepares the data set and gradient checkpointing
            refuse_arguments(training_args)
        super().__init__(*args, **kwargs)
        refuse_trainer(self)
        build_rule(rule, self.args)  # a rule object whose lr is not learning_rate: refused now, not at train()
        # the names are read once, before freezing: afterwards nothing requires grad to find them by
        self._zo_params, self._zo_names = params, (None if params is not None else trainable_names(self.model))
        freeze(self.model)
        settle_cpu_4bit(self.model)  # before the Trainer's first forward (an evaluate() before train() included)
        self.zo: ZO | None = None
        self.zo_records: list[dict] = []  # the step log (StepRecord.to_json() per step), saved in every checkpoint
        self.zo_loss_kind: str | None = None  # the closure the last step used: "fast" or "trainer"
        self._zo_window: list[dict] = []  # the records since the last log line
        self._zo_resume: str | None = None

    # ---- the optimizer ----

    def fast_loss_conditions(self) -> str | None:
        """What of this trainer's settings makes its ``compute_loss`` differ from the token-mean loss (``None``: nothing)."""
        return None

    def create_optimizer(self, model=None):
        """A ``qzo.ZO`` over the trainables behind the optimizer slot; on resume, its state from the checkpoint."""
        if self.optimizer is None:
            params = self._zo_params if self._zo_params is not None else model_trainables(self.model, self._zo_names)
            freeze(self.model)
            lr = float(self.args.learning_rate)
            self.zo = ZO(params, rule=build_rule(self.zo_rule, self.args), seed=self.args.seed,
                         schedule=TrainerLR(self, lr), **self.zo_settings)
            self.zo_records, self._zo_window = [], []
            if self._zo_resume is not None:
                self.zo_records = load_state(self._zo_resume, self.zo)
            self.optimizer = ZOOptimizer(self.zo, lr)
        return self.optimizer

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """The Trainer's ``train``, with a fresh ``qzo.ZO`` (its step counter is ``global_step``) or the checkpoint's."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._zo_resume = resume_from_checkpoint or None
        self.optimizer = None
        return super().train(resume_from_checkpoint=self._zo_resume, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # ---- the step ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One ``qzo.ZO`` step on ``inputs``; returns its loss. No backward, nothing requires grad."""
        if self.zo.steps != self.state.global_step:
            raise QzoError(f"qzo.ZO is at step {self.zo.steps} but the Trainer at {self.state.global_step}: its step "
                           "seeds would not be the run's; resume from a checkpoint a qzo.hf trainer wrote")
        model.train()
        inputs = self._prepare_inputs(inputs)
        closure, kind = closure_for(self, model, inputs, num_items_in_batch, self.zo_loss)
        if kind != self.zo_loss_kind:
            logger.info("qzo: the ZO closure is %s", "qzo.CausalLMLoss" if kind == "fast" else "the trainer's compute_loss")
        self.zo_loss_kind = kind
        if self.zo.batched and self.zo_loss_kind != "fast":
            raise UnsupportedOption("batched=True evaluates a pool in one stacked forward through qzo.CausalLMLoss, "
                                    "which this trainer's loss is not (zo_loss='fast' says why); pass batched=False")
        device = self.args.device
        closure = SameNoise(closure, sampling_seed(self.zo.seed, self.zo.steps + 1), self.accelerator.autocast,
                            devices=[device] if device.type == "cuda" else [])
        loss = self.zo.step(closure)
        record = self.zo.last_record.to_json()
        self.zo_records.append(record)
        self._zo_window.append(record)
        return torch.tensor(loss, device=device)

    # ---- logging and saving ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with qzo's numbers on training lines (and no ``grad_norm``: there is no gradient)."""
        if "loss" in logs and self._zo_window:
            logs.pop("grad_norm", None)
            logs.update(log_values(self._zo_window, self.zo))
            self._zo_window = []
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model`` (the peft adapter), plus ``qzo/`` with the step log and qzo's state."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.zo is not None and self.args.should_save:
            save_state(output_dir if output_dir is not None else self.args.output_dir, self.zo, self.zo_records)


class ZOTrainer(ZOTrainerMixin, Trainer):
    """``transformers.Trainer`` with qzo's zeroth-order step: forward passes only (see :class:`ZOTrainerMixin`).

    Example::

        trainer = qzo.hf.ZOTrainer(model=peft_model, args=TrainingArguments(..., learning_rate=1e-3),
                                   train_dataset=ds, data_collator=collator, strategy=qzo.SPSA(), eps=1e-2)
        trainer.train()
    """
