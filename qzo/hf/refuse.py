"""The Trainer options a ZO step cannot honour, refused at construction with a one-line reason.

Each exists for the backward pass or for a torch optimizer, which a ZO step does not have;
silently ignoring one would train something other than what the script says. The arguments
are checked before the Trainer is built and the built Trainer after (its accelerator knows
about DeepSpeed and FSDP from an ``accelerate`` config as well as from the arguments).

One is switched off rather than refused: ``gradient_checkpointing`` left at TRL's
``SFTConfig`` default (``True``, set for every SFT script), so that changing the trainer class
is all a script needs; set on a plain ``TrainingArguments`` (default ``False``), it is refused.
"""

from __future__ import annotations

import dataclasses
import logging

from ..errors import QzoError

__all__ = ["UnsupportedOption", "refuse_arguments", "refuse_trainer"]

logger = logging.getLogger(__name__)

DEEPSPEED = ("DeepSpeed: its ZeRO stages shard gradients and optimizer states, which ZO does not have; run without it "
             "(qzo.distributed spreads ZO over ranks with only losses crossing)")
FSDP = ("FSDP: it shards parameters, gradients and optimizer states for a backward pass that ZO does not run; run "
        "without it (load the model quantized or offloaded instead)")


class UnsupportedOption(QzoError, ValueError):
    """A Trainer option that a zeroth-order step cannot honour; the message says why and what to do instead."""


def _field_default(args, name: str):
    found = {f.name: f for f in dataclasses.fields(args)}.get(name)
    return None if found is None or found.default is dataclasses.MISSING else found.default


def _checkpointing(args) -> bool:
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name an alias)
    return bool(getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False))


def _checkpointing_off(args) -> None:
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        if hasattr(args, name):
            setattr(args, name, False)


def refuse_arguments(args) -> None:
    """Raise :class:`UnsupportedOption` for the first of ``args`` (``TrainingArguments``) a ZO step cannot honour.

    Checked before the Trainer is built (TRL prepares the whole data set in its ``__init__``) and
    again after. Switches ``gradient_checkpointing`` off where it is the arguments class's
    default (TRL's ``SFTConfig``), with a warning.
    """
    if args.gradient_accumulation_steps > 1:
        raise UnsupportedOption(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: a ZO step evaluates "
                                "one batch's loss at each perturbation, there is no gradient to accumulate; raise "
                                "per_device_train_batch_size instead")
    if args.deepspeed:
        raise UnsupportedOption(DEEPSPEED)
    if args.fsdp:
        raise UnsupportedOption(FSDP)
    if args.fp16:
        raise UnsupportedOption("fp16=True: its loss scaler scales gradients, and ZO computes none; use bf16=True or "
                                "load the model in float16")
    if _checkpointing(args):
        if _field_default(args, "gradient_checkpointing") is True:
            _checkpointing_off(args)
            logger.warning("qzo: gradient_checkpointing switched off (%s's default): a ZO step runs no backward, so "
                           "there are no activations to recompute", type(args).__name__)
        else:
            raise UnsupportedOption("gradient_checkpointing=True: it trades compute for the activations a backward pass "
                                    "keeps, and a ZO step runs forwards only (its memory is already the inference "
                                    "peak); set gradient_checkpointing=False")


def refuse_trainer(trainer) -> None:
    """:func:`refuse_arguments` on ``trainer.args``, then what only the built Trainer knows (its accelerator, its
    optimizer slot, ``model_init``)."""
    args = trainer.args
    refuse_arguments(args)
    if getattr(trainer, "is_deepspeed_enabled", False):  # from an accelerate config as well as from the arguments
        raise UnsupportedOption(DEEPSPEED)
    if getattr(trainer, "is_fsdp_enabled", False):
        raise UnsupportedOption(FSDP)
    if args.world_size > 1 or args.n_gpu > 1:
        raise UnsupportedOption(f"{max(args.world_size, args.n_gpu)} processes or GPUs: every rank would apply its own "
                                "batch's update and the replicas would drift apart (DDP averages gradients, and ZO has "
                                "none); run one process on one device")
    if trainer.optimizer is not None or trainer.lr_scheduler is not None or \
            getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise UnsupportedOption("optimizers= / optimizer_cls_and_kwargs=: the optimizer is qzo.ZO; choose it with "
                                "strategy=, rule=, eps= and the schedule with lr_scheduler_type / warmup_steps")
    if trainer.model_init is not None:
        raise UnsupportedOption("model_init=: it builds a new model inside train() (hyperparameter search), after the "
                                "ZO trainables were taken from the model; pass the model itself")
