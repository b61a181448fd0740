"""What the divergence guard does on the demo at 2x its stable lr: the same run with the guard off and on.

The demo recipe (``smollm2-135m/demo``: SmolLM2-135M-Instruct NF4, LoRA r 8 on q,v, SPSA)
at the convergence benchmark's batch, 4 x 96, where its lr sweep found 1e-3 stable and 2e-3
blowing up (held-out 16.35 at 400 forwards), at ``optim.lr=2e-3`` for ``--forwards`` loss
evaluations, held-out loss every ``--eval-every`` steps, once per ``--factors`` value
(``off`` is the guard off), on ``--threads`` torch threads (1 on a shared 2-core machine). Writes
``benchmarks/results/divergence_guard.json``: per run the held-out losses, the steps the
guard undid, the lr it ended at, why it stopped, and the wall time.

    nice -n 10 python scripts/guard_demo.py [--forwards 400] [--factors off 3 1.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import RESULTS, device_name  # noqa: E402


def one_run(factor: str, args, folder: Path) -> dict:
    from qzo.train.loop import train

    out = folder / f"lr{args.lr:g}-guard-{factor}"
    sets = [f"optim.lr={args.lr}", f"train.forwards={args.forwards}", f"train.eval_every={args.eval_every}",
            f"train.batch_size={args.batch_size}",
            f"train.save_every={args.eval_every}", "train.report_to=[]", f"out_dir={out}",
            f"train.divergence_factor={'null' if factor == 'off' else factor}"]
    start = time.perf_counter()
    summary = train(None, sets, progress=False, log=print)
    wall = time.perf_counter() - start
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    undone = [r for r in steps if "reverted" in r]
    return {
        "divergence_factor": None if factor == "off" else float(factor),
        "eval_loss": {m["step"]: m["eval_loss"] for m in metrics if m.get("eval_loss") is not None},
        "train_loss_first_last_20": [round(sum(r["loss"] for r in steps[:20] if r["loss"] is not None) / 20, 4),
                                     round(sum(r["loss"] for r in steps[-20:] if r["loss"] is not None) / 20, 4)],
        "steps": summary["steps"], "forwards": summary["forwards"],
        "undone_steps": [r["step"] for r in undone],
        "undo_reasons": [r["reverted"]["reason"] for r in undone][:10],
        "final_lr": steps[-1]["reverted"]["lr"] if steps and "reverted" in steps[-1] else
        (undone[-1]["reverted"]["lr"] if undone else args.lr),
        "stopped_by": summary.get("stopped_by"),
        "final_eval_loss": summary["final_eval_loss"], "initial_eval_loss": summary["initial_eval_loss"],
        "wall_s": round(wall, 1), "seconds_per_forward": round(wall / max(summary["forwards"], 1), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--forwards", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--factors", nargs="+", default=["off", "3", "1.5"])
    p.add_argument("--folder", default="/tmp/qzo-guard-demo")
    p.add_argument("--out", default=str(RESULTS / "divergence_guard.json"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else {}  # runs of other lrs / factors are kept
    for factor in args.factors:
        key = f"lr {args.lr:g}, guard {factor}"
        runs[key] = {"lr": args.lr, **one_run(factor, args, folder),
                     "command": "nice -n 10 python scripts/guard_demo.py " + " ".join(sys.argv[1:])}
        result = {"device": device_name(), "recipe": "smollm2-135m/demo", "batch_size": args.batch_size,
                  "stable_lr": 1e-3, "forwards": args.forwards, "eval_every_steps": args.eval_every, "runs": runs}
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':>18} {'held-out start':>14} {'end':>8} {'undone':>7} {'final lr':>9} stopped")
    for factor, r in runs.items():
        print(f"{factor:>18} {r['initial_eval_loss']:>14.4f} {r['final_eval_loss']:>8.4f} {len(r['undone_steps']):>7} "
              f"{r['final_lr']:>9.2g} {r['stopped_by'] or '-'}")


if __name__ == "__main__":
    main()
