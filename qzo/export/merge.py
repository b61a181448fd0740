"""The merge every export shares: the plain model a qzo model stands for, trained values folded in.

Kept apart from :mod:`qzo.export.formats` (which writes folders) so the GGUF writer
(:mod:`qzo.export.gguf`) and ``qzo.export.formats`` both read it without importing each other.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..models.bnb import dequantized_weight
from ..targets import clean_path, is_quantized, unwrap_peft

__all__ = ["merged_tensors", "merged_state_dict"]


def merged_tensors(model) -> Iterator[tuple[str, torch.Tensor | str]]:
    """Each tensor of the plain model ``model`` stands for, one at a time, trained values folded in.

    Yields ``(name, value)`` with the names a model without qzo has (peft's ``base_layer`` and
    ``lora_*`` segments gone) and floating-point values in float32: a quantized weight
    dequantized with its (trained) scales, plus its LoRA delta ``B @ A * alpha / r``. A weight
    tied to one yielded before (the output head of a tied model) yields ``(name, that name)``.
    One tensor at a time, so a writer can convert and drop each (a whole float32 model is 4
    bytes a weight).
    """
    model = unwrap_peft(model)
    deltas = {}
    for raw, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and isinstance(lora_b, torch.nn.ModuleDict):
            delta = None
            for adapter in lora_a:
                a, b = lora_a[adapter].weight.float(), lora_b[adapter].weight.float()
                part = (b @ a) * float(module.scaling[adapter])
                delta = part if delta is None else delta + part
            deltas[clean_path(raw)] = delta
    seen = {}
    for raw, module in model.named_modules():
        if any(part.startswith("lora_") for part in raw.split(".")):
            continue
        path = clean_path(raw)
        tensors = list(module.named_parameters(recurse=False))
        tensors += [(n, b) for n, b in module.named_buffers(recurse=False)
                    if n not in module._non_persistent_buffers_set]
        for pname, tensor in tensors:
            name = f"{path}.{pname}" if path else pname
            if pname == "weight" and is_quantized(module):
                value = dequantized_weight(module)
            elif id(tensor) in seen and pname == "weight" and path not in deltas:
                yield name, seen[id(tensor)]  # tied: one tensor under both names
                continue
            else:
                value = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
            if pname == "weight" and path in deltas:
                value = value + deltas[path].to(value.device)
            seen.setdefault(id(tensor), name)
            yield name, value.cpu()


def merged_state_dict(model, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The plain-model state dict of ``model`` with trained scales, dense slices and LoRA folded in.

    Keys are the names a model without qzo has (peft's ``base_layer`` and ``lora_*``
    segments gone); values are computed in float32 and cast to ``dtype`` once
    (:func:`merged_tensors`); tied weights are one tensor under both names.
    """
    state = {}
    for name, value in merged_tensors(model):
        if isinstance(value, str):
            state[name] = state[value]
        else:
            state[name] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    return state
