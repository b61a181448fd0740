"""Held-out loss against forward passes: MeZO (SPSA) vs FZOO, scale-free steps, steered ZO and first-order QLoRA.

The demo model (SmolLM2-135M-Instruct, NF4, LoRA r 8 on q,v) on the shipped chat task
(``builtin:demo_train``, held-out ``builtin:demo_eval``), batch 4 x 96 tokens (the proxy that
keeps a 2,000-forward run inside ~15 minutes of a 2-core CPU). Every method gets the same
budget of loss evaluations, counted by ``qzo.ZO.forwards`` (baselines, pool members,
re-probes: all of them), evaluated on the held-out set at the same forward counts, with the
same data order and eps. A first-order step (forward + backward) counts as 3 forwards:

    spsa              MeZO: qzo.SPSA, 2 a step (the baseline every fraction is relative to)
    gv4, greedy       MeZO-GV pool 4 (6 a step), MeZO-Greedy pool 4 (5 a step), as the paper defines them
    ldsd              LDSD k 4, sigma 1, lr_mu 4e-2 (5 a step)
    gv4_cos, ldsd_cos GV pool 4 and LDSD with a cosine lr schedule
    fzoo4             qzo.FZOO: 4 one-sided probes weighted by their losses against f(theta) (5 a step)
    fzoo4_mean        the same against the probes' mean (4 a step)
    fzoo4_spread      FZOO as published: the step divided by the probes' loss spread, constant lr
    *_cos             with a cosine lr schedule over the run (the normalized step does not shrink by itself)
    spsa_rms_cos      MeZO with its slope divided by a running RMS, cosine schedule
    spsa_b_only       MeZO on LoRA's B factors only (A keeps its init and draws no noise)
    spsa_b_only_cos   the same with a cosine lr schedule over the run
    spsa_b_first100   MeZO on B alone for the first 100 steps, then on A and B (noise_scale_steps)
    spsa_a_half       MeZO with A's noise at half of B's scale (noise_scale {"*lora_A*": 0.5})
    conmezo           ConMeZO: MeZO in a cone of half-angle 1.35 around the momentum, beta 0.99
    per_example       a two-point probe per row, all rows in one forward each way (2 a step, B directions)
    gv4_spread_cos    steering + a scale-free step
    gv4_b_only_spread_cos  steering + a scale-free step + B only
    conmezo_b_only    ConMeZO on LoRA's B factors only
    gv2_mem_*, ldsd_jaguar_b_only_cos, greedy4_b_only_cos
                      issue 31: the steered methods as their authors' code runs them (GV pool 2 with the best
                      seed kept; LDSD from a unit mean, sigma 1e-3, the sign of a momentum, 10% of the tensors a
                      step), on B only with a cosine; not yet in the committed table
    first_order       LoRA + AdamW with backprop through the same NF4 model (the QLoRA way)

Fair tuning: per method an lr sweep on seed 0 at a third of the budget over a grid of 4
values spanning its blow-up point (plain and normalized steps have their own grids, since a
normalized step has no slope in it); the best lr whose sweep run did not blow up then runs
the full budget on the first seed; if it blows up there (later than a third of the budget can
see), the next lower lr that was stable in the sweep replaces it (the JSON's
``blew_up_in_full_run`` names the replaced lrs). The chosen lr runs every seed, and the table
says if any seed blew up there. A method with an lr schedule sweeps on the full run's schedule
cut at a third (phase ``sweep-cut``): a cosine over the sweep's own budget decays 3x faster
than the full run's and so favours a hotter lr than the full run can bear (measured: GV +
spread + B only chose 4e-2 and climbed from 3.60 to 4.07 mid-run). Sweeps run before that
rule (phase ``sweep``, the schedule over the sweep's budget) stand for a method until it has
cut ones, and the JSON's ``sweep_protocol`` says which each method's lr came from. Results
accumulate in a CSV (one row per evaluation), so an interrupted benchmark resumes where it
stopped (runs already in the CSV are skipped). A run cut mid-way goes on from its last step, in
another session or on another machine: its replay log in results/convergence_runs/ (committed;
every loss the optimizer received, a few KB) rebuilds its whole state by replay with no forward
(``qzo.replay.ReplayedLoss``), and the state digests logged at each evaluation say whether the
rebuilt state is bit-identical. Outputs under benchmarks/results/:

    convergence.csv   method, lr, seed, phase, budget, forwards, wall_s, eval_loss
    convergence.png   mean and min-max of held-out loss against forwards per method
    convergence.json  device, budget_forwards, seeds, seconds_per_forward, the sweep, and per
                      method final_eval_loss, fraction_of_spsa_forwards, fraction_of_spsa_wall
                      (to reach MeZO's final loss; null where never reached), stable_lr_range
    convergence_timing.json  --calibrate: each method's seconds per forward, its steps timed back to
                      back on one machine; the wall fractions are forwards-to-reach x that cost
                      (a run's own wall time mixes sessions, machines and whatever else ran)

    python benchmarks/convergence.py [--budget 2000] [--seeds 0 1 2] [--methods spsa fzoo4 ...]
    python benchmarks/convergence.py --calibrate --summarize-only   # time the steps (quiet machine)
    python benchmarks/convergence.py --quick     # smoke run (CI): budget 8, one lr, one seed, results
                                                 # to a temporary folder unless QZO_BENCH_RESULTS is set

The full protocol is about 6 hours of a 2-core CPU for the whole table; the committed
table says in its JSON (``note``) what budget, methods and seeds it holds.
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


sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, device_name, first_order_adam, write_result  # noqa: E402

import qzo  # noqa: E402
from qzo.data.dataset import Batcher, ChatDataset, eval_loss  # noqa: E402
from qzo.runs.replay import RecordingLoss, ReplayedLoss, state_digest  # noqa: E402


class Method:
    """A ZO configuration of the table: a strategy and the options it runs with."""

    def __init__(self, strategy, normalize=None, schedule="constant", grid=(5e-4, 1e-3, 2e-3, 4e-3), select=None,
                 noise_scale=None, noise_scale_steps=None, rule=None, subsample=None):
        self.strategy, self.normalize, self.schedule, self.grid = strategy, normalize, schedule, grid
        self.rule, self.subsample = rule or (lambda lr: qzo.SGD(lr=lr)), subsample  # issue 31's mechanics
        self.select = select  # trainable-name patterns: only these draw noise and move
        self.noise_scale, self.noise_scale_steps = noise_scale, noise_scale_steps  # LoRA-aware directions

    def optimizer(self, params, lr: float, seed: int, budget: int, horizon: int | None = None) -> "qzo.ZO":
        """The optimizer of a run of ``budget`` forwards; its schedule spans ``horizon`` forwards (default: budget)."""
        strategy = self.strategy()
        if self.select:
            params = params.select(*self.select)
        steps = -(-(horizon or budget) // strategy.forwards_per_step)
        schedule = qzo.Schedule(self.schedule, total_steps=steps) if self.schedule != "constant" else None
        return qzo.ZO(params, strategy=strategy, rule=self.rule(lr), eps=EPS, seed=seed, schedule=schedule,
                      normalize=self.normalize, noise_scale=self.noise_scale, noise_scale_steps=self.noise_scale_steps,
                      subsample=self.subsample)


# A normalized step is lr * O(1) per unit slope where a plain one is lr * g: measured |g| ~ 1.7
# (RMS of MeZO's first 8 slopes at batch 4), and FZOO's normalized step with N probes is
# about lr * sqrt(d / N), so MeZO's 1e-3-2e-3 corresponds to 3e-3-7e-3. The normalized
# methods get their own grid; each grid spans its blow-up point.
NORMALIZED_GRID = (2.5e-3, 5e-3, 1e-2, 2e-2)
METHODS = {
    "spsa": Method(lambda: qzo.SPSA()),  # MeZO: the baseline
    "gv4": Method(lambda: qzo.GV(pool=4, split=0.5)),
    "greedy": Method(lambda: qzo.Greedy(pool=4)),
    "ldsd": Method(lambda: qzo.LDSD(candidates=4, sigma=1.0, lr_mu=4e-2)),
    # at a constant lr GV, Greedy and LDSD led MeZO at 1e-3 until a late blow-up (1,400-1,800 forwards):
    # does a decaying lr keep the lead?
    "gv4_cos": Method(lambda: qzo.GV(pool=4, split=0.5), schedule="cosine"),
    "ldsd_cos": Method(lambda: qzo.LDSD(candidates=4, sigma=1.0, lr_mu=4e-2), schedule="cosine"),
    "fzoo4": Method(lambda: qzo.FZOO(probes=4)),  # every evaluation weighted, shared f(theta)
    "fzoo4_mean": Method(lambda: qzo.FZOO(probes=4, baseline="mean")),
    "fzoo4_spread": Method(lambda: qzo.FZOO(probes=4), normalize="spread", grid=NORMALIZED_GRID),  # FZOO's own
    "fzoo4_spread_cos": Method(lambda: qzo.FZOO(probes=4), normalize="spread", schedule="cosine",
                               grid=NORMALIZED_GRID),
    "fzoo8_spread_cos": Method(lambda: qzo.FZOO(probes=8), normalize="spread", schedule="cosine",
                               grid=NORMALIZED_GRID),
    "spsa_rms_cos": Method(lambda: qzo.SPSA(), normalize="rms", schedule="cosine", grid=NORMALIZED_GRID),
    # LoRA-aware; 8e-3 was its grid's best and stable on seed 0, so 1.6e-2 extends it to span the blow-up point
    "spsa_b_only": Method(lambda: qzo.SPSA(), select=("*lora_B*",), grid=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)),
    # B only with a cosine decay: at a constant 8e-3, seed 1 reached 1.58 at 1600 forwards and rose to 2.11 by 2000
    "spsa_b_only_cos": Method(lambda: qzo.SPSA(), select=("*lora_B*",), schedule="cosine",
                              grid=(4e-3, 8e-3, 1.6e-2, 3.2e-2)),
    # B alone for the first 100 steps (10% of MeZO's run: until B has moved off zero), then both
    "spsa_b_first100": Method(lambda: qzo.SPSA(), noise_scale={"*lora_A*": 0}, noise_scale_steps=100),
    "spsa_a_half": Method(lambda: qzo.SPSA(), noise_scale={"*lora_A*": 0.5}),  # A explored at half B's eps
    "conmezo": Method(lambda: qzo.ConMeZO(theta=1.35, beta=0.99)),
    "per_example": Method(lambda: qzo.PerExample()),  # a probe per row (GRZO's idea), 2 a step
    "per_example_spread_cos": Method(lambda: qzo.PerExample(), normalize="spread", schedule="cosine",
                                     grid=NORMALIZED_GRID),
    "gv4_spread_cos": Method(lambda: qzo.GV(pool=4, split=0.5), normalize="spread", schedule="cosine",
                             grid=NORMALIZED_GRID),  # steering + a scale-free step
    # steering + a scale-free step + B only (issue 13's combined row); 4e-2 was the best of the first four,
    # so 8e-2 extends the grid to span the blow-up point (it blew up)
    "gv4_b_only_spread_cos": Method(lambda: qzo.GV(pool=4, split=0.5), normalize="spread", schedule="cosine",
                                    select=("*lora_B*",), grid=(5e-3, 1e-2, 2e-2, 4e-2, 8e-2)),
    "conmezo_b_only": Method(lambda: qzo.ConMeZO(theta=1.35, beta=0.99), select=("*lora_B*",),
                             grid=(4e-3, 8e-3, 1.6e-2, 3.2e-2)),  # the steered family's best on B only
    # issue 31: the steered methods with the mechanics of their authors' code (not yet run: see the note on 31)
    "gv2_mem_b_only_cos": Method(lambda: qzo.GV(pool=2, memory=True), select=("*lora_B*",), schedule="cosine",
                                 grid=(2e-3, 4e-3, 8e-3, 1.6e-2)),  # MeZO-GV's trainer.py: 1 new seed vs the kept one
    "gv2_mem_unit_b_only_cos": Method(lambda: qzo.GV(pool=2, memory=True, unit=True), select=("*lora_B*",),
                                      schedule="cosine", grid=(4e-3, 8e-3, 1.6e-2, 3.2e-2)),
    "ldsd_jaguar_b_only_cos": Method(lambda: qzo.LDSD(candidates=5, sigma=1e-3, lr_mu=4e-2, mu_init="unit"),
                                     select=("*lora_B*",), schedule="cosine", subsample=0.1,
                                     rule=lambda lr: qzo.SignMomentum(lr=lr, beta=0.9),
                                     grid=(2.5e-5, 5e-5, 1e-4, 2e-4)),  # zo_rl_jaguar: sign of a momentum, 10% a step
    "greedy4_b_only_cos": Method(lambda: qzo.Greedy(pool=4), select=("*lora_B*",), schedule="cosine",
                                 grid=(2e-3, 4e-3, 8e-3, 1.6e-2)),
    "first_order": None,
}
# the steered family: methods that rank a pool (GV, Greedy) or learn the direction they sample around (LDSD's
# mean; ConMeZO's momentum, which is what LDSD's learned mean tries to be)
STEERED = ("gv4", "greedy", "ldsd", "gv4_cos", "ldsd_cos", "gv4_spread_cos", "gv4_b_only_spread_cos", "conmezo",
           "conmezo_b_only", "gv2_mem_b_only_cos", "gv2_mem_unit_b_only_cos", "ldsd_jaguar_b_only_cos",
           "greedy4_b_only_cos")
FO_GRID = (3e-4, 1e-3)
EPS = 1e-2
FO_FORWARDS_PER_STEP = 3  # forward + backward, in forward-equivalents
BATCH, MAX_LEN, EVAL_BATCH = 4, 96, 16
FIELDS = ["method", "lr", "seed", "phase", "budget", "forwards", "wall_s", "eval_loss"]
CSV_PATH = RESULTS / "convergence.csv"
HELD_OUT_LIMIT: int | None = None  # --quick evaluates on the first chats only
SOURCE = "smollm2-135m"  # --source: the model every run loads (the tests' smoke run: a tiny folder)
DEADLINE: float | None = None  # --time-limit: time.monotonic() after which the benchmark stops at a step's end
BLOW_UP = 1.1  # a run blew up when a held-out loss exceeds its starting loss by 10% (or is not finite)


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
        return [dict(r, lr=float(r["lr"]), seed=int(r["seed"]), budget=int(r["budget"]), forwards=int(r["forwards"]),
                     wall_s=float(r["wall_s"]), eval_loss=float(r["eval_loss"])) for r in csv.DictReader(f)]


def append_rows(rows: list[dict]) -> None:
    new = not CSV_PATH.is_file()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(CSV_PATH, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def sweep_phase(method: str) -> str:
    """The CSV phase of a method's lr sweep: ``sweep-cut`` (the full run's schedule, cut) for a scheduled method."""
    m = METHODS[method]
    return "sweep-cut" if m is not None and m.schedule != "constant" else "sweep"


def swept_phase(rows, method: str) -> str:
    """The phase whose sweeps a method's lr comes from: a scheduled method's cut sweeps once it has any, else
    the sweeps run before the rule (a method's lrs never mix the two protocols)."""
    phase = sweep_phase(method)
    if phase == "sweep-cut" and not any(r["method"] == method and r["phase"] == phase for r in rows):
        return "sweep"
    return phase


def sweep_curve(rows, method: str, lr: float, sweep_budget: int) -> list[dict]:
    """The seed-0 sweep run of ``lr`` (:func:`swept_phase`)."""
    return curve(rows, method, lr, 0, swept_phase(rows, method), sweep_budget)


def log_path(method: str, lr: float, seed: int, phase: str, budget: int) -> Path:
    """The replay log of an unfinished ZO run (committed: a few KB; deleted when the run's rows reach the CSV)."""
    return RESULTS / "convergence_runs" / f"{method}-lr{lr:g}-seed{seed}-{phase}-{budget}.jsonl"


class TimeLimit(Exception):
    """--time-limit ran out: the current run stops after a logged step, to go on from its log next time."""


class RunLog:
    """An unfinished run's replay log: a header, one line per step, one per evaluation, one per resume.

    A step line holds what :class:`qzo.replay.RecordingLoss` saw (every loss the optimizer
    received) with the forward count and the cumulative wall time; an evaluation line holds
    the CSV row and :func:`qzo.replay.state_digest` of the trainables. Replaying the step
    lines through :class:`qzo.replay.ReplayedLoss` rebuilds the run's whole state with no
    forward, so a run goes on across sessions and machines from a text file small enough to
    commit (a model checkpoint in git is what we do not do), and the digests say whether the
    rebuilt state is bit-identical to the one evaluated. Lines are appended and flushed; a
    line torn by a kill is dropped on reading (the step it held runs again).
    """

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        lines = []
        if path.is_file():
            text = path.read_text()
            for raw in text.splitlines(keepends=True):
                if not raw.endswith("\n"):
                    break
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    break
            if lines and {k: lines[0].get(k) for k in header} != header:
                raise SystemExit(f"{path} was written by another configuration ({lines[0]}, this run: {header}); "
                                 "move it away to start the run afresh")
            kept = "".join(json.dumps(line) + "\n" for line in lines)
            if kept != text:  # a torn last line: keep the whole ones
                tmp = path.with_suffix(".tmp")
                tmp.write_text(kept)
                os.replace(tmp, path)
        self.steps = [line for line in lines if line.get("kind") == "step"]
        self.evals = [line for line in lines if line.get("kind") == "eval"]
        self.started = bool(lines)

    def append(self, line: dict, sync: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            if sync:
                os.fsync(f.fileno())

    def start(self) -> None:
        self.append(dict(self.header, kind="start", device=device_name(), date=time.strftime("%Y-%m-%d %H:%M")), True)


def replay(log: RunLog, opt: "qzo.ZO", params) -> tuple[int, float, str]:
    """Bring a fresh ``opt`` to the log's last step; ``(step, wall, digest check)`` where the check is
    ``"bit-exact"`` when every evaluation's digest was met again, else names the first that was not."""
    digests = {e["step"]: e["digest"] for e in log.evals}
    check, step, wall = "bit-exact", 0, 0.0
    for line in log.steps:
        closure = ReplayedLoss(line["record"])
        opt.step(closure)
        if opt.forwards != line["forwards"] or not closure.exhausted:
            raise SystemExit(f"{log.path}: step {line['step']} replayed to {opt.forwards} forwards, the log says "
                             f"{line['forwards']}: the code or config changed since it was written")
        step, wall = line["step"], line["wall"]
        if step in digests and state_digest(params) != digests[step] and check == "bit-exact":
            check = f"differs from the recorded values at step {step} (equal to float rounding only)"
    return step, wall, check


def setup(seed: int):
    """``(model, tokenizer, LoRA params, training batches)`` of a run: the demo model in NF4, LoRA r 8 on q,v."""
    # every method on bitsandbytes' plain CPU 4-bit path (qzo's default; the fused kernel has no
    # backward, and measured slower here: benchmarks/cpu_4bit_paths.py)
    model, tok = qzo.load(SOURCE, quant="nf4", cpu_fused_4bit=False)
    params = qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=seed)
    batches = Batcher(ChatDataset.from_jsonl(tok, "builtin:demo_train", MAX_LEN), BATCH, seed, tok.pad_token_id)
    return model, tok, params, batches


def run_one(method: str, lr: float, seed: int, budget: int, eval_every: int, phase: str,
            horizon: int | None = None) -> list[dict]:
    """Train one method to ``budget`` forwards; held-out loss at every multiple of eval_every.

    ``horizon`` (forwards) is what an lr schedule spans when it is not the budget: a ``sweep-cut``
    run is the first ``budget`` forwards of a ``horizon``-forward run.

    A ZO run logs every step's losses (:class:`RunLog`), so a benchmark stopped mid-run (a
    session ends) goes on from its last logged step, bit-exactly: the batches and seeds are
    pure functions of the step, and a replay of the logged losses rebuilds the optimizer.
    """
    first_order = METHODS[method] is None
    model, tok, params, batches = setup(seed)
    held = ChatDataset.from_jsonl(tok, "builtin:demo_eval", MAX_LEN)
    if HELD_OUT_LIMIT:
        held = ChatDataset(held.input_ids[:HELD_OUT_LIMIT], held.labels[:HELD_OUT_LIMIT], held.source)
    rows, wall, forwards, step = [], 0.0, 0, 0
    evaluate = lambda: eval_loss(model, held, EVAL_BATCH, tok.pad_token_id)
    row = lambda f, w: dict(method=method, lr=lr, seed=seed, phase=phase, budget=budget, forwards=f,  # noqa: E731
                            wall_s=round(w, 2), eval_loss=evaluate())
    log = RunLog(log_path(method, lr, seed, phase, budget),
                 dict(method=method, lr=lr, seed=seed, phase=phase, budget=budget, eps=EPS, batch=BATCH,
                      max_len=MAX_LEN, held_out_limit=HELD_OUT_LIMIT, **({"horizon": horizon} if horizon else {})))
    if first_order:
        adam = first_order_adam(params, lr)
        rows.append(row(0, 0.0))
    else:
        opt = METHODS[method].optimizer(params, lr, seed, budget, horizon)
        if log.started:
            t0 = time.perf_counter()
            step, wall, check = replay(log, opt, params)
            forwards, rows = opt.forwards, [e["row"] for e in log.evals]
            print(f"  resumed at {forwards} forwards (step {step}) by replaying {log.path.name} in "
                  f"{time.perf_counter() - t0:.0f} s: {check}", flush=True)
            log.append(dict(kind="resume", step=step, device=device_name(), date=time.strftime("%Y-%m-%d %H:%M"),
                            state=check), True)
        else:
            log.start()
            rows.append(row(0, 0.0))
            log.append(dict(kind="eval", step=0, row=rows[-1], digest=state_digest(params)), True)
    next_eval = eval_every * (rows[-1]["forwards"] // eval_every + 1)

    def evaluated():
        nonlocal next_eval
        rows.append(row(forwards, wall))
        while next_eval <= forwards:
            next_eval += eval_every
        if not first_order:
            log.append(dict(kind="eval", step=step, row=rows[-1], digest=state_digest(params)), True)

    if forwards >= next_eval and forwards < budget:  # stopped inside an evaluation: it runs now
        evaluated()
    while forwards < budget and not blew_up(rows):  # a blown-up run is disqualified: spend the CPU on the next
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
            closure = RecordingLoss(qzo.CausalLMLoss(model, batch))
            try:
                opt.step(closure)
            except qzo.NonFiniteLossError:
                rows.append(dict(row(forwards, wall), eval_loss=float("nan")))
                break
            forwards = opt.forwards
        wall += time.perf_counter() - t0
        if not first_order:
            log.append(dict(kind="step", step=step, forwards=forwards, wall=wall, record=closure.record))
        if forwards >= next_eval or forwards >= budget:
            evaluated()
        if DEADLINE is not None and time.monotonic() > DEADLINE and forwards < budget and not first_order:
            raise TimeLimit(f"{log.path.name} at {forwards} forwards")
    if rows[-1]["forwards"] != forwards:
        rows.append(row(forwards, wall))
    return rows


def finish(method: str, lr: float, seed: int, phase: str, budget: int) -> None:
    """The run's rows are in the CSV: its replay log has done its work."""
    log_path(method, lr, seed, phase, budget).unlink(missing_ok=True)


def in_progress() -> list[dict]:
    """The unfinished runs (their logs): how far each got, for a partial table's JSON."""
    out = []
    for path in sorted((RESULTS / "convergence_runs").glob("*.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        steps = [x for x in lines if x.get("kind") == "step"]
        evals = [x["row"] for x in lines if x.get("kind") == "eval"]
        out.append({"log": path.name, "forwards_done": steps[-1]["forwards"] if steps else 0,
                    "held_out": [[e["forwards"], round(e["eval_loss"], 4)] for e in evals],
                    "sessions": sum(x.get("kind") in ("start", "resume") for x in lines)})
    return out


def curve(rows, method, lr, seed, phase, budget=None):
    pts = [r for r in rows if r["method"] == method and r["lr"] == lr and r["seed"] == seed and r["phase"] == phase
           and (budget is None or r["budget"] == budget)]
    return sorted(pts, key=lambda r: r["forwards"])


def blew_up(points: list[dict]) -> bool:
    """Whether a run's held-out loss went non-finite or rose past BLOW_UP x its start."""
    start = points[0]["eval_loss"]
    return any(not p["eval_loss"] == p["eval_loss"] or p["eval_loss"] > BLOW_UP * start for p in points)


def forwards_to_reach(points: list[dict], target: float, key: str = "forwards") -> float | None:
    """First ``key`` (forward count or wall seconds) at which the held-out loss is <= target (interpolated)."""
    for a, b in zip(points, points[1:]):
        if b["eval_loss"] <= target:
            if a["eval_loss"] <= target:
                return a[key]
            frac = (a["eval_loss"] - target) / (a["eval_loss"] - b["eval_loss"])
            return a[key] + frac * (b[key] - a[key])
    return points[0][key] if points and points[0]["eval_loss"] <= target else None


def mean_curve(rows, method, lr, seeds, budget) -> list[dict]:
    """Seed-mean held-out loss and wall time on a common forward grid (each seed linearly interpolated)."""
    curves = [c for c in (curve(rows, method, lr, s, "main", budget) for s in seeds) if c]
    end = min(c[-1]["forwards"] for c in curves)
    grid = sorted({p["forwards"] for c in curves for p in c if p["forwards"] <= end})
    out = []
    for x in grid:
        loss, wall = [], []
        for c in curves:
            for a, b in zip(c, c[1:]):
                if a["forwards"] <= x <= b["forwards"]:
                    w = 0.0 if b["forwards"] == a["forwards"] else (x - a["forwards"]) / (b["forwards"] - a["forwards"])
                    loss.append(a["eval_loss"] + w * (b["eval_loss"] - a["eval_loss"]))
                    wall.append(a["wall_s"] + w * (b["wall_s"] - a["wall_s"]))
                    break
        if loss:
            out.append({"forwards": x, "eval_loss": statistics.mean(loss), "wall_s": statistics.mean(wall)})
    return out


def stable_lr_range(rows, method, sweep_budget, budget) -> list[float] | None:
    """[lowest, highest] swept lr whose seed-0 run did not blow up, in its sweep nor, where the lr
    also ran the full budget, there (None: every lr blew up)."""
    grid = METHODS[method].grid if METHODS[method] is not None else FO_GRID

    def stable(lr) -> bool:
        swept, full = sweep_curve(rows, method, lr, sweep_budget), curve(rows, method, lr, 0, "main", budget)
        return bool(swept) and not blew_up(swept) and not (full and blew_up(full))

    kept = [lr for lr in grid if stable(lr)]
    return [min(kept), max(kept)] if kept else None


TIMING_PATH_NAME = "convergence_timing.json"


def calibrate(methods: dict[str, float], steps: int = 6, warmup: int = 2, rounds: int = 3) -> dict:
    """Seconds per forward of each method's training step, measured back to back in one process.

    Why: a run's own wall time is summed over whatever the machine did meanwhile, and once a
    run resumes it mixes sessions and machines, so fractions of MeZO's wall time read from
    the runs compare unlike things. Here every method's step (the same ``opt.step`` on the
    same batches as its runs, held-out evaluation excluded: every method evaluates at the
    same forward counts) is timed in ``rounds`` interleaved rounds on one machine, after
    ``warmup`` untimed steps; the median over all timed steps is the method's cost. Wall time
    to a loss is then the forwards to reach it times that cost.
    """
    per_step: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m, lr in methods.items():
            model, _, params, batches = setup(seed=0)
            if METHODS[m] is None:
                adam = first_order_adam(params, lr)
            else:
                opt = METHODS[m].optimizer(params, lr, 0, 10**9)
            for step in range(1, warmup + steps + 1):
                batch = batches.batch(step)
                t0 = time.perf_counter()
                if METHODS[m] is None:
                    adam.zero_grad(set_to_none=True)
                    model(**batch).loss.backward()
                    adam.step()
                    forwards = FO_FORWARDS_PER_STEP
                else:
                    opt.step(RecordingLoss(qzo.CausalLMLoss(model, batch)))
                    forwards = opt.strategy.forwards_per_step
                if step > warmup:
                    per_step[m].append((time.perf_counter() - t0) / forwards)
            del model
    return {"device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "steps_timed": steps * rounds,
            "seconds_per_forward": {m: round(statistics.median(v), 4) for m, v in per_step.items()}}


def summarize(rows, budget, seeds, sweep, best_lr, sweep_budget, timing=None, sweep_protocol=None) -> dict:
    methods, finals = {}, {}
    for m in METHODS:
        curves = [c for c in (curve(rows, m, best_lr.get(m), s, "main", budget) for s in seeds) if c]
        if not curves:
            continue
        finals[m] = statistics.mean(c[-1]["eval_loss"] for c in curves)
        methods[m] = {"lr": best_lr[m], "seeds": len(curves), "final_eval_loss": round(finals[m], 4),
                      "final_eval_loss_per_seed": [round(c[-1]["eval_loss"], 4) for c in curves],
                      "blew_up_seeds": sum(blew_up(c) for c in curves),
                      "wall_s_mean": round(statistics.mean(c[-1]["wall_s"] for c in curves), 1),
                      "stable_lr_range": stable_lr_range(rows, m, sweep_budget, budget)}
    per_forward = None
    cost = (timing or {}).get("seconds_per_forward", {})  # calibrate()'s, when MeZO has one
    cost = cost if "spsa" in cost else {}
    if "spsa" in methods:
        # fractions: where a method's seed-mean curve first reaches MeZO's final seed-mean
        # loss, in forwards and in wall seconds, over MeZO's (interpolated between evaluations)
        target = finals["spsa"]
        spsa = mean_curve(rows, "spsa", best_lr["spsa"], seeds, budget)[-1]
        per_forward = round(spsa["wall_s"] / spsa["forwards"], 3)
        for m, info in methods.items():
            mean = mean_curve(rows, m, best_lr[m], seeds, budget)
            reach = forwards_to_reach(mean, target)
            info["fraction_of_spsa_forwards"] = None if reach is None else round(reach / spsa["forwards"], 3)
            # wall: the forwards to reach MeZO's loss at the method's calibrated cost (calibrate()), over
            # MeZO's; without a calibration for both, the runs' own summed wall times (mixed sessions)
            if m in cost:
                info["seconds_per_forward"] = cost[m]
                info["fraction_of_spsa_wall"] = None if reach is None else round(
                    reach * cost[m] / (spsa["forwards"] * cost["spsa"]), 3)
            else:
                wall = forwards_to_reach(mean, target, "wall_s")
                info["fraction_of_spsa_wall"] = None if wall is None else round(wall / spsa["wall_s"], 3)
            info["wall_from"] = "calibration" if m in cost else "runs"
    zo = {m: i for m, i in methods.items() if m not in ("spsa", "first_order") and not i["blew_up_seeds"]}
    ranked = lambda names: min(names, key=lambda m: methods[m]["final_eval_loss"]) if names else None  # noqa: E731
    return {"device": device_name(), "budget_forwards": budget, "seeds": list(seeds), "eps": EPS,
            "batch": BATCH, "max_len": MAX_LEN,
            "seconds_per_forward": cost.get("spsa", per_forward),
            "seconds_per_forward_from": "calibration" if cost else "MeZO's runs (summed wall over forwards)",
            "timing": timing,
            "first_order_forwards_per_step": FO_FORWARDS_PER_STEP, "sweep_budget": sweep_budget,
            "blow_up_rule": f"a held-out loss above {BLOW_UP} x the run's start, or not finite",
            "best_zo": ranked(list(zo)), "best_steered": ranked([m for m in zo if m in STEERED]),
            "sweep": sweep, "sweep_note": "final held-out loss on seed 0 per lr (nan: diverged)",
            "sweep_protocol": {m: sweep_protocol_text(m, p) for m, p in (sweep_protocol or {}).items()},
            "methods": methods}


def sweep_protocol_text(method: str, phase: str) -> str:
    """What a method's sweep runs were, for the JSON."""
    if phase == "sweep-cut":
        return "the full run's schedule, cut at a third of the budget"
    if sweep_phase(method) == "sweep":
        return "the full run's first third (constant lr)"
    return ("a third of the budget with the schedule over those forwards (run before the cut rule: it decays 3x "
            "faster than the full run's)")


def plot(rows, summary, best_lr, seeds, budget) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in summary["methods"]:
        curves = [c for c in (curve(rows, m, best_lr[m], s, "main", budget) for s in seeds) if c]
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
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--sweep-budget", type=int, default=None, help="default: a third of --budget")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="one grid for every method (default: each "
                    "method's own)")
    ap.add_argument("--grid", nargs="+", default=[], metavar="METHOD=LR,LR",
                    help="a method's own lr grid, e.g. fzoo4_spread_cos=5e-3,1e-2 (a partial sweep; say so in --note)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--note", default="", help="a remark stored in the JSON (e.g. why some seeds are missing)")
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="stop after the step that passes this many seconds (e.g. before a session ends); the "
                         "same command later goes on from the unfinished run's replay log")
    ap.add_argument("--calibrate", action="store_true",
                    help="time each tabulated method's step back to back (on a quiet machine: a few minutes) into "
                         f"results/{TIMING_PATH_NAME}; the JSON's wall fractions use it")
    ap.add_argument("--sweep-only", action="store_true",
                    help="run the lr sweeps and no full run (with --grid, splits a sweep across processes)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="only tabulate the runs already in the CSV (e.g. of an interrupted benchmark)")
    ap.add_argument("--source", default="smollm2-135m",
                    help="the model every run loads (a built-in name, .gguf, folder or hub id); the table's protocol "
                         "and its replay logs are for the default, the demo model: another source is for smoke "
                         "runs into another results folder (its logs' headers do not name the model)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (budget 8, one lr per method, seed 0, 16 held-out chats) into a temporary "
                         "results folder")
    args = ap.parse_args()
    global FO_GRID, HELD_OUT_LIMIT, DEADLINE, SOURCE
    SOURCE = args.source
    if args.time_limit is not None:
        DEADLINE = time.monotonic() + args.time_limit
    if args.quick:
        args.budget, args.sweep_budget, args.seeds, args.eval_every = 8, 4, [0], 4
        for m in METHODS.values():
            if m is not None:
                m.grid = m.grid[:1]
        FO_GRID, HELD_OUT_LIMIT = FO_GRID[:1], 16
        use_results_dir(Path(os.environ.get("QZO_BENCH_RESULTS") or tempfile.mkdtemp(prefix="qzo-convergence-")))
    if args.lrs:
        for m in METHODS.values():
            if m is not None:
                m.grid = tuple(args.lrs)
    for item in args.grid:
        name, _, values = item.partition("=")
        METHODS[name].grid = tuple(float(v) for v in values.split(","))
    sweep_budget = args.sweep_budget or max(1, args.budget // 3)
    rows = load_rows()

    def ensure(method, lr, seed, budget, phase):
        nonlocal rows
        if curve(rows, method, lr, seed, phase, budget):
            finish(method, lr, seed, phase, budget)  # a stop between the CSV write and the log's removal
            return
        swept = curve(rows, method, lr, seed, sweep_phase(method), budget)
        if phase == "main" and swept:  # the sweep at the full budget was this very run (deterministic)
            again = [dict(r, phase="main") for r in swept]
            append_rows(again)
            rows += again
            return
        if args.summarize_only:
            return
        print(f"run {phase} {method} lr={lr:g} seed={seed} budget={budget}", flush=True)
        try:
            new = run_one(method, lr, seed, budget, min(args.eval_every, budget), phase,
                          args.budget if phase == "sweep-cut" else None)
        except TimeLimit as stop:
            print(f"time limit reached: stopped {stop}; the same command goes on from its replay log", flush=True)
            args.summarize_only = True  # tabulate what is finished, start nothing new
            return
        append_rows(new)
        finish(method, lr, seed, phase, budget)
        rows += new
        print(f"  held-out {new[0]['eval_loss']:.4f} -> {new[-1]['eval_loss']:.4f} in {new[-1]['wall_s']:.0f} s "
              f"({new[-1]['wall_s'] / max(new[-1]['forwards'], 1):.2f} s/forward)", flush=True)

    sweep, best_lr, late_blow_up, protocol = {}, {}, {}, {}
    for m in args.methods:  # a method's sweep, then its first seed: a partial table is usable early
        grid = FO_GRID if METHODS[m] is None else METHODS[m].grid
        for lr in grid:
            ensure(m, lr, 0, sweep_budget, sweep_phase(m))
        curves = {lr: c for lr in grid if (c := sweep_curve(rows, m, lr, sweep_budget))}
        if not curves:
            continue
        protocol[m] = swept_phase(rows, m)
        sweep[m] = {f"{lr:g}": round(c[-1]["eval_loss"], 4) for lr, c in curves.items()}
        # the best final loss among the runs that did not blow up (else the least bad)
        stable = {lr: c for lr, c in curves.items() if not blew_up(c)} or curves
        best_lr[m] = min(stable, key=lambda lr: stable[lr][-1]["eval_loss"]
                         if stable[lr][-1]["eval_loss"] == stable[lr][-1]["eval_loss"] else float("inf"))
        if args.sweep_only:
            continue
        ensure(m, best_lr[m], args.seeds[0], args.budget, "main")
        # the check the protocol asks for: a chosen lr that blows up later in the full run is replaced by
        # the next lower lr that was stable in the sweep (a third of the budget cannot see a late blow-up)
        while (main := curve(rows, m, best_lr[m], args.seeds[0], "main", args.budget)) and blew_up(main):
            lower = sorted((lr for lr in stable if lr < best_lr[m] and not blew_up(stable[lr])), reverse=True)
            if not lower:
                break
            late_blow_up.setdefault(m, []).append(best_lr[m])
            print(f"  {m} lr={best_lr[m]:g} blew up in the full run at seed {args.seeds[0]}: next lower stable "
                  f"lr {lower[0]:g}", flush=True)
            best_lr[m] = lower[0]
            ensure(m, best_lr[m], args.seeds[0], args.budget, "main")
    for s in [] if args.sweep_only else args.seeds[1:]:
        for m in best_lr:
            ensure(m, best_lr[m], s, args.budget, "main")
    seeds_done = [s for s in args.seeds if all(curve(rows, m, best_lr[m], s, "main", args.budget) for m in best_lr)]
    if seeds_done != args.seeds:
        print(f"complete seeds: {seeds_done} (of {args.seeds}); the table uses what each method has")

    timing_path = RESULTS / TIMING_PATH_NAME
    if args.calibrate and best_lr:
        print(f"calibrating the cost of a step: {', '.join(best_lr)}", flush=True)
        timing_path.write_text(json.dumps(calibrate(best_lr, **({"steps": 1, "warmup": 0, "rounds": 1}
                                                                 if args.quick else {})), indent=1) + "\n")
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else None
    summary = summarize(rows, args.budget, args.seeds, sweep, best_lr, sweep_budget, timing, protocol)
    if args.note:
        summary["note"] = args.note
    if running := in_progress():
        summary["in_progress"] = running
    if late_blow_up:  # lrs the sweep chose that blew up later in the full run (replaced by the next lower)
        summary["blew_up_in_full_run"] = {m: lrs for m, lrs in late_blow_up.items()}
    write_result("convergence.json", summary)
    png = plot(rows, summary, best_lr, args.seeds, args.budget)
    print(f"device: {summary['device']}; {summary['seconds_per_forward']} s per forward (MeZO, batch {BATCH})")
    print(f"budget {args.budget} forwards, seeds {args.seeds}; lr sweep on seed 0 at {sweep_budget} forwards")
    print(f"{'method':18}{'lr':>8}{'seeds':>6}{'final held-out':>15}{'frac fwd':>9}{'frac wall':>10}{'wall s':>8}"
          f"{'blew up':>8}  stable lr range")
    for m, info in summary["methods"].items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rng = info["stable_lr_range"]
        print(f"{m:18}{info['lr']:8.0e}{info['seeds']:6d}{info['final_eval_loss']:15.4f}"
              f"{fmt(info.get('fraction_of_spsa_forwards')):>9}{fmt(info.get('fraction_of_spsa_wall')):>10}"
              f"{info['wall_s_mean']:8.0f}{info['blew_up_seeds']:8d}  "
              f"{'none' if rng is None else f'{rng[0]:g}-{rng[1]:g}'}")
    print(f"best ZO configuration: {summary['best_zo']}; best steered: {summary['best_steered']}")
    print(f"wrote {CSV_PATH}, {RESULTS / 'convergence.json'}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
