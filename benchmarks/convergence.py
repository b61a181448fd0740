"""Held-out loss against forward passes: MeZO (SPSA) vs steered ZO vs first-order QLoRA.

The demo model (SmolLM2-135M-Instruct, NF4, LoRA r 8 on q,v) on the shipped chat task
(``builtin:demo_train``, held-out ``builtin:demo_eval``). Every method gets the same
budget of forward passes, evaluated on the held-out set at the same forward counts. A
first-order step (forward + backward) counts as 3 forward passes, the usual estimate of a
backward costing two forwards, so the comparison is compute-matched; measured wall time
is reported beside it:

    spsa   MeZO: qzo.SPSA, 2 forwards a step
    gv2    MeZO-GV pool 2, split 0.5 (4 a step)      gv4   pool 4 (6 a step)
    greedy MeZO-Greedy pool 4 (5 a step)             ldsd  LDSD k 4, sigma 1, lr_mu 4e-2 (5 a step)
    first_order  LoRA + AdamW with backprop through the same NF4 model (the QLoRA way)

lr is tuned per method on seed 0 over the same grid (recorded in the JSON); then each
method runs its best lr with every seed. Results accumulate in a CSV (one row per
evaluation), so an interrupted benchmark resumes where it stopped (runs already in the
CSV are skipped). Outputs under benchmarks/results/:

    convergence.csv   method, lr, seed, phase, forwards, wall_s, eval_loss
    convergence.png   mean +- spread of held-out loss against forwards per method
    convergence.json  device, budget_forwards, sweep, and per method final_eval_loss and
                      fraction_of_spsa_forwards (forwards to reach MeZO's final loss / MeZO's)

    python benchmarks/convergence.py [--budget 240] [--seeds 0 1 2] [--sweep-budget 160]
    python benchmarks/convergence.py --quick     # smoke run (CI): budget 8, one lr, one seed, results
                                                 # to a temporary folder unless QZO_BENCH_RESULTS is set

The committed results were made with --budget 160 --sweep-budget 80 --eval-every 40 (what
fits a 2-core CPU session: about 70 minutes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, device_name, write_result  # noqa: E402

import qzo  # noqa: E402
from qzo.data import Batcher, ChatDataset, eval_loss  # noqa: E402

METHODS = {
    "spsa": lambda: qzo.SPSA(),
    "gv2": lambda: qzo.GV(pool=2, split=0.5),
    "gv4": lambda: qzo.GV(pool=4, split=0.5),
    "greedy": lambda: qzo.Greedy(pool=4),
    "ldsd": lambda: qzo.LDSD(candidates=4, sigma=1.0, lr_mu=4e-2),
    "first_order": None,
}
# One shared grid for every ZO method (ZO's lr multiplies a unit-variance direction), one
# for AdamW (its steps are normalized); same number of points each.
ZO_GRID = (1e-3, 2e-3)
FO_GRID = (3e-4, 1e-3)
EPS = 1e-2
FO_FORWARDS_PER_STEP = 3  # forward + backward, in forward-equivalents
BATCH, MAX_LEN, EVAL_BATCH = 8, 96, 16
FIELDS = ["method", "lr", "seed", "phase", "forwards", "wall_s", "eval_loss"]
CSV_PATH = RESULTS / "convergence.csv"
HELD_OUT_LIMIT: int | None = None  # --quick evaluates on the first chats only


def use_results_dir(folder: Path) -> None:
    """Send the CSV, JSON and PNG to ``folder`` (``--quick`` must not touch the committed results)."""
    global RESULTS, CSV_PATH
    import _common

    RESULTS = _common.RESULTS = folder
    CSV_PATH = folder / "convergence.csv"


def load_rows() -> list[dict]:
    if not CSV_PATH.is_file():
        return []
    with open(CSV_PATH) as f:
        return [dict(r, lr=float(r["lr"]), seed=int(r["seed"]), forwards=int(r["forwards"]), wall_s=float(r["wall_s"]),
                     eval_loss=float(r["eval_loss"])) for r in csv.DictReader(f)]


def append_rows(rows: list[dict]) -> None:
    new = not CSV_PATH.is_file()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(CSV_PATH, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def run_one(method: str, lr: float, seed: int, budget: int, eval_every: int, phase: str) -> list[dict]:
    """Train one method to ``budget`` forwards; held-out loss at every multiple of eval_every."""
    first_order = METHODS[method] is None
    # bitsandbytes' fused CPU 4-bit kernel has no backward (gradients come out zero), so
    # first-order runs use the dequantize-then-matmul path; ZO runs use qzo's default.
    model, tok = qzo.load("smollm2-135m", quant="nf4", cpu_fused_4bit=not first_order)
    params = qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=seed)
    train = ChatDataset.from_jsonl(tok, "builtin:demo_train", MAX_LEN)
    held = ChatDataset.from_jsonl(tok, "builtin:demo_eval", MAX_LEN)
    if HELD_OUT_LIMIT:
        held = ChatDataset(held.input_ids[:HELD_OUT_LIMIT], held.labels[:HELD_OUT_LIMIT], held.source)
    batches = Batcher(train, BATCH, seed, tok.pad_token_id)
    rows, wall, forwards, step = [], 0.0, 0, 0
    evaluate = lambda: eval_loss(model, held, EVAL_BATCH, tok.pad_token_id)
    rows.append(dict(method=method, lr=lr, seed=seed, phase=phase, forwards=0, wall_s=0.0, eval_loss=evaluate()))
    next_eval = eval_every
    if first_order:
        lora_params = [p for n, p in params.peft_model.named_parameters() if "lora_" in n]
        for p in lora_params:  # qzo.lora freezes them: ZO never needs autograd
            p.requires_grad_(True)
        adam = torch.optim.AdamW(lora_params, lr=lr, weight_decay=0.0)
    else:
        opt = qzo.ZO(params, strategy=METHODS[method](), rule=qzo.SGD(lr=lr), eps=EPS, seed=seed)
    while forwards < budget:
        step += 1
        batch = batches.batch(step)
        t0 = time.perf_counter()
        if first_order:
            if forwards + FO_FORWARDS_PER_STEP > budget:
                break
            adam.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            adam.step()
            forwards += FO_FORWARDS_PER_STEP
        else:
            if forwards + opt.strategy.forwards_per_step > budget:
                break
            opt.step(lambda: model(**batch).loss)
            forwards = opt.forwards
        wall += time.perf_counter() - t0
        if forwards >= next_eval or forwards >= budget:
            rows.append(dict(method=method, lr=lr, seed=seed, phase=phase, forwards=forwards, wall_s=round(wall, 2),
                             eval_loss=evaluate()))
            next_eval += eval_every
        if not torch.isfinite(torch.tensor(rows[-1]["eval_loss"])):
            break
    if rows[-1]["forwards"] != forwards:
        rows.append(dict(method=method, lr=lr, seed=seed, phase=phase, forwards=forwards, wall_s=round(wall, 2),
                         eval_loss=evaluate()))
    return rows


def curve(rows, method, lr, seed, phase):
    pts = [r for r in rows if r["method"] == method and r["lr"] == lr and r["seed"] == seed and r["phase"] == phase]
    return sorted(pts, key=lambda r: r["forwards"])


def forwards_to_reach(points: list[dict], target: float) -> float | None:
    """First forward count at which the held-out loss is <= target (linear interpolation)."""
    for a, b in zip(points, points[1:]):
        if b["eval_loss"] <= target:
            if a["eval_loss"] <= target:
                return a["forwards"]
            frac = (a["eval_loss"] - target) / (a["eval_loss"] - b["eval_loss"])
            return a["forwards"] + frac * (b["forwards"] - a["forwards"])
    return points[0]["forwards"] if points and points[0]["eval_loss"] <= target else None


def mean_curve(rows, method, lr, seeds, budget) -> list[dict]:
    """Seed-mean held-out loss on a common forward grid (each seed linearly interpolated)."""
    curves = [c for c in (curve(rows, method, lr, s, "main") for s in seeds) if c]
    end = min(c[-1]["forwards"] for c in curves)
    grid = sorted({p["forwards"] for c in curves for p in c if p["forwards"] <= end})
    out = []
    for x in grid:
        vals = []
        for c in curves:
            for a, b in zip(c, c[1:]):
                if a["forwards"] <= x <= b["forwards"]:
                    w = 0.0 if b["forwards"] == a["forwards"] else (x - a["forwards"]) / (b["forwards"] - a["forwards"])
                    vals.append(a["eval_loss"] + w * (b["eval_loss"] - a["eval_loss"]))
                    break
        out.append({"forwards": x, "eval_loss": statistics.mean(vals)})
    return out


def summarize(rows, budget, seeds, sweep, best_lr) -> dict:
    methods = {}
    finals = {}
    for m in METHODS:
        curves = [curve(rows, m, best_lr.get(m), s, "main") for s in seeds]
        curves = [c for c in curves if c]
        if not curves:
            continue
        finals[m] = statistics.mean(c[-1]["eval_loss"] for c in curves)
        methods[m] = {"lr": best_lr[m], "seeds": len(curves), "final_eval_loss": round(finals[m], 4),
                      "final_eval_loss_per_seed": [round(c[-1]["eval_loss"], 4) for c in curves],
                      "wall_s_mean": round(statistics.mean(c[-1]["wall_s"] for c in curves), 1)}
    if "spsa" in methods:
        # fraction: forwards at which a method's seed-mean curve first reaches MeZO's final
        # seed-mean loss, over MeZO's budget (interpolated between evaluations)
        target = finals["spsa"]
        spsa_forwards = mean_curve(rows, "spsa", best_lr["spsa"], seeds, budget)[-1]["forwards"]
        for m, info in methods.items():
            reach = forwards_to_reach(mean_curve(rows, m, best_lr[m], seeds, budget), target)
            info["fraction_of_spsa_forwards"] = None if reach is None else round(reach / spsa_forwards, 3)
    return {"device": device_name(), "budget_forwards": budget, "seeds": list(seeds), "eps": EPS,
            "batch": BATCH, "first_order_forwards_per_step": FO_FORWARDS_PER_STEP,
            "sweep": sweep, "sweep_note": "final held-out loss on seed 0 per lr", "methods": methods}


def plot(rows, summary, best_lr, seeds) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in summary["methods"]:
        curves = [curve(rows, m, best_lr[m], s, "main") for s in seeds]
        curves = [c for c in curves if c]
        xs = sorted({p["forwards"] for c in curves for p in c})
        mean, lo, hi = [], [], []
        for x in xs:
            vals = [p["eval_loss"] for c in curves for p in c if p["forwards"] == x]
            mean.append(statistics.mean(vals))
            lo.append(min(vals))
            hi.append(max(vals))
        ax.plot(xs, mean, label=f"{m} (lr {best_lr[m]:g})")
        ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.set_xlabel("forward passes")
    ax.set_ylabel("held-out loss (assistant tokens)")
    counts = sorted({info["seeds"] for info in summary["methods"].values()})
    ax.set_title(f"SmolLM2-135M NF4, LoRA r8: mean and min-max over {'/'.join(map(str, counts))} seeds per method")
    ax.legend()
    path = RESULTS / "convergence.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=240)
    ap.add_argument("--sweep-budget", type=int, default=160)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--note", default="", help="a remark stored in the JSON (e.g. why some seeds are missing)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="only tabulate the runs already in the CSV (e.g. of an interrupted benchmark)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (budget 8, one lr per method, seed 0, 16 held-out chats) into a temporary "
                         "results folder")
    args = ap.parse_args()
    global ZO_GRID, FO_GRID, HELD_OUT_LIMIT
    if args.quick:
        args.budget, args.sweep_budget, args.seeds, args.eval_every = 8, 4, [0], 4
        ZO_GRID, FO_GRID, HELD_OUT_LIMIT = ZO_GRID[:1], FO_GRID[:1], 16
        use_results_dir(Path(os.environ.get("QZO_BENCH_RESULTS") or tempfile.mkdtemp(prefix="qzo-convergence-")))
    rows = load_rows()

    def ensure(method, lr, seed, budget, phase):
        nonlocal rows
        if curve(rows, method, lr, seed, phase) or args.summarize_only:
            return
        print(f"run {phase} {method} lr={lr:g} seed={seed} budget={budget}", flush=True)
        new = run_one(method, lr, seed, budget, args.eval_every, phase)
        append_rows(new)
        rows += new
        print(f"  held-out {new[0]['eval_loss']:.4f} -> {new[-1]['eval_loss']:.4f} in {new[-1]['wall_s']:.0f} s", flush=True)

    sweep, best_lr = {}, {}
    for m in args.methods:
        grid = FO_GRID if METHODS[m] is None else ZO_GRID
        for lr in grid:
            ensure(m, lr, 0, args.sweep_budget, "sweep")
        finals = {lr: curve(rows, m, lr, 0, "sweep")[-1]["eval_loss"] for lr in grid if curve(rows, m, lr, 0, "sweep")}
        if not finals:
            continue
        sweep[m] = {f"{lr:g}": round(v, 4) for lr, v in finals.items()}
        best_lr[m] = min(finals, key=lambda lr: finals[lr] if finals[lr] == finals[lr] else float("inf"))
    for s in args.seeds:
        for m in best_lr:
            ensure(m, best_lr[m], s, args.budget, "main")
    seeds_done = [s for s in args.seeds if all(curve(rows, m, best_lr[m], s, "main") for m in best_lr)]
    if seeds_done != args.seeds:
        print(f"complete seeds: {seeds_done} (of {args.seeds}); the table uses what each method has")

    summary = summarize(rows, args.budget, args.seeds, sweep, best_lr)
    if args.note:
        summary["note"] = args.note
    write_result("convergence.json", summary)
    png = plot(rows, summary, best_lr, args.seeds)
    print(f"device: {summary['device']}")
    print(f"budget {args.budget} forwards, seeds {args.seeds}; lr sweep on seed 0 at {args.sweep_budget} forwards")
    print(f"{'method':12}{'lr':>9}{'final held-out':>16}{'frac of MeZO fwd':>18}{'wall s':>9}")
    for m, info in summary["methods"].items():
        frac = info.get("fraction_of_spsa_forwards")
        print(f"{m:12}{info['lr']:9.0e}{info['final_eval_loss']:16.4f}{('-' if frac is None else f'{frac:.2f}'):>18}"
              f"{info['wall_s_mean']:9.0f}")
    print(f"wrote {CSV_PATH}, {RESULTS / 'convergence.json'}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
