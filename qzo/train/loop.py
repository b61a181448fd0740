"""``qzo train``: config -> run directory, read top to bottom (the loop; the builders are
:mod:`qzo.config.build`, what the run writes into its folder is :mod:`qzo.runs.writer`, reading a
run folder back is :mod:`qzo.runs.reader`).

    setup (run dir, model, targets, data, optimizer) -> initial eval -> steps
    (log, eval, checkpoint) -> final eval, adapter, summary

Run directory (``out_dir``)::

    config.yaml      the resolved config (what ``--resume`` reads back)
    steps.jsonl      the step log: per step the seeds, coefficients, losses, lr, forwards, time
    data.json        per data split: source, rows, SHA-256 of the encoded rows and the file (a resume on
                     other data is refused: ``qzo.data.dataset.check_data_unchanged``)
    metrics.jsonl    per step: step, forwards, loss, wall_s; eval_loss on evaluation steps
    checkpoints/     step-NNNNNN/ with only the trained tensors + optimizer state (atomic)
    adapter/         PEFT adapter of the final LoRA values (loads with PeftModel.from_pretrained)
    scales.safetensors, dense.safetensors   final scale / dense-slice values, when trained
                     (``qzo.load_scales`` / ``qzo.load_dense`` put them on a fresh base)
    summary.json     initial and final held-out loss, steps, forwards, wall time

Determinism: step seeds and batches are pure functions of ``(train.seed, step)``, so a run
resumed from a checkpoint produces the same bytes as one that never stopped.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..config.build import build_optimizer, describe_targets, load_model_and_targets, total_steps
from ..config.schema import load_config
from ..data.dataset import (Batcher, ChatDataset, check_data_unchanged, data_record, datasets_from_config, eval_loss,
                            model_input_device)
from ..data.loss import CausalLMLoss
from ..data.objectives import RewardLoss, load_reward
from ..errors import NonFiniteLossError, QzoError
from ..runs.checkpoint import (best_step, check_writable, latest_checkpoint, list_checkpoints, load_checkpoint,
                               lora_values, remove_partial_writes)
from ..runs.lock import RunLock
from ..runs.reader import load_run_config
from ..runs.writer import RunWriter, disk_full, new_run_dir
from ..zo.auto_lr import LrSearch, find_lr
from ..zo.distributed import Distributed, init_from_env
from ..zo.optim import ZO
from ..zo.params import ParamSet
from .budget import check_budget
from .guard import DivergenceGuard
from .stop_signals import GracefulStop

__all__ = ["train", "Session"]


@dataclass
class Session:
    """Everything a training run holds while it runs."""

    cfg: dict
    run_dir: Path
    model: object
    tok: object
    params: ParamSet  # everything ZO trains (the parts combined)
    parts: dict  # kind ("lora", "scales", "dense") -> its ParamSet
    opt: ZO
    train_ds: ChatDataset
    eval_ds: ChatDataset
    batcher: Batcher
    reward_fn: object = None  # objective.kind reward: the loaded reward function
    lock: RunLock | None = None  # held while this process trains the run (released by train())
    best: dict | None = None  # RUN/best.json as last written ({"step", "eval_loss"}), kept here so no eval re-reads it
    dist: Distributed | None = None  # under torchrun: this rank's place; None for one process
    guard: DivergenceGuard | None = None  # train.divergence_factor: undoes a step whose loss blows up (qzo.train.guard)
    evals_since_best: int = 0  # held-out evaluations after the best one (train.early_stop_patience counts them)
    out: RunWriter | None = None  # the run folder's writes (silent on ranks other than 0)
    spent_forwards: int = 0  # forwards of the budget spent before step 1 (optim.lr auto's range test)

    def __post_init__(self):
        if self.out is None:
            self.out = RunWriter(self.run_dir, writes=self.writer)

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory (rank 0 alone, or the only process)."""
        return self.dist is None or self.dist.rank == 0


def setup(config_path=None, overrides=None, resume=None, log=print) -> Session:
    """Build a session: a new run from a config, or a resumed one from its last checkpoint.

    The session holds the run's lock (``qzo.runs.lock``) from before the first write to the
    run directory; :func:`train` releases it, and so does a failure here.
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_run_config(run_dir, overrides)
    else:
        cfg = load_config(config_path, overrides)
        run_dir = None
    t = cfg["train"]
    dist = init_from_env(t["candidate_parallel"], t["dist_timeout_s"])  # None for one process
    writer = dist is None or dist.rank == 0
    if writer:  # a full or read-only out_dir is an error now, not after the model has loaded
        check_writable(run_dir if run_dir is not None else cfg["out_dir"] or "runs")
    if not writer:
        log = _quiet
    elif dist is not None:
        log(f"qzo: {dist.world} ranks, {dist.layout.candidate_parallel} candidate slot(s) x {dist.layout.shards} "
            "data shard(s); rank 0 writes the run directory")
    lock = RunLock()
    try:
        if resume is not None and writer:
            lock.acquire(run_dir)  # before anything is written: another live run may own it
            RunWriter(run_dir).write_config(cfg)
        ob = cfg["objective"]
        # loaded once, before the model: a bad objective.reward fails in seconds, not after the load
        reward_fn = load_reward(ob["reward"]) if ob["kind"] == "reward" else None
        check_budget(cfg)  # what cannot fit is refused before the model loads (qzo.train.budget)
        log(f"qzo: loading {cfg['model']['source']} ({cfg['model']['quant']})")
        local = _load_config(cfg, dist, run_dir if resume else None)
        start_values = _initial_lora(local["lora"]["init_from"])
        model, tok, params, parts = load_model_and_targets(local, initial_lora=start_values)
        train_ds, eval_ds = datasets_from_config(cfg, tok)
        check_budget(cfg, train_ds, eval_ds)  # and the batches' widths, once the data is tokenized
        dropped = f", {train_ds.dropped} dropped: no assistant token within train.max_len" if train_ds.dropped else ""
        packed = f" packed into {len(train_ds)} rows" if train_ds.row_len else ""
        log(f"qzo: {train_ds.num_examples} training examples{packed}, {len(eval_ds)} held-out{dropped}; "
            f"{describe_targets(parts)}")
        data = data_record(cfg, train_ds, eval_ds) if writer else None
        if run_dir is None:
            if writer:
                run_dir = new_run_dir(cfg, config_path, lock)  # takes the lock before its first byte
                RunWriter(run_dir).write_json("data.json", data)
            run_dir = Path(_from_rank0(dist, str(run_dir) if writer else None))  # every rank: rank 0's folder
            cfg["out_dir"] = str(run_dir)
        elif writer and not check_data_unchanged(run_dir, data):  # refuses a data file changed since the start
            RunWriter(run_dir).write_json("data.json", data)  # a run from before data.json
        batcher = Batcher(train_ds, cfg["train"]["batch_size"], cfg["train"]["seed"], tok.pad_token_id)
        session = Session(cfg, run_dir, model, tok, params, parts, None, train_ds, eval_ds, batcher, reward_fn, lock,
                          dist=dist)
        lr = None
        if cfg["optim"]["lr"] == "auto":
            search = _auto_lr(session, resume is not None, log)
            lr, session.spent_forwards = search.lr, search.forwards
        opt = session.opt = build_optimizer(cfg, params, dist, lr=lr, spent_forwards=session.spent_forwards)
        opt.forwards = session.spent_forwards  # the range test's count in the run's (a checkpoint's replace them)
        session.guard = DivergenceGuard.from_config(t, opt)
        if resume is not None:
            ckpt = None
            if writer:
                for name in remove_partial_writes(run_dir):
                    log(f"qzo: removed {name}, left by a write that was interrupted")
                ckpt = latest_checkpoint(run_dir, log)
            # every rank loads the checkpoint rank 0 verified, after rank 0 truncated the logs to it
            ckpt = _from_rank0(dist, None if ckpt is None else str(ckpt))
            ckpt = None if ckpt is None else Path(ckpt)
            done = 0
            if ckpt is not None:
                trainables, opt_state, meta = load_checkpoint(ckpt)
                params.load_state_dict(trainables)
                opt.load_state_dict(opt_state)
                if session.guard is not None:
                    session.guard.load_state_dict(opt_state.get("guard"), opt)
                done = meta["step"]
            session.out.cut_to(done)  # rank 0: the log lines and best mark past the checkpoint go
            if dist is not None:
                dist.barrier()  # the others read best.json and metrics.jsonl once rank 0 has cut them
            session.best = best_step(run_dir)
            session.evals_since_best = session.out.evals_after(session.best)
            log(f"qzo: resuming {run_dir} from step {done}")
        return session
    except BaseException:
        lock.release()
        raise


def _auto_lr(s: Session, resuming: bool, log) -> LrSearch:
    """``optim.lr: auto``: the lr a range test on the first batch finds (``qzo.zo.auto_lr``), tested once per
    run and kept in ``auto_lr.json``, which a resume reads back (a test from resumed values would differ)."""
    path = s.run_dir / "auto_lr.json"
    if resuming:
        if not path.is_file():
            raise QzoError(f"{s.run_dir} was started with optim.lr auto but has no auto_lr.json (the lr its steps "
                           "used); it cannot resume bit-exactly: start a new run")
        try:
            return LrSearch.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise QzoError(f"{path}: not the lr record qzo wrote ({exc}); start a new run") from None
    device = model_input_device(s.model)
    search = find_lr(s.params, lambda lr: build_optimizer(s.cfg, s.params, s.dist, lr=lr, schedule=False),
                     objective_closure(s, 1, device))
    blew = f"steps blow up at lr {search.blowup_lr:.3g}" if search.blowup_lr else "no step blew up"
    log(f"qzo: optim.lr auto: a range test of {search.forwards} forwards on the first batch: {blew}; training at "
        f"lr {search.lr:.3g}")
    s.out.write_json("auto_lr.json", search.to_json())
    return search


def _load_config(cfg: dict, dist: Distributed | None, resuming: Path | None) -> dict:
    """The config this process loads the model with (the run's own ``cfg`` is what gets saved).

    Under torchrun on CUDA each rank takes its own GPU (``cuda:LOCAL_RANK``) unless
    ``model.device_map`` says otherwise (``auto`` would spread every rank's copy over all
    GPUs). A resume that has a checkpoint does not need ``lora.init_from`` (the checkpoint's
    values replace the starting ones), so a start folder deleted since does not stop it.
    """
    import torch

    local = copy.deepcopy(cfg)
    if dist is not None and torch.cuda.is_available() and cfg["model"]["device_map"] is None:
        local["model"]["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if resuming is not None and local["lora"].get("init_from") and list_checkpoints(resuming):
        local["lora"]["init_from"] = None
    return local


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def _from_rank0(dist: Distributed | None, value):
    """``value`` as rank 0 has it, on every rank (``value`` itself for one process)."""
    return value if dist is None else dist.from_rank0(value)


def _save(s: Session, best_loss: float | None = None) -> None:
    """Checkpoint this step; with ``best_loss`` also mark it the run's best. Then prune (never the best)."""
    if not s.writer:  # rank 0 writes; the others only follow the best mark (early stopping reads it)
        if best_loss is not None:
            s.best = {"step": int(s.opt.steps), "eval_loss": float(best_loss)}
        return
    opt_state = s.opt.state_dict()
    if s.guard is not None:  # its snapshot, so a resumed run can still undo the step before it
        opt_state["guard"] = s.guard.state_dict()
    written = s.out.checkpoint(s.opt.steps, s.params.state_dict(), opt_state, s.opt.forwards)
    if best_loss is not None:
        s.out.keep_best(s.opt.steps, best_loss, s.parts)
        s.best = {"step": int(s.opt.steps), "eval_loss": float(best_loss)}
    s.out.prune(s.cfg["train"]["keep_checkpoints"], newest_good=written, best=s.best)


def _evaluate(s: Session) -> float:
    return eval_loss(s.model, s.eval_ds, s.cfg["train"]["eval_batch_size"], s.tok.pad_token_id)


def objective_closure(s: Session, step: int, device):
    """What ``opt.step`` minimizes at ``step`` (``objective.kind``): the cross-entropy of the step's token
    batch, or ``-mean(reward)`` of replies generated to the raw chats of the same rows
    (:class:`qzo.objectives.RewardLoss`, sampling seeded from ``(train.seed, step)``).

    A reward run's training set is never packed (config validation refuses ``data.packing``
    with it), so ``train_ds.chats`` holds the chat of every row.

    Under ``torchrun`` each rank takes its data shard of the step's batch
    (:func:`qzo.distributed.shard_rows`: contiguous rows, a pure function of ``(train.seed,
    step, rank, world size)``), and the optimizer reduces the shards' losses token-weighted.
    """
    ob = s.cfg["objective"]
    rows = s.dist.rows(s.cfg["train"]["batch_size"]) if s.dist is not None else slice(None)
    if ob["kind"] != "reward":
        batch = {k: v[rows].to(device) for k, v in s.batcher.batch(step).items()}
        return CausalLMLoss(s.model, batch)  # can also evaluate a whole pool in one stacked forward (optim.batched)
    chats = [s.train_ds.chats[i] for i in s.batcher.indices(step)][rows]
    return RewardLoss(s.model, s.tok, chats, s.reward_fn, max_new_tokens=ob["max_new_tokens"],
                      temperature=ob["temperature"], seed=s.cfg["train"]["seed"], step=step)


def run(s: Session, log=print, progress: Progress | None = None) -> dict:
    """Train to ``train.steps`` (or ``train.forwards``) from wherever the session stands; returns the summary."""
    t = s.cfg["train"]
    steps = total_steps(s.cfg, s.spent_forwards)
    device = model_input_device(s.model)
    first_step = s.opt.steps + 1
    from ..runs.metrics import open_reporters

    # train.report_to's trackers mirror metrics.jsonl (rank 0); a resume purges the steps it redoes from TensorBoard
    scalars = (open_reporters(s.run_dir, t["report_to"], config=s.cfg, purge_step=first_step if s.opt.steps else 0,
                              log=log) if s.writer else _NoScalars())
    initial = None
    if s.opt.steps == 0:
        initial = _evaluate(s)  # every rank: they hold the same values, and all take the decisions that follow
        s.out.log_metrics({"step": 0, "forwards": 0, "loss": None, "eval_loss": initial, "wall_s": 0.0})
        scalars.add({"step": 0, "forwards": 0, "eval_loss": initial})
        log(f"qzo: held-out loss before training: {initial:.4f} ({len(s.eval_ds)} examples)")
    # wall_s counts training time from here (evaluations included), continuing across resumes.
    start_wall = time.perf_counter() - s.out.logged_wall()
    bar = progress if (progress and s.writer) else _LogLines(log)
    bar.start(steps, s.opt.steps)
    last_eval = None
    stop = GracefulStop()  # Ctrl-C / SIGTERM: finish this step, checkpoint, say how to resume
    try:
        with stop:
            for step in range(first_step, steps + 1):
                loss, evaluated, wall = _train_step(s, step, steps, device, start_wall, scalars)
                diverged = None
                if s.guard is not None:
                    if s.guard.last_event and s.writer:
                        bar.write(f"qzo: divergence guard: {s.guard.last_event}")
                    diverged = s.guard.stop_reason
                if s.dist is not None and (step % t["check_every"] == 0 or step == steps):
                    s.dist.check(s.params.state_dict())  # before anything of this step is saved
                stop_now = _any_rank(s, stop.requested)  # a signal may reach the ranks a step apart
                best = evaluated is not None and _is_best(s, evaluated)
                if evaluated is not None:
                    last_eval = evaluated
                    s.evals_since_best = 0 if best else s.evals_since_best + 1
                    if s.writer:
                        bar.write(f"step {step}: held-out loss {last_eval:.4f}" + (" (best so far)" if best else ""))
                early = _early_stop_reason(s, evaluated) if evaluated is not None and not best else None
                if step % t["save_every"] == 0 or step == steps or stop_now or best or early or diverged:
                    _save(s, evaluated if best else None)
                if diverged or (stop_now or early) and step < steps:
                    bar.close()
                    why = diverged or early or f"{stop.signal_name or 'a stop signal'} received"
                    return _stopped(s, why, step, steps, initial, time.perf_counter() - start_wall, log)
                bar.update(step, loss, last_eval, s.opt.forwards / max(wall, 1e-9) if step > first_step else None)
    finally:
        bar.close()
        scalars.close()
    return finish(s, initial, time.perf_counter() - start_wall, log)


class Progress(Protocol):
    """Where the loop reports a run's progress. The loop knows no terminal: ``qzo train`` passes a bar
    (``qzo.cli.progress``); without one, the lines it writes go to ``log``."""

    def start(self, total: int, done: int) -> None:
        """The run has ``total`` steps, ``done`` of them already (a resume)."""

    def update(self, step: int, loss: float, eval_loss: float | None, forwards_per_s: float | None) -> None:
        """A step ended (``eval_loss``: the last held-out loss so far)."""

    def write(self, line: str) -> None:
        """A line for the user (a held-out loss, a guard event), without breaking a bar."""

    def close(self) -> None:
        """The run ended, or stopped."""


class _LogLines:
    """No bar: the loop's lines go to ``log``."""

    def __init__(self, log):
        self.write = log

    def start(self, total: int, done: int) -> None:
        pass

    def update(self, step: int, loss: float, eval_loss: float | None, forwards_per_s: float | None) -> None:
        pass

    def close(self) -> None:
        pass


class _NoScalars:
    """What ranks other than 0 log to TensorBoard: nothing."""

    def add(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _any_rank(s: Session, flag: bool) -> bool:
    """``flag`` on any rank (one tiny all-reduce), so every rank stops after the same step."""
    return bool(flag) if s.dist is None else s.dist.any_rank(flag, "the stop flag")


def _is_best(s: Session, eval_loss: float) -> bool:
    return eval_loss == eval_loss and (s.best is None or eval_loss < s.best["eval_loss"])


def _train_step(s: Session, step: int, steps: int, device, start_wall: float, scalars):
    """One ZO step and its logs: ``(loss, held-out loss if evaluated now else None, wall seconds)``."""
    forwards_before = s.opt.forwards
    try:
        if s.guard is not None:  # train.divergence_factor: a blow-up is undone, not raised
            loss, record = s.guard.step(s.opt, objective_closure(s, step, device), step)
        else:
            loss = s.opt.step(objective_closure(s, step, device))  # objective.kind: cross-entropy or reward
            record = s.opt.last_record.to_json()
    except NonFiniteLossError as exc:
        ckpt = latest_checkpoint(s.run_dir)
        kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"{exc} Training stopped at step {exc.step}; {kept}.", exc.step) from None
    wall = time.perf_counter() - start_wall
    record["wall_s"] = round(wall, 4)
    s.out.log_step(record)
    row = {"step": step, "forwards": s.opt.forwards, "loss": loss if loss == loss else None, "wall_s": round(wall, 4)}
    if "reverted" in record:
        row["reverted"] = True
    evaluated = None
    if _eval_due(s.cfg["train"], step, forwards_before, s.opt.forwards) or step == steps:
        evaluated = row["eval_loss"] = _evaluate(s)
    s.out.log_metrics(row)
    scalars.add(row, lr=record.get("lr"), record=record)
    return loss, evaluated, wall


def _early_stop_reason(s: Session, eval_loss: float) -> str | None:
    """Why ``train.early_stop_*`` ends the run after this evaluation (``None``: go on)."""
    t, best = s.cfg["train"], s.best
    if best is None:
        return None
    if t["early_stop_factor"] is not None and not eval_loss <= t["early_stop_factor"] * best["eval_loss"]:
        return (f"early stop: held-out loss {eval_loss:.4f} is over {t['early_stop_factor']:g} x the best "
                f"({best['eval_loss']:.4f} at step {best['step']})")
    if t["early_stop_patience"] is not None:
        if s.evals_since_best >= t["early_stop_patience"]:
            return (f"early stop: no better held-out loss in {s.evals_since_best} evaluations since step {best['step']} "
                    f"({best['eval_loss']:.4f})")
    return None


def _stopped(s: Session, why: str, step: int, steps: int, initial, wall: float, log) -> dict:
    """The summary of a run stopped early after ``step`` (its checkpoint already written)."""
    log(f"qzo: {why}: stopped after step {step} of {steps} with a checkpoint; "
        f"continue with: qzo train --resume {s.run_dir}")
    summary = finish(s, initial, wall, log)
    summary["stopped_by"] = why
    s.out.write_json("summary.json", summary)
    return summary


def _eval_due(t: dict, step: int, forwards_before: int, forwards: int) -> bool:
    """A held-out evaluation after this step: every ``eval_every`` steps, or past each ``eval_every_forwards``."""
    every = t["eval_every_forwards"]
    if every is None:
        return step % t["eval_every"] == 0
    return forwards // every > forwards_before // every


def finish(s: Session, initial: float | None, wall: float, log=print) -> dict:
    """Write the adapter and summary; print before/after held-out loss (rank 0; the others return a short summary)."""
    if not s.writer:
        return {"steps": s.opt.steps, "forwards": s.opt.forwards, "rank": s.dist.rank, "written_by": 0}
    evals = [m["eval_loss"] for m in s.out.metrics() if m.get("eval_loss") is not None]
    if initial is None and evals:
        initial = evals[0]
    final = evals[-1] if evals else None
    s.out.write_final(s.parts)  # adapter/, scales.safetensors, dense.safetensors: whole, or the old ones stay
    summary = {"initial_eval_loss": initial, "final_eval_loss": final, "steps": s.opt.steps,
               "forwards": s.opt.forwards, "wall_s_this_session": round(wall, 2), "trainable_values": s.params.numel}
    s.out.write_json("summary.json", summary)
    if final is not None and initial is not None:
        log(f"qzo: held-out loss {initial:.4f} -> {final:.4f} after {s.opt.steps} steps "
            f"({s.opt.forwards} forwards, {wall / 60:.1f} min); run saved in {s.run_dir}")
    return summary


def _initial_lora(init_from):
    """A qzo run or checkpoint named by ``lora.init_from``, read (a PEFT adapter folder goes to qzo.lora as is)."""
    path = Path(str(init_from)).expanduser() if init_from is not None else None
    if path is None or not path.is_dir() or (path / "adapter_config.json").is_file():
        return None
    return lora_values(path)


def train(config_path=None, overrides=None, resume=None, log=print, progress: Progress | None = None) -> dict:
    """Run ``qzo train``: returns the summary dict (also written to ``summary.json``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process is a rank of one distributed run
    (``qzo.distributed``): they share each step's evaluations and batch, rank 0 alone
    writes the run directory and speaks, and the process group is closed at the end.
    ``log`` takes every line for the user; ``progress`` (a :class:`Progress`, e.g. the CLI's bar)
    shows the steps as they go (``None``: the step lines go to ``log`` too).
    """
    try:
        session = setup(config_path, overrides, resume, log)
    except OSError as exc:
        raise disk_full(None, exc) from None
    try:
        summary = run(session, log if session.writer else _quiet, progress)
    except OSError as exc:  # a full disk, a folder made read-only: say which path and what is kept
        raise disk_full(session.run_dir, exc) from None
    finally:
        session.lock.release()
    if session.dist is not None:  # not after a failure: the other ranks are stopping on their own error
        _barrier_quietly(session.dist)
    summary["run_dir"] = str(session.run_dir)
    return summary


def _barrier_quietly(dist: Distributed) -> None:
    """Wait for the other ranks at the end (rank 0 may still be writing), then leave the process group."""
    import torch.distributed as tdist

    try:
        tdist.barrier(group=dist.group)
        if dist.owns_group:  # a group the caller made (several runs in one job) stays open
            tdist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer already gone: the error that matters was raised before
        pass
