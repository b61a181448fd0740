"""The demo's held-out loss from a float32 vs a 16-bit GGUF cache folder, and NF4's own rounding noise.

qzo writes a converted GGUF as float16 (``qzo.load._cache_dtype``); older versions wrote
float32. This measures what that costs on the demo (SmolLM2-135M, 48 held-out chats, the
demo's eval settings), for the unquantized model and for NF4 on both CPU 4-bit paths, and
compares it with a random relative jitter of float16's size (+-2^-12) on the float32
linear weights: the noise any change below the NF4 step makes, since values near a code
boundary flip to the next code.

    python benchmarks/gguf_cache.py          # ~5 min on 2 cores; writes results/gguf_cache.json

The float32 folder is made here from the float16 one's source GGUF (not cached by qzo).
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import device_name, write_result  # noqa: E402

import qzo  # noqa: E402
from qzo.models.bnb import fused_cpu_4bit_available  # noqa: E402
from qzo.config.schema import DEFAULTS  # noqa: E402
from qzo.data.dataset import datasets_from_config, eval_loss  # noqa: E402
from qzo.models.load import _builtin_gguf, hf_model_path  # noqa: E402


def float32_folder(into: Path) -> Path:
    """The demo GGUF dequantized to a float32 folder (what qzo's cache held before)."""
    from transformers import AutoModelForCausalLM

    gguf = _builtin_gguf("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(into)
    for name in Path(hf_model_path("smollm2-135m")).iterdir():  # tokenizer and template from qzo's folder
        if name.suffix in (".json", ".jinja") and name.name not in ("config.json", "generation_config.json"):
            shutil.copy(name, into / name.name)
    return into


def jittered(folder: Path, seed: int, into: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, into)
    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith("proj.weight"):  # the layers NF4 quantizes
            state[key] = value * (1 + (torch.rand(value.shape, generator=g) * 2 - 1) * 2**-12)
    save_file(state, str(into / "model.safetensors"), metadata={"format": "pt"})
    return into


def held_out_loss(folder: Path, quant: str, fused: bool) -> float:
    model, tok = qzo.load(str(folder), quant, cpu_fused_4bit=fused)
    cfg = copy.deepcopy(DEFAULTS)
    _, held = datasets_from_config(cfg, tok)
    return eval_loss(model, held, cfg["train"]["eval_batch_size"], tok.pad_token_id)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="qzo-gguf-cache-"))
    try:
        f16 = Path(hf_model_path("smollm2-135m"))
        f32 = float32_folder(work / "float32")
        paths = [("none", False), ("nf4", False)] + ([("nf4", True)] if fused_cpu_4bit_available() else [])
        rows = []
        for quant, fused in paths:
            path = "fused" if fused else "plain"
            base = held_out_loss(f32, quant, fused)
            row = {"quant": quant, "cpu_path": path if quant != "none" else "-", "float32": round(base, 6),
                   "float16": round(held_out_loss(f16, quant, fused), 6)}
            if quant != "none":
                row["jitter_seed1"] = round(held_out_loss(jittered(f32, 1, work / f"j1-{path}"), quant, fused), 6)
                row["jitter_seed2"] = round(held_out_loss(jittered(f32, 2, work / f"j2-{path}"), quant, fused), 6)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"device: {device_name()}")
    print(f"{'quant':6}{'path':>7}{'float32':>11}{'float16':>11}{'change':>9}{'jitter 1':>10}{'jitter 2':>10}")
    for r in rows:
        jit = [f"{r[k] - r['float32']:+10.4f}" if k in r else f"{'-':>10}" for k in ("jitter_seed1", "jitter_seed2")]
        print(f"{r['quant']:6}{r['cpu_path']:>7}{r['float32']:11.6f}{r['float16']:11.6f}"
              f"{r['float16'] - r['float32']:+9.4f}{''.join(jit)}")
    path = write_result("gguf_cache.json", {
        "device": device_name(), "model": "smollm2-135m", "held_out": "builtin:demo_eval (48 chats)",
        "jitter": "float32 linear weights times (1 + U(-2^-12, 2^-12)), per element", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
