"""Resume a run: train part of the way, stop, continue from the last checkpoint, bit-exactly.

    python examples/resume_run.py [--steps 20] [--out runs/resume-example] [--set KEY=VALUE ...]

Trains the CPU demo recipe for half the steps into a run directory, then resumes it to the
full count, as ``qzo train --set train.steps=N`` followed by ``qzo train --resume RUN --set
train.steps=2N`` would. A resumed run replays the same seeds and batches, so its step log
and trained values are the bytes an uninterrupted run would have written; the example
checks that against a second, uninterrupted run and prints what it found. ``--set`` passes
config overrides to the two fresh runs (another model or data, as ``qzo train --set`` does; the
resumed run reads them from its run directory).
"""

import argparse
import json
import shutil
from pathlib import Path

from qzo.train.loop import train


def steps_log(run: Path) -> list[dict]:
    """The step log without wall times (the only field that differs between runs)."""
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="total steps (even); the first half runs, then resumes")
    ap.add_argument("--out", default="runs/resume-example")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (repeatable), e.g. model.source=PATH")
    args = ap.parse_args()
    half = args.steps // 2
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = [*args.set, f"train.eval_every={half}", f"train.save_every={half}"]

    first = train(None, [f"train.steps={half}", f"out_dir={out / 'resumed'}", *common], progress=False)
    print(f"stopped after {first['steps']} steps: held-out loss {first['final_eval_loss']:.4f}")
    # later (another process, after a crash, ...): continue the same run directory
    resumed = train(None, [f"train.steps={args.steps}"], resume=out / "resumed", progress=False)
    print(f"resumed to {resumed['steps']} steps: held-out loss {resumed['final_eval_loss']:.4f}")

    straight = train(None, [f"train.steps={args.steps}", f"out_dir={out / 'straight'}", *common], progress=False)
    same_log = steps_log(out / "resumed") == steps_log(out / "straight")
    ckpt = f"checkpoints/step-{args.steps:06d}/trainables.safetensors"
    same_values = (out / "resumed" / ckpt).read_bytes() == (out / "straight" / ckpt).read_bytes()
    print(f"uninterrupted run: held-out loss {straight['final_eval_loss']:.4f}; "
          f"step logs identical: {same_log}; trained values identical: {same_values}")


if __name__ == "__main__":
    main()
