"""Forward time of the demo model on bitsandbytes' two CPU 4-bit paths: plain (dequantize + matmul) vs fused bf16.

The demo model (SmolLM2-135M-Instruct, NF4, LoRA r 8 on q,v) on demo batches (``qzo.CausalLMLoss``,
logits at labelled positions only), batch 4 and 8, the mean of 4 timed forwards after one
warm-up, for each path ``qzo.load`` can fix (``cpu_fused_4bit``). The fused path needs a CPU
with AVX512-BF16; elsewhere only the plain row is measured.

    python benchmarks/cpu_4bit_paths.py     # ~2 min on 2 cores; writes results/cpu_4bit_paths.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import device_name, write_result  # noqa: E402

import qzo  # noqa: E402
from qzo.models.bnb import fused_cpu_4bit_available  # noqa: E402
from qzo.data.dataset import Batcher, ChatDataset  # noqa: E402

BATCHES, TIMED = (4, 8), 4


def seconds_per_forward(fused: bool) -> dict[int, float]:
    model, tok = qzo.load("smollm2-135m", quant="nf4", cpu_fused_4bit=fused)
    qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=0)
    train = ChatDataset.from_jsonl(tok, "builtin:demo_train", 96)
    out = {}
    with torch.no_grad():
        for batch in BATCHES:
            batches = Batcher(train, batch, 0, tok.pad_token_id)
            qzo.CausalLMLoss(model, batches.batch(1))()  # warm-up
            start = time.perf_counter()
            for step in range(2, 2 + TIMED):
                qzo.CausalLMLoss(model, batches.batch(step))()
            out[batch] = (time.perf_counter() - start) / TIMED
    return out


def main() -> None:
    paths = ["plain"] + (["fused"] if fused_cpu_4bit_available() else [])
    rows = []
    for path in paths:
        for batch, secs in seconds_per_forward(path == "fused").items():
            rows.append({"path": path, "batch": batch, "s_per_forward": round(secs, 3)})
    print(f"device: {device_name()}; {torch.get_num_threads()} threads")
    print(f"{'path':8}{'batch':>6}{'s/forward':>11}{'vs plain':>10}")
    plain = {r["batch"]: r["s_per_forward"] for r in rows if r["path"] == "plain"}
    for r in rows:
        r["vs_plain"] = round(r["s_per_forward"] / plain[r["batch"]], 2)
        print(f"{r['path']:8}{r['batch']:6d}{r['s_per_forward']:11.3f}{r['vs_plain']:10.2f}")
    path = write_result("cpu_4bit_paths.json", {"device": device_name(), "threads": torch.get_num_threads(),
                                                "model": "smollm2-135m nf4, LoRA r 8 q,v", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
