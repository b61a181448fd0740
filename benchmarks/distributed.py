"""Distributed ZO on this CPU: seconds per step with 1 and 2 processes, and the bytes ranks exchange.

Each configuration runs the demo model (SmolLM2-135M-Instruct, NF4, LoRA r 8 on q_proj and
v_proj: 460,800 values) on the demo chats at batch 8 for a few steps under ``torchrun``, one
thread per process, through the public API (``qzo.distributed.init_from_env`` and
``qzo.ZO(distributed=...)``). Modes:

    one process      the baseline, one thread
    data x2          2 ranks, each half of every batch (candidate_parallel 1)
    candidates x2    2 ranks, each half of every step's evaluations on the whole batch

Bytes per step are what this rank's collectives carried (``Distributed.bytes_sent``: the
loss all-reduces, the stop flag the trainer adds is not in this API loop), against what a
first-order DDP step all-reduces: the fp32 gradient of the same LoRA (4 bytes a value), and
the bf16 gradient of a full 7B fine-tune (2 bytes x 6.74e9). The table also says, on paper,
what a 100 ms round trip between machines adds per step: every collective of a step waits
for one exchange (gloo's ring over 2 ranks: about 2 round trips per all-reduce).

    python benchmarks/distributed.py [--steps 6] [--strategies spsa fzoo4]
Results: benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BATCH, MAX_LEN, LORA_VALUES, FULL_7B = 8, 96, 460_800, 6_738_415_616
RTT_S = 0.1
MODES = {"one process": (1, 1), "data x2": (2, 1), "candidates x2": (2, 2)}  # (processes, candidate_parallel)


def worker(strategy: str, steps: int, candidate_parallel: int, out: Path) -> None:
    """One rank of a configuration: train ``steps`` steps, rank 0 appends its timings to ``out``."""
    import torch

    torch.set_num_threads(1)
    import qzo
    from qzo.data.dataset import Batcher, ChatDataset

    dist = qzo.distributed.init_from_env(candidate_parallel=candidate_parallel)
    model, tok = qzo.load("smollm2-135m", quant="nf4", cpu_fused_4bit=False)
    params = qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=0)
    train = ChatDataset.from_jsonl(tok, "builtin:demo_train", MAX_LEN)
    batches = Batcher(train, BATCH, 0, tok.pad_token_id)
    strat = {"spsa": lambda: qzo.SPSA(), "fzoo4": lambda: qzo.FZOO(probes=4)}[strategy]()
    opt = qzo.ZO(params, strategy=strat, rule=qzo.SGD(lr=1e-3), eps=1e-2, seed=0, distributed=dist)
    rows = dist.rows(BATCH) if dist is not None else slice(None)
    walls = []
    for step in range(1, steps + 1):
        batch = {k: v[rows] for k, v in batches.batch(step).items()}
        t0 = time.perf_counter()
        opt.step(qzo.CausalLMLoss(model, batch))
        walls.append(time.perf_counter() - t0)
    if dist is None or dist.rank == 0:
        sent = dist.bytes_sent if dist is not None else 0
        calls = dist.collectives if dist is not None else 0
        with open(out, "a") as f:
            f.write(json.dumps({"walls": walls, "bytes_sent": sent, "collectives": calls, "steps": steps,
                                "forwards_per_step": strat.forwards_per_step}) + "\n")


def run_config(strategy: str, mode: str, steps: int) -> dict:
    procs, cp = MODES[mode]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.jsonl"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", __file__,
               "--worker", strategy, str(steps), str(cp), str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"{mode} {strategy} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        rec = json.loads(out.read_text().splitlines()[-1])
    timed = rec["walls"][1:]  # the first step pays the noise cache and allocator warm-up
    return {"strategy": strategy, "mode": mode, "processes": procs, "candidate_parallel": cp,
            "s_per_step": round(sum(timed) / len(timed), 3),
            "bytes_per_step": rec["bytes_sent"] / rec["steps"], "collectives_per_step": rec["collectives"] / rec["steps"],
            "forwards_per_step": rec["forwards_per_step"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, strategy, steps, cp, out = sys.argv
        return worker(strategy, int(steps), int(cp), Path(out))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--strategies", nargs="+", default=["spsa", "fzoo4"], choices=["spsa", "fzoo4"])
    args = ap.parse_args()
    from _common import device_name, write_result

    rows = []
    for strategy in args.strategies:
        for mode in MODES:
            print(f"run {strategy} {mode} ...", flush=True)
            rows.append(run_config(strategy, mode, args.steps))
    base = {r["strategy"]: r["s_per_step"] for r in rows if r["processes"] == 1}
    ddp_lora = LORA_VALUES * 4
    ddp_7b = FULL_7B * 2
    for r in rows:
        r["speedup"] = round(base[r["strategy"]] / r["s_per_step"], 2)
        # each collective of a step waits about 2 round trips on a 2-rank ring (reduce-scatter + all-gather)
        r["added_s_per_step_at_100ms_rtt"] = round(r["collectives_per_step"] * 2 * RTT_S, 2)
    summary = {"device": device_name(), "threads_per_process": 1,
               "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],  # other work on the machine
               "model": "SmolLM2-135M-Instruct NF4, LoRA r 8 q_proj,v_proj (460,800 values)", "batch": BATCH,
               "steps_timed": args.steps - 1, "ddp_lora_fp32_gradient_bytes": ddp_lora,
               "ddp_full_7b_bf16_gradient_bytes": ddp_7b, "rtt_s_on_paper": RTT_S, "rows": rows}
    write_result("distributed.json", summary)
    print(f"device: {summary['device']}; {summary['model']}, batch {BATCH}")
    print(f"{'strategy':9}{'mode':15}{'s/step':>8}{'speedup':>8}{'bytes/step':>11}{'vs DDP LoRA':>12}"
          f"{'vs DDP 7B':>11}{'+s at 100ms':>12}")
    for r in rows:
        b = r["bytes_per_step"]
        lora = f"1/{ddp_lora / b:,.0f}" if b else "-"
        full = f"1/{ddp_7b / b:.1e}" if b else "-"
        print(f"{r['strategy']:9}{r['mode']:15}{r['s_per_step']:8.2f}{r['speedup']:8.2f}{b:11.0f}{lora:>12}{full:>11}"
              f"{r['added_s_per_step_at_100ms_rtt']:12.2f}")
    print("DDP all-reduces the gradient every step: fp32 LoRA", f"{ddp_lora:,} bytes; bf16 full 7B {ddp_7b:,} bytes")


if __name__ == "__main__":
    main()
