"""Peak memory of a qzo step against inference and first-order QLoRA, and the planner's estimate.

Per model, in one process (the peak is reset before each phase, so phases do not see each
other's peaks; they run from the smallest expected to the largest):

* inference: one no-grad forward of the batch;
* qzo SPSA step and qzo GV step with a pool of 4 (LoRA r 8 on q,v, SGD);
* first-order QLoRA: peft LoRA on the same 4-bit base, gradient checkpointing, AdamW,
  one forward + backward + update: what a user would otherwise run;
* the planner (``qzo.plan``) for the same shape.

GPU mode (CUDA present): random-init NF4 models built from the configs of Llama-2-7B,
Llama-3.1-8B and Llama-2-13B (no weights needed: memory does not depend on their values),
batch 8 x 512, peak = ``torch.cuda.max_memory_allocated``. Llama-2-70B gets the planner's
row only: accelerate offloads bitsandbytes layers *unquantized*, so the 70B's offloaded part
needs ~120 GB of CPU RAM in bf16, more than the lent machine has; streaming 4-bit layers
from CPU is the work that would make that row measurable.

CPU mode (anywhere): peak RSS (the kernel's high-water mark, reset per phase) for the demo
model (SmolLM2-135M, real weights) and a 1B-shaped random-init Llama (Llama-3.2-1B's
config), at batch shapes a 2-core CPU finishes in minutes. RSS includes the Python and
torch runtime (``runtime_gib``, measured before the model is loaded), which the GPU's
allocated bytes do not; ``planner_gib`` is still the GPU-side estimate for the same shape.

    python benchmarks/memory.py [--cpu] [--models llama-2-7b,...] [--batch 8 --seq 512]
    python benchmarks/memory.py --planner-only     # the GPU models' planner rows, anywhere

Prints the table and writes benchmarks/results/memory.json (one row per model and method:
device, model, method, peak_gib, inference_peak_gib, planner_gib, s_per_step, ...). Rows
already in the file from another device are kept, so CPU and GPU runs add up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, PeakMemory, device_name, write_result  # noqa: E402

import qzo  # noqa: E402
from qzo.load import hf_model_path, release_freed_memory  # noqa: E402
from qzo.plan import PRESETS, plan  # noqa: E402

GiB = 2**30
GPU_MODELS = ["llama-2-7b", "llama-3.1-8b", "llama-2-13b", "llama-2-70b"]
GPU_TARGET_GIB = {"llama-2-7b": 4.5, "llama-3.1-8b": 5.5, "llama-2-13b": 8.0}
#: published minimums a user would compare with (GB as published): Unsloth's QLoRA
#: requirements table, and ZO2 (offloaded ZO) for OPT-6.7B / OPT-13B
PUBLISHED = {
    "llama-2-7b": "Unsloth QLoRA 7B: 5 GB; ZO2 OPT-6.7B: 4.99 GB",
    "llama-3.1-8b": "Unsloth QLoRA 8B: 6 GB",
    "llama-2-13b": "Unsloth QLoRA 14B: 8.5 GB; ZO2 OPT-13B: 6.18 GB",
    "llama-2-70b": "Unsloth QLoRA 70B: 41 GB",
}
# Llama-3.2-1B's shape: hidden, intermediate, layers, heads, kv heads, vocab, tied
ONE_B = (2048, 8192, 16, 32, 8, 128256, True)
METHODS = ["inference", "qzo_spsa", "qzo_gv4", "first_order_qlora"]


def llama_config(shape):
    from transformers import LlamaConfig

    h, i, n, heads, kv, vocab, tied = shape
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
                       max_position_embeddings=4096)


def random_nf4_on_gpu(config, dtype=torch.bfloat16):
    """A random-init model with every decoder linear as a bitsandbytes NF4 layer, on the GPU.

    Built in ``dtype`` on the GPU, then each linear is quantized and its full-precision
    weight freed, one at a time (a 13B peaks at its bf16 size while building; the peaks
    measured later are reset after this).
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4", device="meta")
        weight = module.weight.data
        module.weight = None
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4").to("cuda")
        del weight
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, layer)
        torch.cuda.empty_cache()
    model.eval().requires_grad_(False)
    return model


def load_model(name: str, device: str):
    """``(model, tokens of the batch vocabulary size)`` for a benchmark model name."""
    if name == "smollm2-135m":
        model, tok = qzo.load(name, "nf4", cpu_fused_4bit=False)  # the fused CPU kernel has no backward
        return model, len(tok)
    if name == "1b-shaped":
        config = llama_config(ONE_B)
        model, _ = qzo.load(config, "nf4", cpu_fused_4bit=False)
        return model, config.vocab_size
    config = llama_config(PRESETS[name])
    return random_nf4_on_gpu(config), config.vocab_size


def _batch(vocab: int, batch: int, seq: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _timed(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(name: str, batch: int, seq: int, methods: list[str]) -> list[dict]:
    """Every method's peak and time for one model, in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with PeakMemory() as runtime:
        pass
    model, vocab = load_model(name, device)
    if device == "cpu":
        release_freed_memory()  # loading's freed buffers would otherwise sit in RSS under every phase
    from qzo.data import model_input_device

    data = _batch(vocab, batch, seq, model_input_device(model))
    rows, peaks = [], {}
    params = qzo.lora(model, r=8, target_modules=["q_proj", "v_proj"])
    loss = qzo.CausalLMLoss(model, data)
    for method in methods:
        if method == "inference":
            def work():
                with torch.no_grad():
                    loss()
        elif method.startswith("qzo_"):
            strategy = qzo.SPSA() if method == "qzo_spsa" else qzo.GV(pool=4)
            opt = qzo.ZO(params, strategy=strategy, rule=qzo.SGD(lr=1e-6), eps=1e-3)
            work = lambda opt=opt: opt.step(loss)
        else:
            work = _first_order_step(model, params, data)
        work()  # warm-up: allocator, kernels, lazy quantization state
        if device == "cpu":
            release_freed_memory()
        with PeakMemory() as m:
            seconds = _timed(work)
        peaks[method] = m.peak_bytes
        rows.append({"method": method, "peak_gib": round(m.peak_bytes / GiB, 3), "s_per_step": round(seconds, 3)})
    for row in rows:
        row["inference_peak_gib"] = round(peaks.get("inference", 0) / GiB, 3) if "inference" in peaks else None
        row["runtime_gib"] = round(runtime.peak_bytes / GiB, 3) if device == "cpu" else 0.0
    return rows


def _first_order_step(model, params, data):
    """peft LoRA + gradient checkpointing + AdamW on the same base: one forward, backward, update."""
    tensors = [t.tensor for t in params]
    leaves = []
    for module in model.modules():  # the Parameters whose .data the trainables are
        for p in module.parameters(recurse=False):
            if any(p.data.data_ptr() == t.data_ptr() for t in tensors):
                p.requires_grad_(True)
                leaves.append(p)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW(leaves, lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**data).loss.backward()
        opt.step()

    return step


def planner_gib(name: str, batch: int, seq: int, method: str, gpu=None, dtype: str = "bfloat16") -> float | None:
    """The planner's GPU peak for a row (``None`` for first-order: the planner models ZO steps)."""
    source = name if name in PRESETS else llama_config(ONE_B) if name == "1b-shaped" else name
    if name == "smollm2-135m":
        source = hf_model_path(name)
    if method not in ("qzo_spsa", "qzo_gv4", "inference"):
        return None
    p = plan(source, "nf4", gpu=gpu, batch=batch, seq=seq, lora_r=0 if method == "inference" else 8, dtype=dtype)
    return round(p.gpu_total() / GiB, 3)  # offloaded: what stays on the GPU, one streamed layer in flight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the CPU rows even when a GPU is present")
    ap.add_argument("--models", help="comma-separated; default: the GPU set on CUDA, else smollm2-135m,1b-shaped")
    ap.add_argument("--batch", type=int, help="default 8 on GPU, 8 (demo) / 2 (1B) on CPU")
    ap.add_argument("--seq", type=int, help="default 512 on GPU, 72 (demo) / 128 (1B) on CPU")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--planner-only", action="store_true",
                    help="only the planner's rows for the GPU models (what a machine without a GPU can give)")
    args = ap.parse_args()

    gpu = torch.cuda.is_available() and not args.cpu
    if args.planner_only:
        gpu, args.models = True, args.models or ",".join(GPU_MODELS)
    models = args.models.split(",") if args.models else (GPU_MODELS if gpu else ["smollm2-135m", "1b-shaped"])
    methods = args.methods.split(",")
    device = device_name() if gpu or not torch.cuda.is_available() else "CPU (GPU present, --cpu)"
    rows = []
    for name in models:
        batch = args.batch or (8 if gpu or name == "smollm2-135m" else 2)
        seq = args.seq or (512 if gpu else 72 if name == "smollm2-135m" else 128)
        if args.planner_only or (gpu and name == "llama-2-70b"):
            measured = []  # see the module docstring: planner row only
        else:
            print(f"measuring {name} (batch {batch} x {seq}) ...", flush=True)
            measured = measure(name, batch, seq, methods)
        for method in methods:
            row = next((r for r in measured if r["method"] == method), {"method": method, "peak_gib": None,
                                                                         "s_per_step": None, "inference_peak_gib": None})
            budget = "20GiB" if name == "llama-2-70b" else None
            row.update({"device": device if measured else "planner only (not measured)", "model": name,
                        "batch": [batch, seq],
                        "planner_gib": planner_gib(name, batch, seq, method, budget, "bfloat16" if gpu else "float32"),
                        "published": PUBLISHED.get(name), "target_gib": GPU_TARGET_GIB.get(name) if gpu else None})
            if row["peak_gib"] and row.get("inference_peak_gib"):
                row["ratio_to_inference"] = round(row["peak_gib"] / row["inference_peak_gib"], 3)
            rows.append(row)

    print(f"device: {device}")
    head = f"{'model':14}{'method':19}{'batch':>9}{'peak GiB':>10}{'x infer':>9}{'planner':>9}{'s/step':>9}"
    print(head)
    for r in rows:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"
        print(f"{r['model']:14}{r['method']:19}{'x'.join(map(str, r['batch'])):>9}{fmt(r['peak_gib'], '.3f'):>10}"
              f"{fmt(r.get('ratio_to_inference'), '.3f'):>9}{fmt(r['planner_gib'], '.3f'):>9}"
              f"{fmt(r['s_per_step'], '.2f'):>9}")
    if not gpu:
        print("peak = process peak RSS (includes the runtime: "
              + ", ".join(f"{r['model']} {r['runtime_gib']:.2f} GiB" for r in rows if r.get("method") == "inference")
              + "); planner = GPU-side estimate for the same shape")
    for name in models:
        if name in PUBLISHED:
            print(f"published, {name}: {PUBLISHED[name]}")

    path = RESULTS / "memory.json"
    kept = []
    if path.is_file():  # rows from other devices stay (CPU and GPU runs add up)
        mine = {(r["model"], r["method"]) for r in rows}
        kept = [r for r in json.loads(path.read_text())["rows"] if (r["model"], r["method"]) not in mine]
    write_result("memory.json", {"rows": kept + rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
