"""The 7B / 8B / 13B memory levers (issue 15): GPU bytes each saves, and what it does to the demo's loss.

Two parts, in one run:

* planner   ``qzo.plan`` for Llama-2-7B, Llama-3.1-8B and Llama-2-13B at 8 x 512, LoRA r 8
            on q,v, NF4, with each lever alone and together: double quantization of the
            block scales (``model.double_quant``) and the input embedding in host RAM
            (``model.embedding_on_cpu``), against the targets 4.5 / 5.5 / 8 GiB. The LM
            head stays bf16: quantizing it would change every logit, and the targets are
            met without it.
* demo      the demo recipe (SmolLM2-135M, real weights, the shipped data) trained for
            ``--steps`` SPSA steps with each setting that changes values, from the same
            seed: held-out loss at step 0 and at the end. ``embedding_on_cpu`` changes no
            value by construction (a lookup copies rows) and the demo ties its embedding to
            its head, which that option refuses; its equality is a test
            (``tests/models/test_host_embedding.py``), not a row here.

    python benchmarks/memory_levers.py [--steps 100] [--planner-only]

Prints both tables and writes benchmarks/results/memory_levers.json. The GPU peaks of the same
shapes are owed to ``benchmarks/gpu_check.py`` on a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import device_name, write_result  # noqa: E402

from qzo.train.plan import plan  # noqa: E402

GiB = 2**30
TARGETS = {"llama-2-7b": 4.5, "llama-3.1-8b": 5.5, "llama-2-13b": 8.0}
LEVERS = {
    "none": {},
    "double_quant": {"double_quant": True},
    "embedding_on_cpu": {"embedding_on_cpu": True},
    "both": {"double_quant": True, "embedding_on_cpu": True},
}


def planner_rows() -> list[dict]:
    rows = []
    print(f"{'model':14}" + "".join(f"{name:>18}" for name in LEVERS) + f"{'target':>9}")
    for model, target in TARGETS.items():
        totals = {name: plan(model, batch=8, seq=512, lora_r=8, **kw).total / GiB for name, kw in LEVERS.items()}
        for name, total in totals.items():
            rows.append(dict(model=model, lever=name, planner_gib=round(total, 3), target_gib=target,
                             meets_target=total <= target))
        print(f"{model:14}" + "".join(f"{totals[n]:>13.2f} GiB" + (" ok" if totals[n] <= target else "   ")
                                      for n in LEVERS) + f"{target:>9.1f}")
    return rows


def demo_row(setting: str, overrides: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = [sys.executable, "-m", "qzo", "train", "--set", f"train.steps={steps}", "--set",
                f"train.eval_every={steps}", "--set", f"train.save_every={steps}", "--set", "train.report_to=[]",
                "--set", f"out_dir={out}", *sum((["--set", o] for o in overrides), [])]
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{setting}: qzo train failed ({done.returncode}):\n{done.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
    row = dict(setting=setting, overrides=overrides, steps=steps, forwards=summary.get("forwards"),
               initial_eval_loss=summary["initial_eval_loss"], final_eval_loss=summary["final_eval_loss"],
               wall_s=round(wall, 1))
    print(f"{setting:14}{row['initial_eval_loss']:>12.4f}{row['final_eval_loss']:>12.4f}{row['wall_s']:>10.0f}",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="SPSA steps of each demo run (2 forwards each)")
    ap.add_argument("--planner-only", action="store_true")
    args = ap.parse_args()
    print(f"device: {device_name()}")
    print("\nplanner, 8 x 512, LoRA r 8 on q,v, NF4 (GiB on the GPU)")
    result = {"device": device_name(), "planner": planner_rows(), "demo": []}
    if not args.planner_only:
        print(f"\ndemo recipe, {args.steps} SPSA steps, seed 0: held-out loss")
        print(f"{'setting':14}{'step 0':>12}{'end':>12}{'wall s':>10}")
        for setting, overrides in (("none", []), ("double_quant", ["model.double_quant=true"])):
            result["demo"].append(demo_row(setting, overrides, args.steps))
    write_result("memory_levers.json", result)
    print("wrote benchmarks/results/memory_levers.json")


if __name__ == "__main__":
    main()
