"""``qzo.dense``: chosen modules of a quantized model trained as float32 dense slices.

The rest of the model stays quantized; the chosen modules become float32 masters that ZO
perturbs in place:

* a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` is dequantized once (bitsandbytes' own
  ``dequantize_4bit`` / ``int8_vectorwise_dequant``) into a float32 ``torch.nn.Linear``
  that replaces it in the model (bias kept);
* any other module with parameters of its own (RMSNorm/LayerNorm, a 16-bit ``Linear``,
  ``lm_head``, an embedding) has those parameters converted to float32 in place.

float32 because the +eps z / -eps z round trip of a perturbation must not drift (bf16
keeps ~3 digits). A module whose parameters were in another dtype, and every replaced
quantized layer, computes in float32 and hands its output back in the dtype its input
came in (for an embedding, its old parameter dtype), so the rest of a bf16 model keeps
running in bf16.

Names are the parameter paths (``model.layers.0.self_attn.q_proj.weight``, peft's
``base_layer`` segment dropped). A tied ``lm_head`` is one tensor with ``embed_tokens``:
training it trains both, as a first-order optimizer would.
"""

from __future__ import annotations

import torch

from ..models.bnb import dequantized_weight
from ..noise.contract import stream_id
from ..zo.params import Trainable
from .base import (ModuleTargets, TargetError, _parent, clean_path, is_quantized, read_checkpoint, select_modules,
                   target_kind, unwrap_peft)

__all__ = ["dense", "DenseParams", "load_dense"]


def _dequantized(module) -> torch.Tensor:
    """The float32 weight a bitsandbytes layer computes with (:func:`qzo.models.bnb.dequantized_weight`)."""
    if getattr(module, "weight", None) is not None and module.weight.data.numel() == 0:
        raise TargetError("a dense slice of a 4-bit layer that streams (qzo.models.streaming: its codes live in host RAM or "
                          "on disk between forwards) cannot be trained: give the GPU more model.max_memory so the "
                          "layer stays whole, or train its LoRA adapters or scales (targets.scales) instead")
    return dequantized_weight(module)


def _dense_linear(module) -> torch.nn.Linear:
    weight = _dequantized(module).contiguous()
    out_features, in_features = weight.shape
    bias = module.bias
    linear = torch.nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device,
                             dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.to(torch.float32))
    linear.requires_grad_(False)
    return linear


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _cast(value, dtype):
    if _floating(value):
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


def _compute_in_float32(module, fallback_dtype: torch.dtype) -> None:
    """Run ``module`` in float32 and return its output in its input's dtype (or ``fallback_dtype``).

    Hooks, not a wrapper module, so the module keeps its class, path and parameter names.
    """

    def before(mod, args, kwargs):
        first = next((a for a in (*args, *kwargs.values()) if _floating(a)), None)
        mod._qzo_io_dtype = first.dtype if first is not None else fallback_dtype
        return _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}

    def after(mod, args, kwargs, output):
        return _cast(output, mod._qzo_io_dtype)

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)


def _owners(model, param) -> list[torch.nn.Module]:
    """Every module holding ``param`` directly (more than one when weights are tied)."""
    return [m for m in model.modules() if any(p is param for p in m.parameters(recurse=False))]


def _eligible(path: str, module) -> bool:
    if any(part.startswith("lora_") for part in path.split(".")):
        return False  # LoRA's own layers are trained through qzo.lora
    return is_quantized(module) or any(True for _ in module.parameters(recurse=False))


@target_kind
class DenseParams(ModuleTargets):
    """Float32 dense slices of a model, as ZO trainables (a ``ParamSet``).

    ``save(path)`` writes them to safetensors; ``apply_to(model)`` or :func:`load_dense`
    puts them on a freshly loaded base.
    """

    kind = "dense"
    file_name = "dense.safetensors"

    @classmethod
    def build(cls, model, modules=None, clip=None) -> "DenseParams":
        return dense(model, modules=modules, clip=clip)


def dense(model, modules, clip: float | None = None) -> DenseParams:
    """Make the chosen modules of ``model`` trainable as float32 dense slices (in place).

    Args:
        model: a model from ``qzo.load`` (quantized or not; LoRA may wrap it).
        modules: module paths or fnmatch patterns, matched against the whole path or a
            dotted suffix: ``["model.norm", "model.layers.0.self_attn.q_proj"]``,
            ``["model.layers.3.*_proj"]``, ``["lm_head"]``. Modules with parameters of their
            own (and quantized linear layers) are eligible; containers are not.
        clip: directional-derivative clip carried to ``qzo.ZO`` (see ``qzo.scales.clip_grad``).

    Returns:
        :class:`DenseParams`, one float32 tensor per parameter of the chosen modules, named
        by parameter path. Quantized layers among them are replaced by ``torch.nn.Linear``.
    """
    if modules is None:
        raise TargetError("qzo.dense needs modules=[...]: which layers to train densely, e.g. "
                          "['model.norm', 'model.layers.0.self_attn.q_proj']")
    model = unwrap_peft(model)
    chosen = select_modules(model, modules, _eligible, "qzo.dense", "parameter-holding")
    items, paths, seen = [], [], set()
    for path, raw, module in chosen:
        if getattr(module, "qzo_target", None) == "scales":
            raise TargetError(f"qzo.dense: the scales of {path} are already trained (qzo.scales); a layer is either "
                              "scale-trained or a dense slice, so leave it out of one of the two")
        if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            raise TargetError(f"qzo.dense: {path} is offloaded (its weights are on the meta device); give the model "
                              "enough max_memory to keep trained layers on a real device")
        if is_quantized(module):
            linear = _dense_linear(module)
            hook = getattr(module, "_hf_hook", None)
            if hook is not None:  # accelerate's placement hook moves inputs to the layer's device
                from accelerate.hooks import add_hook_to_module

                add_hook_to_module(linear, hook)
            parent, leaf = _parent(model, raw)
            setattr(parent, leaf, linear)
            _compute_in_float32(linear, torch.float32)
            module = linear
        else:
            for param in list(module.parameters(recurse=False)):
                if param.dtype == torch.float32:
                    continue
                old = param.dtype
                with torch.no_grad():
                    param.data = param.data.to(torch.float32)
                for owner in _owners(model, param):  # a tied weight changes dtype in every module holding it
                    if not getattr(owner, "_qzo_float32", False):
                        _compute_in_float32(owner, old)
                        owner._qzo_float32 = True
        module._qzo_float32 = True
        module.qzo_target = "dense"
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied (lm_head and embed_tokens both picked): one tensor, trained once, first name
            seen.add(id(param))
            param.requires_grad_(False)
            if not param.is_contiguous():
                param.data = param.data.contiguous()
            name = f"{path}.{pname}"
            items.append(Trainable(name, param.data, stream_id(name)))
        paths.append(path)
    return DenseParams(items, model, paths, clip=clip)


def load_dense(model, checkpoint, clip: float | None = None) -> DenseParams:
    """Put saved dense slices (a file from ``DenseParams.save`` or a state dict) on ``model``."""
    state = read_checkpoint(checkpoint)
    if not state:
        raise TargetError("load_dense: the checkpoint is empty")
    paths = []
    for key in state:
        path = clean_path(key.rsplit(".", 1)[0])
        if path not in paths:
            paths.append(path)
    params = dense(model, modules=paths, clip=clip)
    extra = sorted({t.name for t in params} - set(state))
    if extra:
        raise TargetError(f"load_dense: this model's {extra[:3]} are not in the checkpoint; "
                          "load the base it was trained on")
    params.load_state_dict(state)
    return params
