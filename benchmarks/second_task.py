"""Does the demo's default recipe teach a format it was not tuned on? The second task, at 1,000 forwards.

Issue 34: "the default recipe must teach other formats too". The task
(``benchmarks/make_second_task.py``): word and number puzzles, answered as one line of JSON
with the keys ``result`` and ``kind``. This trains the shipped demo recipe unchanged except for
its data (``data.train`` / ``data.eval``) and its length (``--forwards``, 1,000 by default),
through the public CLI, then asks the trained model every held-out question (greedy, at most 24
new tokens) and counts the replies whose first line is such a JSON object. The base model's
replies are counted the same way. Output: ``results/second_task.json``.

    nice -n 19 python benchmarks/second_task.py [--forwards 1000] [--recipe smollm2-135m/demo] [--set KEY=VALUE ...]
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
from _common import device_name, write_result  # noqa: E402
from make_second_task import OUT, in_format  # noqa: E402

NEW_TOKENS = 24


def replies(model, tok, chats) -> list[str]:
    import torch

    from qzo.cli.chat import reply
    from qzo.data.objectives import split_chat

    with torch.no_grad():
        return [reply(model, tok, split_chat(c)[0], NEW_TOKENS) for c in chats]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forwards", type=int, default=1000)
    ap.add_argument("--recipe", default="smollm2-135m/demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--label", default="default recipe")
    args = ap.parse_args()
    train, held = OUT / "second_task_train.jsonl", OUT / "second_task_eval.jsonl"
    if not train.is_file():
        sys.exit("run benchmarks/make_second_task.py first")
    run = Path(tempfile.mkdtemp(prefix="second-task-")) / "run"
    cmd = [sys.executable, "-m", "qzo", "train", args.recipe, "--no-progress", "--set", f"data.train={train}",
           "--set", f"data.eval={held}", "--set", f"train.forwards={args.forwards}", "--set", f"out_dir={run}"]
    for item in args.overrides:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr)
    print(proc.stdout.strip().splitlines()[-2])

    from qzo.data.dataset import ChatDataset
    from qzo.runs.reader import load_run_model

    model, tok, params, cfg = load_run_model(run)
    chats = ChatDataset.from_jsonl(tok, str(held), max_len=96).chats
    tuned = replies(model, tok, chats)
    from qzo.models.load import load

    base_model, base_tok = load(cfg["model"]["source"], cfg["model"]["quant"])
    base = replies(base_model, base_tok, chats)
    summary = json.loads((run / "summary.json").read_text())
    result = {"device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "label": args.label,
              "recipe": args.recipe, "overrides": args.overrides, "forwards": summary["forwards"],
              "train_wall_s": round(wall, 1), "held_out_loss": [summary["initial_eval_loss"], summary["final_eval_loss"]],
              "in_format": sum(map(in_format, tuned)), "base_in_format": sum(map(in_format, base)),
              "held_out_chats": len(chats), "replies": tuned[:8], "base_replies": base[:4]}
    print(f"{args.label}: {result['in_format']} of {len(chats)} held-out replies in format (base model "
          f"{result['base_in_format']}); held-out loss {summary['initial_eval_loss']:.3f} -> "
          f"{summary['final_eval_loss']:.3f} after {summary['forwards']} forwards")
    for r in tuned[:4]:
        print("  ", r.replace("\n", " / ")[:80])
    name = "second_task.json" if args.label == "default recipe" else f"second_task_{args.label.replace(' ', '_')}.json"
    print(f"written to {write_result(name, result)}")


if __name__ == "__main__":
    main()
