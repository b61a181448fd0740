"""Soak: one long ``qzo train`` of a tiny model; memory flat, time per step flat, logs consistent.

A tiny random Llama (the demo's tokenizer; ``scripts/kill_campaign.py``'s model and data)
trains ``--steps`` SPSA steps in this process, through :func:`qzo.train.loop.train` with the
default trackers (TensorBoard when installed), a held-out evaluation and a checkpoint every
``--every`` steps, on ``--threads`` torch threads (1: a tiny model gains nothing from more, and
on a shared CPU more threads spin against the other jobs: 700 ms a step at 2 threads under a
load of 9 on 2 cores, 25-35 ms at 1). After every step the process's resident memory
(``/proc/self/statm``), the step's wall time and its CPU time are sampled. Checked at the end:

* RSS growth after warm-up: the median RSS of the last ``--window`` steps over the median RSS
  of the first ``--window`` steps after warm-up, minus 1, at most ``--max-rss-growth`` (default
  1%). Medians, not single samples: glibc hands freed pages back now and then (a 12 MiB dip
  at step 1000 of a first 10,000-step soak, back a few steps later), so one sample can sit in
  a dip; the single samples are reported beside it (``rss_mib_every_500_steps``);
* time per step flat: the mean CPU time of the last ``--window`` steps over that of the first
  ``--window`` steps after warm-up, at most ``--max-slowdown`` (default 1.10). CPU time, not
  wall time, because the machines this runs on are shared (other jobs change the wall time
  of a step by 2x within minutes); the wall-time ratio is reported beside it;
* the step log and the metrics agree: ``steps.jsonl`` holds steps 1..N once each, in order,
  ``metrics.jsonl`` steps 0..N, the same forwards per step in both, an evaluation at every
  ``--every`` steps, ``summary.json`` N steps, and the newest checkpoint verifies at step N.

Writes ``benchmarks/results/soak.json`` (``--out``) and prints a table naming the machine;
exits 1 when a check fails.

    nice -n 10 python scripts/soak.py                          # 10,000 steps (the committed results)
    python scripts/soak.py --steps 200 --warmup 50 --window 50 --every 50 --out /tmp/soak.json  # CI's form
"""

from __future__ import annotations

import argparse
import json
from array import array
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import device_name  # noqa: E402
from kill_campaign import make_model, write_data  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def run(args, folder: Path) -> tuple[dict, list[tuple[int, float, float, int]]]:
    """Train, sampling ``(step, wall seconds, CPU seconds, rss)`` after every step; returns ``(summary, samples)``."""
    import torch

    from qzo.train import loop as trainer

    torch.set_num_threads(args.threads)

    model, data = make_model(folder / "model"), write_data(folder)
    # preallocated: a list of tuples growing per step would itself be RSS growth (~150 bytes a step)
    wall, cpu, rss = (array("d", bytes(8 * (args.steps + 1))), array("d", bytes(8 * (args.steps + 1))),
                      array("q", bytes(8 * (args.steps + 1))))
    real = trainer._train_step

    def sampled(s, step, *rest):
        start, cpu0 = time.perf_counter(), time.process_time()
        out = real(s, step, *rest)
        wall[step], cpu[step], rss[step] = time.perf_counter() - start, time.process_time() - cpu0, rss_bytes()
        return out

    trainer._train_step = sampled
    sets = {"model.source": model, "model.quant": "nf4", "lora.r": 4, "data.train": data, "data.eval": data,
            "optim.lr": args.lr, "train.steps": args.steps, "train.batch_size": 4, "train.max_len": 48,
            "train.eval_every": args.every, "train.save_every": args.every, "train.keep_checkpoints": 2,
            "out_dir": folder / "run", "train.report_to": args.report_to}
    try:
        summary = trainer.train(None, [f"{k}={v}" for k, v in sets.items()], progress=False, log=lambda *_: None)
    finally:
        trainer._train_step = real
    return summary, [(i, wall[i], cpu[i], rss[i]) for i in range(1, args.steps + 1)]


def check_logs(run_dir: Path, steps: int, every: int) -> dict:
    """The step log, metrics, summary and newest checkpoint tell the same story of ``steps`` steps."""
    from qzo.runs.checkpoint import latest_checkpoint, verify_checkpoint

    log = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines() if x.strip()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    fwd_log = {r["step"]: r["forwards"] for r in log}
    fwd_metrics = {m["step"]: m["forwards"] for m in metrics}
    evals = [m["step"] for m in metrics if m.get("eval_loss") is not None]
    ckpt = latest_checkpoint(run_dir)
    problems = []
    if [r["step"] for r in log] != list(range(1, steps + 1)):
        problems.append("steps.jsonl does not hold steps 1..N once each, in order")
    if [m["step"] for m in metrics] != list(range(0, steps + 1)):
        problems.append("metrics.jsonl does not hold steps 0..N once each, in order")
    if any(fwd_metrics.get(k) != v for k, v in fwd_log.items()):
        problems.append("a step's forwards differ between steps.jsonl and metrics.jsonl")
    if evals != [0, *range(every, steps + 1, every)] + ([steps] if steps % every else []):
        problems.append(f"held-out evaluations at {evals[:5]}..., not every {every} steps")
    if summary["steps"] != steps or summary["forwards"] != fwd_log.get(steps):
        problems.append("summary.json's steps / forwards differ from the logs")
    if ckpt is None or verify_checkpoint(ckpt)["step"] != steps:
        problems.append("the newest checkpoint does not verify at the last step")
    return {"step_log_lines": len(log), "metrics_lines": len(metrics), "evaluations": len(evals),
            "gaps_or_duplicates": int(bool(problems[:2])), "problems": problems}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=1000, help="steps before RSS and time are compared")
    p.add_argument("--window", type=int, default=1000, help="steps averaged at the start and the end")
    p.add_argument("--every", type=int, default=500, help="steps between evaluations and checkpoints")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--report-to", default="[tensorboard]", help="train.report_to (default: the default trackers)")
    p.add_argument("--max-rss-growth", type=float, default=0.01)
    p.add_argument("--max-slowdown", type=float, default=1.10)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = p.parse_args()
    if args.warmup + 2 * args.window > args.steps:
        p.error("--steps must cover --warmup plus two --window")
    with tempfile.TemporaryDirectory(prefix="qzo-soak-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        summary, samples = run(args, folder)
        wall = time.perf_counter() - start
        logs = check_logs(folder / "run", args.steps, args.every)
    by_step = {s: (t, c, r) for s, t, c, r in samples}
    rss = [by_step[s][2] for s in range(1, args.steps + 1)]
    times = [by_step[s][0] for s in range(1, args.steps + 1)]
    cpu = [by_step[s][1] for s in range(1, args.steps + 1)]

    def windows(values):
        return values[args.warmup : args.warmup + args.window], values[-args.window :]

    (first, last), (cpu_first, cpu_last), (rss_first, rss_last) = windows(times), windows(cpu), windows(rss)
    rss_warm, rss_end = statistics.median(rss_first), statistics.median(rss_last)
    growth = (rss_end - rss_warm) / rss_warm
    slowdown = statistics.fmean(cpu_last) / statistics.fmean(cpu_first)
    result = {
        "device": device_name(), "steps": args.steps, "warmup_steps": args.warmup, "window_steps": args.window,
        "every": args.every, "wall_s": round(wall, 1),
        "rss_mib_median_first_window": round(rss_warm / 2**20, 2),
        "rss_mib_median_last_window": round(rss_end / 2**20, 2),
        "rss_mib_at_warmup_step": round(by_step[args.warmup][2] / 2**20, 2),
        "rss_mib_at_last_step": round(by_step[args.steps][2] / 2**20, 2),
        "rss_mib_max_after_warmup": round(max(r for s, _, _, r in samples if s >= args.warmup) / 2**20, 2),
        "rss_growth": round(growth, 5), "max_rss_growth": args.max_rss_growth,
        "threads": args.threads, "load_average_at_end": os.getloadavg()[0],
        "step_cpu_ms_first_window": round(1000 * statistics.fmean(cpu_first), 3),
        "step_cpu_ms_last_window": round(1000 * statistics.fmean(cpu_last), 3),
        "step_wall_ms_first_window": round(1000 * statistics.fmean(first), 3),
        "step_wall_ms_last_window": round(1000 * statistics.fmean(last), 3),
        "step_wall_ms_median": round(1000 * statistics.median(times), 3),
        "slowdown_cpu": round(slowdown, 4), "max_slowdown": args.max_slowdown,
        "slowdown_wall": round(statistics.fmean(last) / statistics.fmean(first), 4),
        "final_eval_loss": summary["final_eval_loss"], **logs,
        "rss_mib_every_500_steps": {s: round(r / 2**20, 2) for s, _, _, r in samples if s % 500 == 0 or s == 1},
        "command": "python scripts/soak.py " + " ".join(sys.argv[1:]),
    }
    ok = growth <= args.max_rss_growth and slowdown <= args.max_slowdown and not logs["problems"]
    result["passed"] = ok
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"soak on {result['device']}: {args.steps} steps in {wall / 60:.1f} min")
    rows = [(f"RSS median, steps {args.warmup + 1}-{args.warmup + args.window}",
             f"{result['rss_mib_median_first_window']} MiB"),
            (f"RSS median, last {args.window} steps", f"{result['rss_mib_median_last_window']} MiB"),
            ("RSS max after warm-up", f"{result['rss_mib_max_after_warmup']} MiB"),
            ("RSS growth", f"{100 * growth:+.3f}% (limit {100 * args.max_rss_growth:g}%)"),
            (f"step CPU / wall, steps {args.warmup + 1}-{args.warmup + args.window}",
             f"{result['step_cpu_ms_first_window']} / {result['step_wall_ms_first_window']} ms"),
            (f"step CPU / wall, last {args.window} steps",
             f"{result['step_cpu_ms_last_window']} / {result['step_wall_ms_last_window']} ms"),
            ("slowdown (CPU time)", f"{slowdown:.3f}x (limit {args.max_slowdown:g}x; wall {result['slowdown_wall']}x, "
             f"load {result['load_average_at_end']:.1f})"),
            ("step log / metrics lines", f"{logs['step_log_lines']} / {logs['metrics_lines']}"),
            ("log problems", "; ".join(logs["problems"]) or "none")]
    for name, value in rows:
        print(f"  {name:<34} {value}")
    print("passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
