"""A random-init causal LM built directly in 4-bit on its device, one decoder layer at a time.

The GPU memory rows (``benchmarks/memory.py``, ``benchmarks/pool_batched.py``) need 7B-70B
shapes with no weights to download, and memory does not depend on the weights' values. The
ordinary way, ``qzo.load(config)``, random-inits the whole model in 16 bits on the host,
saves it and quantizes it while reading it back: 13.5 GB of bf16 host RAM and disk for a 7B,
~140 GB for a 70B, more than the lent machine's 128 GiB host has. Here the skeleton is built
on the meta device (no storage), and each decoder linear becomes a bitsandbytes
``Params4bit`` quantized from a random normal weight made on the device *for that linear
only* (``bitsandbytes.functional.quantize_4bit``, the call ``Params4bit.to(device)`` makes when
transformers quantizes a checkpoint): at most one linear exists in 16 bits at any moment
(470 MiB for a 70B's MLP), never a layer, never the model. The embeddings, norms and LM head
(which bitsandbytes leaves in 16 bits anyway) are made in place.

Layers listed in ``host_layers`` get their 4-bit codes copied straight into host memory
(pinned when the device is a GPU) while their quantization state stays on the device: what
``qzo.models.streaming`` streams. Hand such a model to :func:`stream` with the plan those layers
came from; :func:`streaming_plan` derives that plan from a ``max_memory`` exactly as
``qzo.load`` does for a model folder (accelerate's map sized by quantized bytes, then
``qzo.models.streaming.plan_streaming``).

The weights are reproducible: :func:`random_weight` is a function of (seed, module name),
so a test can build the same model the ordinary way and compare forwards
(``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch

__all__ = ["build_4bit", "random_weight", "streaming_plan", "stream", "packed_bytes", "sixteen_bit_linears"]


def _default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def random_weight(name: str, shape, dtype: torch.dtype, device, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    """``N(0, std)`` of ``shape``, a function of ``(seed, name)`` alone: made on ``device`` by its own generator.

    Different devices draw different numbers for the same seed (CPU and CUDA generators
    differ); on one device the same name always gives the same tensor.
    """
    device = torch.device(device)
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")
    g = torch.Generator(device=device).manual_seed(key)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)


def _quantize(weight: torch.Tensor, quant: str, double_quant: bool):
    import bitsandbytes as bnb

    return bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=quant,
                                        quant_storage=torch.uint8)


def build_4bit(config, quant: str = "nf4", *, double_quant: bool = False, dtype: torch.dtype | None = None,
               device=None, host_layers=(), seed: int = 0, log=None):
    """A random-init ``AutoModelForCausalLM`` of ``config`` whose decoder linears are bitsandbytes 4-bit.

    Args:
        config: a transformers config of a decoder with ``model.layers`` (Llama-style).
        quant: ``nf4`` or ``fp4``.
        double_quant: quantize the block scales too (bitsandbytes' compress_statistics).
        dtype: compute dtype and dtype of the unquantized parts; default bfloat16 on CUDA,
            float32 on CPU (what ``qzo.load`` picks).
        device: where the model runs; default ``cuda:0`` when there is a GPU, else the CPU.
        host_layers: decoder layer indices whose 4-bit codes go to host memory (pinned on
            CUDA) for :func:`stream`; their quantization state stays on ``device``.
        seed: weights are :func:`random_weight` of ``(seed, module name)``.
        log: called with a progress line every 10 layers (``None``: quiet).

    Returns:
        The model in eval mode, every weight frozen, ``is_loaded_in_4bit`` set (peft's
        4-bit LoRA layers), the CPU 4-bit path fixed as ``qzo.load`` fixes it.
    """
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qzo.models.bnb import choose_cpu_path

    if quant not in ("nf4", "fp4"):
        raise ValueError(f"build_4bit makes nf4 or fp4 models, not {quant!r}")
    device = torch.device(device) if device is not None else _default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    host_layers = set(host_layers)
    pin = device.type == "cuda"
    with init_empty_weights():  # parameters on meta (no storage); buffers (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()
    layers = model.model.layers
    if host_layers - set(range(len(layers))):
        raise ValueError(f"host_layers {sorted(host_layers - set(range(len(layers))))} are not decoder layers")

    def make(name: str, module: torch.nn.Module, on_host: bool) -> None:
        """Give ``module`` (a meta-device module) real parameters; a decoder Linear becomes 4-bit."""
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, bnb.nn.Linear4bit):
                continue
            if isinstance(child, torch.nn.Linear) and child is not head:
                w = random_weight(f"{full}.weight", (child.out_features, child.in_features), dtype, device, seed)
                codes, state = _quantize(w, quant, double_quant)
                del w  # the only 16-bit copy of this linear
                if on_host:
                    host = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=pin)
                    host.copy_(codes)
                    codes = host
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant,
                                          quant_storage=torch.uint8, device="meta")
                layer.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state, blocksize=64,
                                                 compress_statistics=double_quant, quant_type=quant,
                                                 quant_storage=torch.uint8, module=layer, bnb_quantized=True)
                layer.quant_state = state
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype, device=device),
                                                    requires_grad=False)
                setattr(module, child_name, layer)
                continue
            make(full, child, on_host)
        for pname, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            full = f"{name}.{pname}" if name else pname
            if "norm" in name.rsplit(".", 1)[-1] or p.dim() == 1:
                value = torch.ones(p.shape, dtype=dtype, device=device)  # RMSNorm weights start at 1
            else:  # embeddings, LM head
                value = random_weight(full, tuple(p.shape), dtype, device, seed)
            module._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[bname] = b.to(device)

    base = model.model
    for child_name, child in base.named_children():
        if child is layers:
            continue
        make(f"model.{child_name}", child, False)
    for i, layer in enumerate(layers):
        make(f"model.layers.{i}", layer, i in host_layers)
        if log is not None and (i + 1) % 10 == 0:
            log(f"built {i + 1} of {len(layers)} layers")
    if head is not None and getattr(config, "tie_word_embeddings", False):
        head.weight = model.get_input_embeddings().weight
    elif head is not None:
        head.weight = torch.nn.Parameter(random_weight("lm_head.weight", tuple(head.weight.shape), dtype, device, seed),
                                         requires_grad=False)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"build_4bit left parameters on meta: {missing[:5]}")
    model.is_loaded_in_4bit = True
    model.eval()
    model.requires_grad_(False)
    if device.type == "cpu":
        choose_cpu_path(model, False)  # the plain dequantize-then-matmul path, as qzo.load's default
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return model


def packed_bytes(model, layers=None) -> int:
    """Bytes of 4-bit codes held by the decoder layers (``layers``: those indices only), wherever they live."""
    import bitsandbytes as bnb

    total = 0
    for i, layer in enumerate(model.model.layers):
        if layers is not None and i not in layers:
            continue
        for m in layer.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                total += m.weight.data.numel() * m.weight.data.element_size()
    return total


def sixteen_bit_linears(model) -> list[str]:
    """Decoder linears that hold a floating-point weight (none should: every one is 4-bit codes)."""
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and m.weight.is_floating_point()]


def streaming_plan(config, max_memory: dict, quant: str = "nf4", dtype: torch.dtype | None = None):
    """``qzo.models.streaming.StreamPlan`` for ``config`` under ``max_memory``, as ``qzo.load`` would make it.

    accelerate's ``"auto"`` map sized by quantized bytes (``qzo.load.quantized_device_map``,
    which reads the config from a folder: a temporary one holding only ``config.json``), then
    ``qzo.models.streaming.plan_streaming`` on it. ``None`` when everything fits.
    """
    from qzo.models.load import quantized_device_map
    from qzo.models.streaming import plan_streaming

    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with tempfile.TemporaryDirectory(prefix="qzo-config-") as folder:
        config.save_pretrained(folder)
        device_map = quantized_device_map(Path(folder), quant, dtype, max_memory)
    return plan_streaming(device_map, lambda: device_map, lambda: config.num_hidden_layers)


def stream(model, plan, folder=None):
    """Start streaming ``plan``'s layers of a model from :func:`build_4bit` (``host_layers=plan.layers``)."""
    from qzo.models.streaming import attach_streaming

    return attach_streaming(model, plan, folder)
