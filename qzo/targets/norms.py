"""``qzo.norms``: the gains of a model's normalization layers, trained as float32 dense slices.

A decoder's RMSNorm (or LayerNorm) weights are one vector of ``hidden_size`` values per
norm: SmolLM2-135M has 61 of them, 35,136 values in all, against 184,320 in LoRA's B
factors at r 8 on q and v. Zeroth-order steps gain per forward as the number of perturbed
values falls, and a per-channel gain reaches every position of the residual stream, so on
the demo task these few values lower the held-out loss faster per forward than LoRA
(``benchmarks/ablation_targets.py``). They are a :class:`~qzo.targets.dense.DenseParams`
(saved in ``dense.safetensors``, loaded with :func:`qzo.load_dense`); this module only
picks the modules.
"""

from __future__ import annotations

import torch

from .base import select_modules, unwrap_peft
from .dense import DenseParams, dense

__all__ = ["norms", "norm_paths"]


def _is_norm(path: str, module: torch.nn.Module) -> bool:
    """A normalization layer with a per-channel gain: a ``*Norm`` class holding one 1-D weight (and maybe a bias)."""
    if "norm" not in type(module).__name__.lower() or any(part.startswith("lora_") for part in path.split(".")):
        return False
    own = dict(module.named_parameters(recurse=False))
    return "weight" in own and own["weight"].dim() == 1 and all(p.dim() == 1 for p in own.values())


def norm_paths(model, modules=None) -> list[str]:
    """The paths of ``model``'s normalization layers that ``modules`` picks (``None`` or ``"all"``: every one)."""
    patterns = None if modules in (None, "all") else modules
    picked = select_modules(unwrap_peft(model), patterns, _is_norm, "qzo.norms", "normalization (RMSNorm/LayerNorm)")
    return [path for path, _, _ in picked]


def norms(model, modules=None, clip: float | None = None) -> DenseParams:
    """Make the gains of ``model``'s normalization layers trainable as float32 dense slices (in place).

    Args:
        model: a model from ``qzo.load`` (LoRA may wrap it).
        modules: ``None`` / ``"all"`` for every norm, or module paths and fnmatch patterns
            (``["model.norm", "*post_attention_layernorm"]``) as :func:`qzo.dense` takes them.
        clip: directional-derivative clip carried to ``qzo.ZO``.
    """
    return dense(model, modules=norm_paths(model, modules), clip=clip)
