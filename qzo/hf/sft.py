"""``ZOSFTTrainer``: TRL's ``SFTTrainer`` with qzo's zeroth-order step (``pip install "qzo[hf]"``).

TRL prepares the data (chat templates, ``assistant_only_loss``, packing), builds the peft
model from ``peft_config`` and computes its loss; the mixin (``qzo.hf.trainer``) replaces the
backward pass and the optimizer. Its ``compute_loss`` is the token-mean cross entropy when
``loss_type="nll"`` and no MoE aux loss is added, and then ``qzo.CausalLMLoss`` stands in for
it (``zo_loss="auto"``); that path logs no ``entropy`` / ``mean_token_accuracy`` for training
steps (``zo_loss="trainer"`` does, measured at each perturbed evaluation, and then TRL's
``num_tokens`` counts every evaluation of a step).
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer

from .trainer import ZOTrainerMixin

__all__ = ["ZOSFTTrainer"]


class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with qzo's zeroth-order step: change the class name, keep the script.

    Example::

        trainer = qzo.hf.ZOSFTTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", args=SFTConfig(...),
                                      train_dataset=chats, peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        trainer.train()
    """

    plain_loss_owners = (Trainer, SFTTrainer)

    def fast_loss_conditions(self) -> str | None:
        if getattr(self.args, "loss_type", "nll") != "nll":
            return f"loss_type={self.args.loss_type!r} weights the tokens"
        if getattr(self, "aux_loss_enabled", False):
            return "the MoE router's aux loss is added"
        return None
