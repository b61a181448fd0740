"""Every touch of bitsandbytes' internals in qzo, in one module: what a layer is, its codes, its scales.

The rest of qzo asks here (``is_quantized``, ``is_4bit``, ``four_bit_linears``, the one
dequantizer ``dequantized_weight``, ``packed_codes`` / ``set_packed_codes`` for streaming,
``float32_absmax`` / ``int8_row_scales`` for trained scales), so a bitsandbytes release that
moves an attribute is mended in one file. Most of the module is the choice of CPU path:

bitsandbytes 0.50 has two CPU paths for a ``Linear4bit``:

* **plain**: dequantize the 4-bit codes with their float32 block scales, then one matmul in
  the compute dtype. Every CPU runs it.
* **fused**: on CPUs with AVX512-BF16, bitsandbytes *repacks* a layer for a fused bf16
  kernel (``_convert_weight_packed_for_cpu``): the codes are re-tiled and the block scales
  are replaced by a transposed bfloat16 copy. The kernel casts activations to bf16 whatever
  the compute dtype says, and it has no backward. Measured 1.4x faster forwards on the demo.

Left alone, bitsandbytes repacks a layer inside its **first** no-grad forward, so a loaded
model's first forward ran the plain path and every later one the fused path, with
different numerics (10.864558 vs 10.864559 on a tiny Llama's loss; 98% of a dense slice's
logits moved by up to 3.3e-3). qzo therefore decides the path when it loads a model
(:func:`choose_cpu_path`): every eligible layer is repacked at once, or the fused path is
switched off for good. From the first forward on, the model computes one function.

``QZO_CPU_4BIT=plain`` in the environment makes qzo treat the CPU as one without
AVX512-BF16 (the plain path everywhere), which is how the suite checks the other kind of
CPU on a machine that has the extension.

This module also keeps bitsandbytes' "Failed to load CPU gemm_4bit_forward from
kernels-community" warning out of the user's way: that faster kernel is downloaded from
the Hugging Face hub at run time, which qzo never does (runs must work offline), and
bitsandbytes falls back to its own fused kernel, which is what runs.
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import TargetError

__all__ = ["QUANTS", "is_quantized", "is_4bit", "is_quantized_tensor", "four_bit_linears", "packed_codes",
           "set_packed_codes", "float32_absmax", "int8_row_scales", "dequantized_weight", "PLAIN_ENV",
           "plain_path_forced", "fused_cpu_4bit_available", "choose_cpu_path", "unpack_cpu_4bit", "is_packed",
           "quiet_hub_kernel_warning"]

#: environment variable: ``plain`` makes qzo run the plain CPU 4-bit path even where the fused one exists
PLAIN_ENV = "QZO_CPU_4BIT"

_BLOCK_N = 32  # bitsandbytes' packed layout tiles output rows in blocks of 32


def quiet_hub_kernel_warning() -> None:
    """Drop bitsandbytes' warning about the hub kernel it cannot download (see the module docs).

    Must run before bitsandbytes is first imported: the warning is logged at import time.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )


def plain_path_forced() -> bool:
    """Whether ``QZO_CPU_4BIT=plain`` asks for the plain path whatever the CPU (how a CPU without AVX512-BF16 is tested)."""
    return os.environ.get(PLAIN_ENV, "").strip().lower() == "plain"


def fused_cpu_4bit_available() -> bool:
    """Whether this CPU runs bitsandbytes' fused AVX512-BF16 4-bit kernel (and ``QZO_CPU_4BIT`` allows it)."""
    if plain_path_forced():
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def is_packed(module) -> bool:
    """Whether a ``Linear4bit`` holds bitsandbytes' fused-CPU (repacked) layout."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _packable(module) -> bool:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or weight.device.type != "cpu" or len(state.shape) != 2:
        return False
    rows, cols = state.shape
    # what bitsandbytes' repacking needs: 32-row tiles, whole scale blocks along each row
    return rows % _BLOCK_N == 0 and cols % state.blocksize == 0


def choose_cpu_path(model, fused: bool) -> int:
    """Fix the CPU path of every 4-bit layer of ``model`` now; returns how many layers run fused.

    ``fused=True`` repacks each CPU layer the fused kernel can take (its output size a
    multiple of 32, its input size of the scale block) when the CPU has AVX512-BF16; every
    other layer is held on the plain path, so no forward repacks anything later.
    ``state_dict()`` on a repacked layer would un-pack it in place and leave its scales transposed (logits off by ~50 measured on the
    demo); the packed state is restored after each call, so the live model never changes.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    fused = fused and fused_cpu_4bit_available()
    count = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        if not (fused and (is_packed(module) or _packable(module))):
            unpack_cpu_4bit(module)
            continue
        module.support_avx512bf16_for_cpu = True
        if not is_packed(module):
            weight = module.weight
            with torch.no_grad():
                weight.data, state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
            weight.quant_state = state
            module.quant_state = state
        if not getattr(module, "_qzo_keeps_packed_state", False):
            module._save_to_state_dict = _keep_packed_state(module, module._save_to_state_dict)
            module._qzo_keeps_packed_state = True
        count += 1
    return count


def _keep_packed_state(module, save):
    def guarded(destination, prefix, keep_vars):
        weight = module.weight
        data, state = weight.data, weight.quant_state
        fields = dict(state.__dict__) if state is not None else None
        try:
            save(destination, prefix, keep_vars)
        finally:
            weight.data = data
            if state is not None:
                state.__dict__.clear()
                state.__dict__.update(fields)
                weight.quant_state = state

    return guarded


def unpack_cpu_4bit(module) -> None:
    """Put a bitsandbytes ``Linear4bit`` back on its plain layout and keep it there.

    A repacked layer's fused kernel reads only its transposed bfloat16 copy of the block
    scales, so a trainable holding the float32 scales would be perturbed with no effect on
    the output, and a dense slice would dequantize from a layout it does not expect. This
    turns the fused path off for the layer (``support_avx512bf16_for_cpu``, the switch its
    forward checks) and, if the layer was repacked, undoes it: the weight through
    bitsandbytes' own inverse, the block scales by transposing the packed copy back to
    float32 (bitsandbytes' inverse leaves non-nested scales transposed and re-quantizes
    nested ones). The scales keep the bfloat16 rounding of the packed copy: load with
    ``cpu_fused_4bit=False`` (the trainer does, when it trains scales or dense slices) to
    keep the full-precision ones.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    if not is_packed(module):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    state = weight.quant_state
    packed_absmax = state.absmax  # [K / blocksize, N] bfloat16
    state.original_nested = False  # keep the inverse from re-quantizing the scales
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax = packed_absmax.T.reshape(-1).to(torch.float32).contiguous()
    state.nested, state.offset, state.state2 = False, None, None
    weight.data = data
    weight.quant_state = state
    module.quant_state = state


#: what ``model.quant`` takes: bitsandbytes' 4-bit NormalFloat and FloatPoint, LLM.int8(), or no quantization
QUANTS = ("nf4", "fp4", "int8", "none")


def is_quantized(module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit (``Linear4bit``) or 8-bit (``Linear8bitLt``) linear layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # without bitsandbytes nothing can be quantized
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_4bit(module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (NF4 or FP4)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def is_quantized_tensor(tensor) -> bool:
    """Whether ``tensor`` is a bitsandbytes quantized parameter (4-bit codes or int8 weights)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(tensor, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def four_bit_linears(module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, layer)`` of every bitsandbytes ``Linear4bit`` inside ``module`` (what streaming offload moves)."""
    return [(name, m) for name, m in module.named_modules() if is_4bit(m)]


def packed_codes(module) -> torch.Tensor:
    """A ``Linear4bit``'s packed 4-bit codes (the bytes streaming offload stores away from the device)."""
    return module.weight.data


def set_packed_codes(module, codes: torch.Tensor) -> None:
    """Put ``codes`` (or an empty tensor: the codes live elsewhere for now) in as a ``Linear4bit``'s codes.

    Only the storage changes: the ``Params4bit`` and its ``quant_state`` (scales, shape, blocksize)
    stay, so the layer computes with whatever codes it holds when it runs.
    """
    module.weight.data = codes


def dequantized_weight(module) -> torch.Tensor:
    """The float32 weight a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` computes with, from its current scales.

    The one dequantizer of qzo (dense slices start from it, merged exports fold it): 4-bit
    through ``dequantize_4bit`` on the plain layout (a repacked layer is put back first); int8
    through bitsandbytes' own row-wise dequantization of its codes, or the weight itself when
    the layer holds no int8 codes yet (``has_fp16_weights``, or not quantized).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    if isinstance(module, bnb.nn.Linear4bit):
        unpack_cpu_4bit(module)  # the repacked layout is not what dequantize_4bit reads
        return F.dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.float32)
    state = module.state
    cb = state.CB if state.CB is not None else module.weight.CB
    scb = state.SCB if state.SCB is not None else module.weight.SCB
    if state.has_fp16_weights or cb is None or scb is None:
        return module.weight.data.to(torch.float32)
    return F.int8_vectorwise_dequant(cb, scb).to(torch.float32)


def float32_absmax(module) -> torch.Tensor:
    """A ``Linear4bit``'s block scales as a float32, non-nested tensor that its forward reads (what
    ``qzo.scales`` trains): a double-quantized layer is switched once to the dequantized scales."""
    unpack_cpu_4bit(module)  # the fused CPU kernel would read a bf16 copy instead
    state = module.weight.quant_state
    if state.nested:
        from bitsandbytes.functional import dequantize_blockwise

        absmax = dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        state.absmax = absmax.to(torch.float32).contiguous()
        state.nested, state.offset, state.state2 = False, None, None
    elif state.absmax.dtype != torch.float32 or not state.absmax.is_contiguous():
        state.absmax = state.absmax.to(torch.float32).contiguous()
    module.quant_state = state  # Linear4bit keeps a second reference; keep both on one object
    return state.absmax


def int8_row_scales(module, path: str) -> torch.Tensor:
    """A ``Linear8bitLt``'s float32 row scales (``SCB``) that its forward reads; refuses layers without them."""
    if module.state.has_fp16_weights:
        raise TargetError(f"qzo.scales: {path} keeps fp16 weights (has_fp16_weights=True) and re-quantizes them on "
                          "every forward, so its scales cannot be trained; load it with qzo.load(..., quant='int8')")
    scb = module.state.SCB if module.state.SCB is not None else module.weight.SCB
    if scb is None:
        raise TargetError(f"qzo.scales: {path} is not quantized yet (no SCB); move the model to its device first, "
                          "or load it with qzo.load(..., quant='int8')")
    if scb.dtype != torch.float32 or not scb.is_contiguous():
        layout = "contiguous" if scb.is_contiguous() else "strided"
        raise TargetError(f"qzo.scales: {path}.SCB is {scb.dtype} {layout}; expected the contiguous float32 "
                          "row scales bitsandbytes makes")
    return scb
