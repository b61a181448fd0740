"""Zeroth-order steps inside the trainers people already use: transformers' ``Trainer`` and TRL's ``SFTTrainer``.

    from qzo.hf import ZOSFTTrainer          # was: from trl import SFTTrainer
    trainer = ZOSFTTrainer(model=..., args=SFTConfig(...), train_dataset=..., peft_config=...)
    trainer.train()

One module per concern of the bridge: ``trainer`` (the mixin and ``ZOTrainer``), ``sft``
(``ZOSFTTrainer``, the one module that imports TRL), ``optimizer`` (the optimizer slot and the
lr the scheduler sets), ``loss`` (the ZO closure of a batch), ``state`` (qzo's part of a
checkpoint), ``trainables`` (what is trained by default), ``refuse`` (the options a ZO step
cannot honour). ``import qzo`` imports none of this; ``qzo.hf.ZOSFTTrainer`` imports TRL when it
is first named, and says how to install it when it is missing.
"""

from .optimizer import TrainerLR, ZOOptimizer
from .refuse import UnsupportedOption
from .state import STATE_DIR
from .trainer import ZOTrainer, ZOTrainerMixin

__all__ = ["ZOTrainerMixin", "ZOTrainer", "ZOSFTTrainer", "ZOOptimizer", "TrainerLR", "UnsupportedOption",
           "STATE_DIR"]


def __getattr__(name):
    # TRL is optional (pip install "qzo[hf]"): imported when ZOSFTTrainer is first asked for, not with qzo.hf
    if name == "ZOSFTTrainer":
        try:
            from .sft import ZOSFTTrainer
        except ImportError as exc:
            if getattr(exc, "name", None) != "trl":
                raise
            raise ImportError('qzo.hf.ZOSFTTrainer needs TRL: pip install "qzo[hf]"') from exc
        return ZOSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
