"""What a ZO trainer trains when no ``params=`` is given, and the model made ready for forwards only.

What is trained is what a torch optimizer would have been given: the model's parameters that
require grad (a peft model's adapters, TRL's ``peft_config`` included, plus any
``modules_to_save``); failing those, its LoRA tensors (a model ``qzo.lora`` prepared, which
leaves nothing requiring grad). Names are peft's saved-adapter keys (``.default.`` dropped),
the names ``qzo.lora`` gives the same tensors, so each draws the same noise stream through
either door. Then no parameter of the model requires grad (no graph and no ``.grad`` is ever
built), and the CPU path of its 4-bit layers is fixed before the first forward
(:func:`settle_cpu_4bit`).
"""

from __future__ import annotations

import torch

from ..errors import QzoError
from ..noise.contract import stream_id
from ..zo.params import ParamSet, Trainable

__all__ = ["trainable_names", "model_trainables", "freeze", "settle_cpu_4bit"]


def freeze(model) -> None:
    """``requires_grad`` off on every parameter (peft's ``load_adapter(is_trainable=True)`` turns the adapters' back on)."""
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_names(model) -> list[str]:
    """The parameter names a torch optimizer would have been given (module docs); read before :func:`freeze`."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        names = [n for n, _ in model.named_parameters() if "lora_" in n]
    if not names:
        raise QzoError("nothing to train: no parameter requires grad and the model has no LoRA adapters; pass a "
                       "peft model, peft_config= (TRL), or params=qzo.lora(model, ...)")
    return names


def model_trainables(model, names: list[str]) -> ParamSet:
    """The named parameters of ``model`` as a ParamSet of their live tensors; leaves the whole model frozen.

    Looked up again at every ``train()``: a resume's adapter load may have replaced a
    parameter's tensor. LoRA tensors in 16 bits are cast to float32 in place, as ``qzo.lora``
    does: a +eps z / -eps z round trip in bf16 loses about 3 digits of every value each step
    (TRL keeps QLoRA adapters in bf16).
    """
    found = dict(model.named_parameters())
    missing = [n for n in names if n not in found]
    if missing:
        raise QzoError(f"the model no longer has the parameters it was set up with (e.g. {missing[0]!r}); build a "
                       "new trainer for a changed model")
    items = []
    for name in names:
        p = found[name]
        if "lora_" in name and p.dtype in (torch.float16, torch.bfloat16):
            with torch.no_grad():
                p.data = p.data.float()
        saved = name.replace(".default.", ".")
        items.append(Trainable(saved, p.data, stream_id(saved)))
    freeze(model)
    return ParamSet(items)


def settle_cpu_4bit(model) -> None:
    """Fix the CPU path of the model's bitsandbytes 4-bit layers before the first ZO forward.

    A model loaded by transformers (TRL's ``quantization_config``) leaves the choice to
    bitsandbytes, which on a CPU with AVX512-BF16 repacks each layer inside its first no-grad
    forward: a step's first evaluation would run another function than its second, and the
    Trainer's checkpoint save (``state_dict()``) un-packs a repacked layer in place (a tiny
    Llama's loss moved from 6.26043 to 6.26098 after one ``state_dict()``). Where no layer is
    repacked yet, they stay on the plain path, qzo's default (``qzo.models.bnb``); where one is,
    every eligible layer is repacked now and guarded across ``state_dict()``.
    """
    if not any(hasattr(m, "support_avx512bf16_for_cpu") for m in model.modules()):
        return  # no bitsandbytes 4-bit layer: nothing to settle (and no bitsandbytes import)
    from ..models.bnb import choose_cpu_path, is_packed

    choose_cpu_path(model, fused=any(is_packed(m) for m in model.modules()))
