"""Streaming 4-bit offload on this CPU: peak RSS and s/step of a ZO step with layers streamed from disk.

A random-init Llama (hidden 2048, MLP 5632, 12 layers, vocabulary 8192: ~25 MiB of 4-bit codes
a layer) is loaded in NF4 with LoRA r 8 on q,v, once whole in memory and once with its last
``--streamed`` decoder layers on disk (``device_map`` with ``model.layers.N: disk``), each in a
fresh process. Per run: the peak RSS of two SPSA steps at batch 4 x 128 (the kernel's
high-water mark, reset after the load), the s/step, and the packed bytes copied per
forward. The issue's bound for the streamed peak: the in-memory peak minus the offloaded
layers' packed bytes plus two layers (the one computing and the one being read ahead).

    python benchmarks/streaming.py [--streamed 8]
Results: benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

HIDDEN, MLP, LAYERS, VOCAB, BATCH, SEQ = 2048, 5632, 12, 8192, 4, 128
MiB = 2**20


def worker(streamed: int, folder: str) -> None:
    import time

    import torch
    from transformers import LlamaConfig

    import qzo
    from _common import PeakMemory

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=VOCAB, max_position_embeddings=SEQ, tie_word_embeddings=True)
    device_map = None
    if streamed:
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": "disk" if i >= LAYERS - streamed else "cpu" for i in range(LAYERS)})
    model, _ = qzo.load(cfg, "nf4", device_map=device_map, offload_folder=folder, seed=0)
    params = qzo.lora(model, r=8, target_modules=["q_proj", "v_proj"], seed=0)
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-3), eps=1e-2, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt.step(qzo.CausalLMLoss(model, batch))  # warm-up: allocator, noise cache
    from qzo.models.load import release_freed_memory

    release_freed_memory()
    layer = model.model.layers[0]
    import bitsandbytes as bnb

    layer_bytes = sum(m.weight.data.numel() for m in layer.modules() if isinstance(m, bnb.nn.Linear4bit))
    handle = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "qzo_streamed", None)
    before = handle.bytes_streamed if handle else 0
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        losses = [opt.step(qzo.CausalLMLoss(model, batch)) for _ in range(2)]
        wall = (time.perf_counter() - t0) / 2
    print(json.dumps({"streamed_layers": streamed, "peak_rss_mib": round(peak.peak_bytes / MiB, 1),
                      "s_per_step": round(wall, 3), "layer_packed_mib": round(layer_bytes / MiB, 2),
                      "offloaded_packed_mib": round((handle.stored_bytes if handle else 0) / MiB, 2),
                      "streamed_mib_per_forward": round((handle.bytes_streamed - before) / 4 / MiB, 2) if handle else 0,
                      "losses": losses}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(int(sys.argv[2]), sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streamed", type=int, default=8, help="decoder layers on disk (of 12)")
    args = ap.parse_args()
    from _common import device_name, write_result

    rows = []
    for streamed in (0, args.streamed):
        with tempfile.TemporaryDirectory() as folder:
            out = subprocess.run([sys.executable, __file__, "--worker", str(streamed), folder], capture_output=True,
                                 text=True)
        if out.returncode != 0:
            raise SystemExit(out.stdout[-2000:] + out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    whole, streamed = rows
    bound = whole["peak_rss_mib"] - streamed["offloaded_packed_mib"] + 2 * streamed["layer_packed_mib"]
    summary = {"device": device_name(), "model": f"random Llama, hidden {HIDDEN}, MLP {MLP}, {LAYERS} layers, "
               f"vocab {VOCAB}, NF4, LoRA r 8 on q,v", "batch": [BATCH, SEQ], "rows": rows,
               "bound_mib": round(bound, 1), "within_bound": streamed["peak_rss_mib"] <= bound,
               "same_losses": whole["losses"] == streamed["losses"]}
    write_result("streaming.json", summary)
    print(f"device: {summary['device']}; {summary['model']}, batch {BATCH} x {SEQ}")
    print(f"{'streamed layers':16}{'peak RSS MiB':>13}{'s/step':>8}{'offloaded MiB':>14}{'MiB/forward':>12}")
    for r in rows:
        print(f"{r['streamed_layers']:<16d}{r['peak_rss_mib']:13.1f}{r['s_per_step']:8.2f}"
              f"{r['offloaded_packed_mib']:14.1f}{r['streamed_mib_per_forward']:12.1f}")
    print(f"bound (in-memory peak - offloaded + 2 layers): {bound:.1f} MiB: "
          f"{'met' if summary['within_bound'] else 'NOT met'}; identical losses: {summary['same_losses']}")


if __name__ == "__main__":
    main()
