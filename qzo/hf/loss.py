"""The ZO closure of one Trainer batch: the Trainer's own ``compute_loss``, or qzo's labelled-positions loss.

:class:`TrainerLoss` calls the trainer's ``compute_loss`` (a subclass's override, a
``compute_loss_func``, label smoothing, TRL's loss types: whatever the script set up) and is
what any trainer can use. Where the loss is the plain token-mean next-token cross entropy of a
supported causal LM, :class:`qzo.CausalLMLoss` gives the same value from the labelled
positions' logits only, a chunk at a time (``qzo.data.loss``), and can evaluate a whole pool
in one forward (``batched=True``); :func:`fast_loss_blocker` says why it does not apply when
it does not. Both are wrapped in :class:`SameNoise`, so every evaluation of a step sees the
same dropout masks (and NEFTune noise): a step's losses then differ by the perturbation
alone, not by two draws of dropout.
"""

from __future__ import annotations

import contextlib

import torch

from ..data.loss import CausalLMLoss, decoder_and_head
from .refuse import UnsupportedOption

__all__ = ["TrainerLoss", "SameNoise", "fast_loss_blocker", "FAST_KEYS", "closure_for"]

#: batch keys :class:`qzo.CausalLMLoss` passes to the decoder as the model's forward would take them
FAST_KEYS = frozenset({"input_ids", "attention_mask", "labels", "position_ids"})


class TrainerLoss:
    """``trainer.compute_loss(model, inputs)`` on one batch, as a ZO closure.

    Each call gets its own shallow copy of the batch: ``compute_loss`` may pop ``labels``
    (label smoothing, ``compute_loss_func``) or add keys, and a step calls it more than once.
    """

    def __init__(self, trainer, model, inputs: dict, num_items_in_batch=None):
        self.trainer, self.model, self.inputs, self.num_items_in_batch = trainer, model, inputs, num_items_in_batch

    def __call__(self) -> torch.Tensor:
        with self.trainer.compute_loss_context_manager():
            return self.trainer.compute_loss(self.model, dict(self.inputs), num_items_in_batch=self.num_items_in_batch)


class SameNoise:
    """A closure whose every call (and every call of its methods) runs with the same torch RNG state and autocast.

    Args:
        closure: the loss closure (:class:`TrainerLoss` or :class:`qzo.CausalLMLoss`).
        seed: the torch seed of this step's evaluations (``qzo.noise.contract.sampling_seed``).
        autocast: a context manager factory (the accelerator's mixed-precision autocast).
        devices: CUDA devices whose RNG is forked too.
    """

    def __init__(self, closure, seed: int, autocast=contextlib.nullcontext, devices=()):
        self.closure, self.seed, self.autocast, self.devices = closure, int(seed), autocast, list(devices)

    def _run(self, fn, *args, **kwargs):
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed)
            with self.autocast():
                return fn(*args, **kwargs)

    def __call__(self):
        return self._run(self.closure)

    def __getattr__(self, name):
        # evaluate_candidates / evaluate_rows (pool and per-example strategies) under the same noise; rows, tokens as is
        if name.startswith("__") or name in ("closure", "seed", "autocast", "devices"):
            raise AttributeError(name)  # not set yet (copy, pickle): never look inside the closure for these
        value = getattr(self.closure, name)
        if callable(value):
            return lambda *args, **kwargs: self._run(value, *args, **kwargs)
        return value


def fast_loss_blocker(trainer, model, inputs: dict) -> str | None:
    """Why :class:`qzo.CausalLMLoss` cannot stand in for ``trainer.compute_loss`` on this batch; ``None``: it can.

    It can where ``compute_loss`` is one the trainer declares plain (``plain_loss_owners``: the
    token-mean cross entropy, which the class may narrow with ``fast_loss_conditions``), no
    ``compute_loss_func`` or label smoothing replaces it, the batch holds only the keys it passes
    on, and the model is an architecture ``qzo.data.loss`` supports.
    """
    owner = next(cls for cls in type(trainer).__mro__ if "compute_loss" in cls.__dict__)
    if owner not in trainer.plain_loss_owners:
        return f"{owner.__name__}.compute_loss is a custom loss"
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "compute_loss_func replaces the loss"
    if getattr(trainer, "label_smoother", None) is not None:
        return f"label_smoothing_factor={trainer.args.label_smoothing_factor} changes the loss"
    blocker = trainer.fast_loss_conditions()
    if blocker:
        return blocker
    if "labels" not in inputs:
        return "the batch has no labels"
    extra = sorted(set(inputs) - FAST_KEYS)
    if extra:
        return f"the batch holds {extra}, which qzo.CausalLMLoss does not pass on"
    if decoder_and_head(trainer.accelerator.unwrap_model(model)) is None:
        return "the model is not an architecture qzo.data.loss supports (qzo.data.loss.SUPPORTED)"
    return None


def closure_for(trainer, model, inputs: dict, num_items_in_batch, which: str):
    """``(closure, kind)`` for one batch: kind ``"fast"`` (qzo.CausalLMLoss) or ``"trainer"`` (compute_loss).

    ``which`` is the trainer's ``zo_loss``: ``"auto"`` takes the fast loss where it applies,
    ``"fast"`` requires it, ``"trainer"`` never takes it.
    """
    if which == "trainer":
        return TrainerLoss(trainer, model, inputs, num_items_in_batch), "trainer"
    blocker = fast_loss_blocker(trainer, model, inputs)
    if blocker is None:
        return CausalLMLoss(trainer.accelerator.unwrap_model(model), inputs), "fast"
    if which == "fast":
        raise UnsupportedOption(f"zo_loss='fast' needs qzo.CausalLMLoss to equal the trainer's loss, but {blocker}; "
                                "pass zo_loss='auto' or 'trainer'")
    return TrainerLoss(trainer, model, inputs, num_items_in_batch), "trainer"
