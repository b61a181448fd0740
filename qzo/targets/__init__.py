"""What zeroth-order training trains, one module per kind (peft's one-package-per-tuner layout).

* :mod:`qzo.targets.lora`: LoRA adapters (peft's layers, saved as a PEFT adapter folder);
* :mod:`qzo.targets.scales`: the quantization scales of 4/8-bit layers (QZO);
* :mod:`qzo.targets.dense`: chosen modules as float32 dense slices;
* :mod:`qzo.targets.norms`: the normalization layers' gains (dense slices picked for you);
* :mod:`qzo.targets.candidates`: LoRA candidates evaluated inside one stacked forward;
* :mod:`qzo.targets.base`: what they share (picking modules, the ``ModuleTargets`` base,
  :func:`combine`);
* :mod:`qzo.targets.files`: one save/load API for every kind (:func:`save`, :func:`load`).

The builders are ``qzo.lora``, ``qzo.scales``, ``qzo.dense`` and ``qzo.norms`` at the top level;
each returns a :class:`qzo.ParamSet`, the only thing the optimizer core (``qzo.zo``) sees, so
nothing here is imported by the optimizer and nothing in the optimizer knows a model. Every
touch of bitsandbytes' internals is :mod:`qzo.models.bnb`.
"""

from ..errors import TargetError
from .base import (FILE_NAMES, ModuleTargets, Targets, clean_path, combine, is_quantized, kind_of, read_checkpoint,
                   select_modules, target_kind, unwrap_peft)
from .files import load, save

# the kinds, in the order a run builds them (and a saved folder lists them): each registers itself on import
from . import lora, scales, dense  # noqa: E402,F401  # isort: skip

__all__ = ["TargetError", "ModuleTargets", "Targets", "combine", "is_quantized", "clean_path", "unwrap_peft",
           "select_modules", "read_checkpoint", "save", "load", "kind_of", "FILE_NAMES", "target_kind"]
