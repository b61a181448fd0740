"""kill -9 campaign: a real ``qzo train`` killed at random moments, resumed each time, must end bit-exact.

A tiny random Llama (the demo's tokenizer) trains for ``--steps`` steps with a checkpoint
every step, so kills land in checkpoint writes, evaluations, step logging and the final
adapter write as well as in forwards. Each round starts a fresh run, then repeats: start
(``--resume`` after the first start), kill with ``SIGKILL`` (``--p-checkpoint`` of the kills,
0.3, the moment a checkpoint's temp folder appears, i.e. inside its write, which the 2 ms
writes of a tiny model are otherwise too short to be hit in; ``--p-eval`` 0.15 the moment an
evaluation step's log line appears, inside its held-out evaluation (counted when no held-out
loss of that step was logged); ``--p-final`` 0.15 the moment the final values' or best/'s
temp folder appears; of the rest half at a random time since the start, half a random 0-0.3 s
after a random step was logged), inspect, until the process ends by itself. After every kill:

* every checkpoint must verify (sizes and SHA-256 recorded in its meta, ``qzo.runs.checkpoint``);
* a kill before the run folder exists leaves nothing to resume, and the run starts again;
* the run must resume from its newest checkpoint: ``steps.jsonl`` may hold steps past it
  (written before the kill), which the resume truncates and redoes; nothing before it is lost.

At the end of a round the final trainables must be the bytes of an uninterrupted run.
Counts go to ``benchmarks/results/kill_campaign.json`` (or ``--out``).

    python scripts/kill_campaign.py                       # 20 kills in 4 rounds (~5 min on 2 cores)
    python scripts/kill_campaign.py --kills 3 --out /tmp  # the short form (tests/train/test_kill_campaign.py: --model)
    python scripts/kill_campaign.py --model PATH          # train a model folder of yours instead (same config)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNTS = ("kills", "corrupt_checkpoints", "kills_during_checkpoint_write", "kills_during_eval", "kills_during_final_write",
          "lost_steps", "log_gaps", "starts")
EVAL_EVERY = 3


def make_model(folder: Path) -> Path:
    """A tiny random Llama with the demo model's tokenizer and chat template, saved as a model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from qzo.models.load import hf_model_path

    tok = AutoTokenizer.from_pretrained(hf_model_path("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(folder: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Code {i}?"}, {"role": "assistant", "content": "CODE"}]}
            for i in range(8)]
    path = folder / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_argv(model: Path, data: Path, run: Path, steps: int) -> list[str]:
    sets = {"model.source": model, "model.quant": "nf4", "lora.r": 4, "data.train": data, "data.eval": data,
            "optim.lr": 5e-2, "train.steps": steps, "train.batch_size": 4, "train.max_len": 48,
            "train.eval_every": EVAL_EVERY, "train.save_every": 1, "train.keep_checkpoints": 2, "out_dir": run}
    return [sys.executable, "-m", "qzo", "train", "--no-progress"] + [a for k, v in sets.items()
                                                                      for a in ("--set", f"{k}={v}")]


def inspect(run: Path) -> dict:
    """What a kill left: checkpoints that verify or not, temp folders, logged steps past the newest checkpoint."""
    from qzo.runs.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint

    corrupt = 0
    steps = []
    for ckpt in list_checkpoints(run):
        try:
            steps.append(verify_checkpoint(ckpt)["step"])
        except CheckpointError:
            corrupt += 1
    logged = []
    log = run / "steps.jsonl"
    for line in (log.read_text().splitlines() if log.is_file() else []):
        try:
            logged.append(json.loads(line)["step"])
        except ValueError:  # the line a kill tore in half: the resume drops it
            pass
    newest = max(steps, default=0)
    temp = [p.name for p in (run / "checkpoints").glob(".tmp-*")] if (run / "checkpoints").is_dir() else []
    return {"corrupt": corrupt, "newest": newest, "ahead": sum(s > newest for s in logged),
            "in_checkpoint_write": bool(temp),
            "in_final_write": any((run / name).exists() for name in (".final-tmp", ".best-tmp")), "gaps": logged != list(range(1, len(logged) + 1))}


def _wait_for_step(run: Path, step: int, proc) -> None:
    """Return once ``steps.jsonl`` logs ``step`` (or the process ended)."""
    log = run / "steps.jsonl"
    while proc.poll() is None:
        if log.is_file() and log.read_text().count("\n") >= step:
            return
        time.sleep(0.02)


def _wait_for_final_write(run: Path, proc) -> bool:
    """Return ``True`` the moment the final values' (or best/'s) temp folder exists, ``False`` if the process ended."""
    while proc.poll() is None:
        try:
            if any(e.name in (".final-tmp", ".best-tmp") for e in os.scandir(run)):
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.0001)
    return False


def _evaluated(run: Path, step: int) -> bool:
    """Whether ``metrics.jsonl`` holds the held-out loss of ``step`` (written when its evaluation ended)."""
    path = run / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step") == step and row.get("eval_loss") is not None:
            return True
    return False


def _wait_for_checkpoint_write(run: Path, proc) -> bool:
    """Return ``True`` the moment a checkpoint write's temp folder exists (polled every ~0.1 ms), ``False`` if the
    process ended first."""
    root = run / "checkpoints"
    while proc.poll() is None:
        try:
            if any(e.name.startswith(".tmp-") for e in os.scandir(root)):
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.0001)
    return False


def run_round(model: Path, data: Path, folder: Path, steps: int, kills: int, rng: random.Random,
              window: tuple[float, float], p_checkpoint: float = 0.0, p_eval: float = 0.0,
              p_final: float = 0.0) -> dict:
    run = folder / "run"
    counts = {key: 0 for key in COUNTS}
    resumed_from = []
    while True:
        # a kill before the run folder was written leaves nothing to resume: start it again
        started = (run / "config.yaml").is_file() and (run / "steps.jsonl").is_file()
        argv = [sys.executable, "-m", "qzo", "train", "--no-progress", "--resume", str(run)] if started else \
            train_argv(model, data, run, steps)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder)
        counts["starts"] += 1
        if counts["kills"] < kills:
            evaluating = None
            try:
                target = rng.random()
                if target < p_eval:  # the moment an evaluation step is logged: inside its held-out evaluation
                    evaluating = EVAL_EVERY * rng.randint(1, steps // EVAL_EVERY)
                    _wait_for_step(run, evaluating, proc)
                    if proc.poll() is None:
                        raise subprocess.TimeoutExpired(argv, 0)
                    evaluating = None
                    out, _ = proc.communicate()  # it ended first (a resume past that step): the round is over
                elif target < p_eval + p_final:  # inside the final values' (or best/'s) write
                    if _wait_for_final_write(run, proc):
                        raise subprocess.TimeoutExpired(argv, 0)
                    out, _ = proc.communicate()
                elif target < p_eval + p_final + p_checkpoint:  # inside a checkpoint write
                    if _wait_for_checkpoint_write(run, proc):
                        raise subprocess.TimeoutExpired(argv, 0)
                    out, _ = proc.communicate()  # none was left to write (a resume after the last step)
                elif rng.random() < 0.5:  # at a random time: the load, an evaluation, the final writes
                    out, _ = proc.communicate(timeout=rng.uniform(*window))
                else:  # a random moment inside training: a step, its log line, its checkpoint write
                    _wait_for_step(run, rng.randint(1, steps), proc)
                    out, _ = proc.communicate(timeout=rng.uniform(0.0, 0.3))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                counts["kills"] += 1
                seen = inspect(run)
                counts["corrupt_checkpoints"] += seen["corrupt"]
                counts["kills_during_checkpoint_write"] += seen["in_checkpoint_write"]
                counts["kills_during_eval"] += evaluating is not None and not _evaluated(run, evaluating)
                counts["kills_during_final_write"] += seen["in_final_write"]
                counts["log_gaps"] += seen["gaps"]
                resumed_from.append(seen["newest"])
                continue
        else:
            out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"qzo train exited with {proc.returncode}:\n{out[-3000:]}")
        if started and resumed_from and f"from step {resumed_from[-1]}" not in out:
            counts["lost_steps"] += 1  # the resume did not start at the newest checkpoint
        return {**counts, "run": run, "resumed_from": resumed_from}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills in all, spread over the rounds")
    ap.add_argument("--per-round", type=int, default=5, help="kills before a round is let finish")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-checkpoint", type=float, default=0.3, help="share of the kills made inside a checkpoint write")
    ap.add_argument("--p-eval", type=float, default=0.15, help="share made the moment an evaluation step is logged")
    ap.add_argument("--p-final", type=float, default=0.15, help="share made inside the final values' write")
    ap.add_argument("--window", type=float, nargs=2, default=None,
                    help="seconds after a start at which the kill may land; default: 0.5 s to the uninterrupted "
                         "run's own time, so kills land in the load, steps, evaluations, checkpoints and final writes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--model", type=Path, default=None,
                    help="a model folder (with its tokenizer and chat template) to train instead of the tiny random "
                         "Llama with the demo's tokenizer, e.g. the tests' tiny one (no converted demo model needed)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="qzo-kill-"))
    model, data = args.model.resolve() if args.model else make_model(work / "model"), write_data(work)
    reference = work / "reference"
    reference.mkdir()
    began = time.perf_counter()
    subprocess.run(train_argv(model, data, reference / "run", args.steps), check=True, capture_output=True,
                   cwd=reference)
    window = tuple(args.window) if args.window else (0.5, time.perf_counter() - began)
    final = f"checkpoints/step-{args.steps:06d}/trainables.safetensors"
    want = (reference / "run" / final).read_bytes()
    totals = {**{key: 0 for key in COUNTS}, "rounds": 0, "rounds_bit_exact": 0}
    start = time.perf_counter()
    left = args.kills
    while left > 0:
        folder = work / f"round-{totals['rounds']}"
        folder.mkdir()
        got = run_round(model, data, folder, args.steps, min(args.per_round, left), rng, window, args.p_checkpoint,
                        args.p_eval, args.p_final)
        left -= got["kills"]
        totals["rounds"] += 1
        adapter = "adapter/adapter_model.safetensors"
        same_adapter = (got["run"] / adapter).read_bytes() == (reference / "run" / adapter).read_bytes()
        totals["rounds_bit_exact"] += (got["run"] / final).read_bytes() == want and same_adapter
        for key in COUNTS:
            totals[key] += got[key]
        print(f"round {totals['rounds']}: {got['kills']} kills, resumed from steps {got['resumed_from']}", flush=True)
    totals["seconds"] = round(time.perf_counter() - start, 1)
    from _common import device_name

    result = {"device": device_name(), "steps_per_run": args.steps, "seed": args.seed,
              "kill_window_s": [round(w, 1) for w in window], "p_checkpoint": args.p_checkpoint,
              "p_eval": args.p_eval, "p_final": args.p_final, **totals}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kill_campaign.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'kills':>6}{'rounds':>8}{'bit-exact':>11}{'corrupt ckpts':>15}{'in ckpt write':>15}{'in eval':>9}"
          f"{'in final write':>16}{'lost steps':>12}")
    print(f"{totals['kills']:6d}{totals['rounds']:8d}{totals['rounds_bit_exact']:11d}"
          f"{totals['corrupt_checkpoints']:15d}{totals['kills_during_checkpoint_write']:15d}"
          f"{totals['kills_during_eval']:9d}{totals['kills_during_final_write']:16d}{totals['lost_steps']:12d}")
    print(f"wrote {args.out / 'kill_campaign.json'}")
    ok = (totals["rounds_bit_exact"] == totals["rounds"] and not totals["corrupt_checkpoints"]
          and not totals["lost_steps"] and not totals["log_gaps"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
