"""``qzo.scales``: train the quantization scales of 4/8-bit layers (QZO, arXiv 2505.13430).

A quantized weight is ``W = q * s``: integer codes ``q`` that stay frozen and float scales
``s`` that ZO perturbs in place. bitsandbytes keeps them as:

* ``Linear4bit`` (NF4/FP4): ``weight.quant_state.absmax``, one float32 per block of 64
  weights of the flattened ``[out, in]`` weight (``W_block = code[q_block] * absmax``).
  With double quantization (``quant_state.nested``) absmax is itself quantized: uint8
  codes, a nested ``QuantState`` (``state2``, blocks of 256) and a float ``offset``. Such a
  layer is switched once to a float32 master of the dequantized absmax (bitsandbytes' own
  ``dequantize_blockwise`` + offset, the arithmetic its matmul does per call), made
  non-nested: every bitsandbytes 4-bit path (CPU dequantize + matmul, CUDA gemm/gemv)
  reads a non-nested float32 absmax directly, and the outputs do not change (the tests
  compare them). It costs 3 more bytes per 64 weights, the price of trainable scales.
* ``Linear8bitLt`` (int8): ``SCB``, one float32 per output row (absmax / 127 scaling). It
  starts on ``weight.SCB`` and moves (the same tensor object) to ``state.SCB`` on the first
  forward; every forward reads it anew (``int8_scaled_mm``/``int8_mixed_scaled_mm`` on CPU,
  ``int8_mm_dequant`` on CUDA), so an in-place change is seen by the next forward.

On CPUs with AVX512-BF16, bitsandbytes 0.50 would repack a 4-bit layer for its fused
kernel and *copy* absmax into a bfloat16 transposed tensor the kernel reads instead:
perturbing the float32 scales would change nothing. Scale-trained layers therefore run
the plain path (see :func:`qzo.models.bnb.unpack_cpu_4bit`).

Names are ``<module path>.weight.absmax`` / ``<module path>.weight.SCB`` (peft's
``base_layer`` segment dropped), so the noise streams and a saved checkpoint do not
depend on which other tensors are trained or whether LoRA wraps the layer.
"""

from __future__ import annotations

from ..errors import QzoError
from ..models.bnb import float32_absmax, int8_row_scales, is_4bit
from ..noise.contract import stream_id
from ..zo.normalize import clip_grad  # the clip is the optimizer's (qzo.ZO(clip=)); importable here as before
from ..zo.params import Trainable
from .base import ModuleTargets, TargetError, target_kind, is_quantized, read_checkpoint, select_modules, unwrap_peft

__all__ = ["scales", "ScaleParams", "load_scales", "clip_grad"]

_SUFFIXES = (".weight.absmax", ".weight.SCB")


def _offloaded(module) -> bool:
    return module.weight.device.type == "meta"


@target_kind
class ScaleParams(ModuleTargets):
    """The quantization scales of chosen layers, as ZO trainables (a ``ParamSet``).

    ``save(path)`` writes them to safetensors; ``apply_to(model)`` or :func:`load_scales`
    puts them on a freshly loaded base. ``clip`` is the directional-derivative clip to use
    with them (QZO: 100), see :func:`clip_grad`.
    """

    kind = "scales"
    file_name = "scales.safetensors"

    @classmethod
    def build(cls, model, modules=None, clip=None) -> "ScaleParams":
        return scales(model, modules=modules, clip=clip)


def scales(model, modules=None, clip: float | None = None) -> ScaleParams:
    """The quantization scales of ``model``'s bitsandbytes layers as ZO trainables.

    Args:
        model: a model from ``qzo.load(..., quant="nf4" | "fp4" | "int8")`` (LoRA may wrap it).
        modules: ``None`` for every quantized linear layer, else module paths or fnmatch
            patterns (a whole path or a dotted suffix: ``"q_proj"``,
            ``"model.layers.0.*"``, ``"model.layers.1.mlp.down_proj"``).
        clip: directional-derivative clip carried to ``qzo.ZO`` (QZO uses 100); ``None``: none.

    Returns:
        :class:`ScaleParams`, one float32 tensor per layer: ``<path>.weight.absmax``
        (4-bit, one per 64 weights) or ``<path>.weight.SCB`` (int8, one per output row).
        Double-quantized layers are switched to float32 scales (same outputs), and 4-bit
        layers leave bitsandbytes' fused AVX512-BF16 CPU path, whose copy of the scales
        would not see the perturbations.
    """
    if clip is not None and not clip > 0:
        raise QzoError(f"qzo.scales: clip must be > 0 (QZO uses 100), got {clip}")
    model = unwrap_peft(model)
    chosen = select_modules(model, modules, lambda path, m: is_quantized(m), "qzo.scales", "quantized linear",
                            hint="load it with qzo.load(..., quant='nf4', 'fp4' or 'int8') to get bitsandbytes layers")

    items, paths = [], []
    for path, _, module in chosen:
        if _offloaded(module):
            raise TargetError(f"qzo.scales: {path} is offloaded (its weight is on the meta device); give the model "
                              "enough max_memory to keep trained layers on a real device")
        if is_4bit(module):
            name, tensor = f"{path}.weight.absmax", float32_absmax(module)
        else:
            name, tensor = f"{path}.weight.SCB", int8_row_scales(module, path)
        tensor.requires_grad_(False)
        module.qzo_target = "scales"  # qzo.dense refuses to replace a scale-trained layer
        items.append(Trainable(name, tensor, stream_id(name)))
        paths.append(path)
    return ScaleParams(items, model, paths, clip=clip)


def load_scales(model, checkpoint, clip: float | None = None) -> ScaleParams:
    """Put saved scales (a file from ``ScaleParams.save`` or a state dict) on ``model``.

    The layers are found from the names (``<path>.weight.absmax`` / ``.SCB``), so the
    checkpoint applies to any load of the same base with the same quantization.
    """
    state = read_checkpoint(checkpoint)
    bad = [k for k in state if not k.endswith(_SUFFIXES)]
    if bad or not state:
        raise TargetError(f"load_scales: {bad[:3] or 'an empty checkpoint'} are not scale names "
                          "(<module path>.weight.absmax or .weight.SCB); was it written by qzo.scales(...).save()?")
    paths = []
    for key in state:
        path = key.rsplit(".", 2)[0]
        if path not in paths:
            paths.append(path)
    params = scales(model, modules=paths, clip=clip)
    expected = {t.name for t in params}
    if expected != set(state):
        raise TargetError(f"load_scales: the checkpoint has {sorted(set(state) - expected)[:3]} but this model has "
                          f"{sorted(expected - set(state))[:3]}; load the base with the quantization it was trained on")
    params.load_state_dict(state)
    return params
