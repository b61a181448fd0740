"""Does ``optim.lr: auto`` land near the lr a sweep finds? Two targets whose best lrs differ ~27x.

Issue 34, lever 3. The demo recipe (SmolLM2-135M-Instruct, NF4, SPSA, batch 4 x 96, eps 1e-2,
seed 0) through the public CLI, for two kinds of trainables:

    lora_b   LoRA r 8 on q,v, B factors only (the demo's default; swept best 8e-3 in
             results/convergence.json at 2,000 forwards)
    norms    the 61 normalization gains (targets.norms: all, no LoRA)

For each: one ``qzo train --set optim.lr=auto`` (its ``auto_lr.json``: the range test's lrs,
losses and the chosen lr), and an lr sweep over a grid of 5 values, a factor 2 apart, each
trained for ``--forwards`` forwards; the swept best is the lowest final held-out loss among
runs that did not blow up (held-out above 1.1x the start). The check: chosen / best within
[1/2, 2]. Results accumulate in ``results/auto_lr.json`` (finished runs are skipped).

    nice -n 19 python benchmarks/auto_lr.py [--forwards 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, device_name  # noqa: E402

CASES = {
    "lora_b": ([], [2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]),
    "norms": (["targets.lora=false", "targets.norms=all", "optim.noise_scale=null"],
              [7.5e-5, 1.5e-4, 3e-4, 6e-4, 1.2e-3]),
}


def train(case: str, lr, forwards: int, threads: int) -> dict:
    """One CLI run; its held-out curve, and the range test's record for lr auto."""
    out = Path(tempfile.mkdtemp(prefix=f"auto-lr-{case}-")) / "run"
    cmd = [sys.executable, "-m", "qzo", "train", "smollm2-135m/demo", "--no-progress", "--set", f"out_dir={out}",
           "--set", f"train.forwards={forwards}", "--set", f"train.eval_every={10**6}", "--set", f"optim.lr={lr}"]
    for item in CASES[case][0]:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    row = {"case": case, "lr": lr, "forwards": forwards, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode:
        row["error"] = proc.stderr.strip().splitlines()[-1:]
    else:
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        row["held_out"] = [round(e["eval_loss"], 4) for e in evals if e.get("eval_loss") is not None]
        if lr == "auto":
            row["search"] = json.loads((out / "auto_lr.json").read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    return row


def summarize(rows: list[dict]) -> dict:
    table = {}
    for case in CASES:
        auto = next((r for r in rows if r["case"] == case and r["lr"] == "auto" and "search" in r), None)
        swept = [r for r in rows if r["case"] == case and r["lr"] != "auto" and r.get("held_out")]
        stable = [r for r in swept if r["held_out"][-1] == r["held_out"][-1] and r["held_out"][-1] <= 1.1 * r["held_out"][0]]
        best = min(stable, key=lambda r: r["held_out"][-1]) if stable else None
        chosen = auto["search"]["lr"] if auto else None
        table[case] = {"chosen_lr": chosen, "blowup_lr": auto and auto["search"]["blowup_lr"],
                       "test_forwards": auto and auto["search"]["forwards"],
                       "auto_final": auto and auto["held_out"][-1], "swept_best_lr": best and best["lr"],
                       "swept_best_final": best and best["held_out"][-1],
                       "sweep": {r["lr"]: r["held_out"][-1] for r in swept},
                       "ratio": chosen / best["lr"] if chosen and best else None}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forwards", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    path = RESULTS / "auto_lr.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for case, (_, grid) in CASES.items():
        for lr in ["auto", *grid]:
            if any(r["case"] == case and r["lr"] == lr and r["forwards"] == args.forwards for r in rows):
                continue
            rows.append(train(case, lr, args.forwards, args.threads))
            print(json.dumps({k: rows[-1].get(k) for k in ("case", "lr", "held_out", "error")}), flush=True)
            table = summarize(rows)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"machine": device_name(), "forwards": args.forwards, "table": table,
                                       "rows": rows}, indent=1))
            tmp.replace(path)
    print(f"{'case':<8} {'auto lr':>9} {'blow-up':>9} {'test fwd':>8} {'auto final':>10} {'best lr':>9} "
          f"{'best final':>10} {'auto/best':>9}")
    for case, r in summarize(rows).items():
        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"
        print(f"{case:<8} {fmt(r['chosen_lr'], '9.2e')} {fmt(r['blowup_lr'], '9.2e')} {fmt(r['test_forwards'], '8d')} "
              f"{fmt(r['auto_final'], '10.3f')} {fmt(r['swept_best_lr'], '9.2e')} {fmt(r['swept_best_final'], '10.3f')} "
              f"{fmt(r['ratio'], '9.2f')}")


if __name__ == "__main__":
    main()
