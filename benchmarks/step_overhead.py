"""What a ZO step costs beyond its forward passes, in time and memory (the memory contract).

On the demo model (SmolLM2-135M, NF4, LoRA r 8 on q,v), one fixed batch of the demo data:

* time ratio   = wall time of one SPSA step / wall time of its 2 forward passes alone
* memory ratio = peak memory of one SPSA step / peak memory of one inference forward

measured in one process, alternating the two (so drift hits both), median of N repeats.
Targets (issue 3): time ratio <= 1.10, memory ratio <= 1.05.

    python benchmarks/step_overhead.py [--repeats 7] [--batch 8]

Prints the table and writes benchmarks/results/step_overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, device_name, write_result  # noqa: E402

import qzo  # noqa: E402
from qzo.data.dataset import Batcher, ChatDataset, model_input_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    model, tok = qzo.load(args.model, quant="nf4")
    params = qzo.lora(model, r=8, target_modules=["q_proj", "v_proj"])
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-3), eps=1e-2)
    data = ChatDataset.from_jsonl(tok, "builtin:demo_train", max_len=96)
    device = model_input_device(model)
    batch = {k: v.to(device) for k, v in Batcher(data, args.batch, 0, tok.pad_token_id).batch(1).items()}
    closure = lambda: model(**batch).loss
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def forwards_only():
        with torch.no_grad():
            closure()
            closure()

    for _ in range(2):  # warm-up: allocator, thread pools, bitsandbytes dispatch
        forwards_only()
        opt.step(closure)

    fwd_times, step_times, fwd_peaks, step_peaks = [], [], [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        forwards_only()
        sync()
        fwd_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        opt.step(closure)
        sync()
        step_times.append(time.perf_counter() - t0)
        with PeakMemory() as m, torch.no_grad():
            closure()
        fwd_peaks.append(m.peak_bytes)
        with PeakMemory() as m:
            opt.step(closure)
        step_peaks.append(m.peak_bytes)

    fwd_t, step_t = statistics.median(fwd_times), statistics.median(step_times)
    fwd_m, step_m = max(fwd_peaks), max(step_peaks)
    result = {
        "device": device_name(),
        "model": args.model,
        "quant": "nf4",
        "batch": list(batch["input_ids"].shape),
        "trainable_values": params.numel,
        "repeats": args.repeats,
        "forwards_s": round(fwd_t, 4),
        "step_s": round(step_t, 4),
        "time_ratio": round(step_t / fwd_t, 4),
        "inference_peak_gib": round(fwd_m / 2**30, 4),
        "step_peak_gib": round(step_m / 2**30, 4),
        "memory_ratio": round(step_m / fwd_m, 4),
        "memory_measure": "peak GPU memory allocated" if torch.cuda.is_available() else "peak RSS (VmHWM reset per phase)",
        "targets": {"time_ratio": 1.10, "memory_ratio": 1.05},
    }
    path = write_result("step_overhead.json", result)
    print(f"device: {result['device']}")
    print(f"model {args.model} NF4, LoRA r8 q,v ({params.numel:,} values), batch {result['batch']}")
    print(f"{'':28}{'measured':>12}{'target':>10}")
    print(f"{'2 forwards alone (s)':28}{fwd_t:12.3f}")
    print(f"{'one SPSA step (s)':28}{step_t:12.3f}")
    print(f"{'time ratio':28}{result['time_ratio']:12.3f}{'<= 1.10':>10}")
    print(f"{'inference peak (GiB)':28}{result['inference_peak_gib']:12.3f}")
    print(f"{'step peak (GiB)':28}{result['step_peak_gib']:12.3f}")
    print(f"{'memory ratio':28}{result['memory_ratio']:12.3f}{'<= 1.05':>10}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
