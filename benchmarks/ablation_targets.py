"""Which trained values learn fastest per forward? The demo recipe with other targets, each at its own lr.

Issue 34, lever 1 ("fewer, better-placed dimensions"): the demo (SmolLM2-135M-Instruct, NF4,
SPSA, batch 4 x 96, eps 1e-2, seed 0) trains LoRA's B factors on q,v at r 8 by default. This
runs the unchanged demo recipe through the public CLI with one change per row (the LoRA rank,
the modules, a dense slice of the RMSNorm gains, combinations), each at a small grid of lrs,
for the same number of forwards, and reads the held-out loss every 50 steps from the run's
``metrics.jsonl``. Driven through ``python -m qzo train`` so what is measured is what a user
runs. Results accumulate in ``results/ablation_targets.json`` (a row per run; finished runs are
skipped, so an interrupted benchmark resumes) and the table is printed at the end:

    config          what differs from the demo recipe (its --set overrides)
    lr              the run's constant lr
    values          trainable values (summary.json; with B only, A's are among them but draw no noise)
    held-out @F     held-out loss after F forwards (the demo recipe itself: 4.61 at 0)

    nice -n 19 python benchmarks/ablation_targets.py [--steps 150] [--only NAME ...] [--threads 1]
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

B_ONLY = ['optim.noise_scale={"*lora_A*": 0}']
NO_LORA = ["targets.lora=false", "optim.noise_scale=null"]

# name -> (overrides, lrs). Every LoRA row is B only (the demo's default), as issue 34 asks.
CONFIGS: dict[str, tuple[list[str], list[float]]] = {
    "qv_r8": ([], [8e-3]),  # the demo recipe itself
    "qv_r4": (["lora.r=4", "lora.alpha=8"], [8e-3, 2.4e-2]),
    "qv_r2": (["lora.r=2", "lora.alpha=4"], [8e-3, 2.4e-2]),
    "o_r8": (["lora.target_modules=[o_proj]"], [8e-3, 2.4e-2]),
    "down_r8": (["lora.target_modules=[down_proj]"], [8e-3, 2.4e-2]),
    "v_r8": (["lora.target_modules=[v_proj]"], [8e-3, 2.4e-2]),
    "all_r8": (["lora.target_modules=all-linear"], [4e-3, 8e-3]),
    "final_norm": (NO_LORA + ["targets.dense=[model.norm]"], [1e-3, 1e-2]),
    "qv_r8+final_norm": (["targets.dense=[model.norm]"], [8e-3]),
}


def run(name: str, lr: float, steps: int, threads: int) -> dict:
    """Train one row through the CLI; its held-out curve and trained-value count."""
    overrides, _ = CONFIGS[name]
    out = Path(tempfile.mkdtemp(prefix=f"ablate-{name}-"))
    cmd = [sys.executable, "-m", "qzo", "train", "smollm2-135m/demo", "--no-progress",
           "--set", f"out_dir={out / 'run'}", "--set", f"train.steps={steps}", "--set", f"optim.lr={lr}"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"config": name, "lr": lr, "steps": steps, "error": proc.stderr.strip().splitlines()[-1:]}
    curve = []
    for line in (out / "run" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("eval_loss") is not None:
            curve.append({"forwards": row.get("forwards"), "eval_loss": round(row["eval_loss"], 4)})
    values = json.loads((out / "run" / "summary.json").read_text()).get("trainable_values")
    shutil.rmtree(out, ignore_errors=True)
    return {"config": name, "overrides": overrides, "lr": lr, "steps": steps, "values": values,
            "wall_s": round(wall, 1), "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    path = RESULTS / "ablation_targets.json"
    done = json.loads(path.read_text())["rows"] if path.exists() else []
    have = {(r["config"], r["lr"], r["steps"]) for r in done}
    for name, (_, lrs) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        for lr in lrs:
            if (name, lr, args.steps) in have:
                continue
            row = run(name, lr, args.steps, args.threads)
            done.append(row)
            print(json.dumps({k: row.get(k) for k in ("config", "lr", "values", "wall_s", "error")}),
                  row.get("curve", [])[-1:], flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"machine": device_name(), "rows": done}, indent=1))
            tmp.replace(path)
    print(f"{'config':<20} {'lr':>8} {'values':>9}  held-out by forwards")
    for r in done:
        pts = "  ".join(f"{p['forwards']}:{p['eval_loss']:.2f}" for p in r.get("curve", []))
        print(f"{r['config']:<20} {r['lr']:>8.1e} {str(r.get('values')):>9}  {pts or r.get('error')}")


if __name__ == "__main__":
    main()
