"""Everything a training run writes into its folder, and how: the write half of the run directory.

:mod:`qzo.runs.reader` reads a run folder back (chat, eval, export and plot use it without the
training loop); :mod:`qzo.runs.checkpoint` holds the checkpoint format; this module holds the
writes the loop makes (:class:`RunWriter`) and the rules they keep:

* a log line is whole or absent: a write that fails (a full disk) is cut back off, and a
  line a kill tore is dropped when a resume cuts the logs to its checkpoint;
* a folder (``best/``, the final ``adapter/``) is written whole into a temp folder, then
  swapped in by renames, so a failed write leaves the previous values in place;
* nothing is written through a link planted in the folder (:mod:`qzo.runs.checkpoint`'s
  ``open_run_file``, ``remove_path``), and a folder is a run folder only by qzo's mark, the
  lock file a new run writes first (:func:`new_run_dir`): ``out_dir`` pointing at a user's own
  files is refused untouched, and a second start on a live run is refused before it writes a byte;
* one process writes: under ``torchrun`` rank 0's :class:`RunWriter` writes and every other
  rank's is silent, so the loop calls the same methods on every rank without a rank test.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import yaml

from .checkpoint import (RunDirError, swap_in, atomic_write_text, best_step, latest_checkpoint, open_run_file, prune_checkpoints,
                         record_best, remove_path, save_checkpoint, write_error)
from .lock import RunLock
from ..errors import QzoError
from ..zo.params import ParamSet
from ..targets.base import save_parts

__all__ = ["RunWriter", "new_run_dir", "write_final_values", "append_jsonl", "truncate_jsonl", "write_into",
           "disk_full", "claim_run_dir"]


def append_jsonl(path: Path, record: dict) -> None:
    """One line more; a write that fails (a full disk) is cut back off, so no half line stays behind."""
    with os.fdopen(open_run_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8") as f:
        size = f.tell()
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
        except OSError as exc:
            f.truncate(size)  # frees what was written: it works on a full disk
            raise write_error(path, exc) or exc from None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= last_step (a crash may have logged steps past the checkpoint).

    A line that does not parse is the one a kill tore in half while it was written (always
    the last): it is dropped with the steps past the checkpoint.
    """
    if not os.path.lexists(path):
        return
    with os.fdopen(open_run_file(path, os.O_RDONLY), encoding="utf-8") as f:  # a planted link is refused
        text = f.read()
    keep = []
    for line in text.splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def write_into(tmp: Path, write, what: str) -> None:
    """``write()`` into the fresh temp folder ``tmp``; one that fails (a full disk) leaves no ``tmp`` behind and
    raises a :class:`RunDirError` naming ``what`` was written."""
    remove_path(tmp)
    try:
        tmp.mkdir()
        write()
    except BaseException as exc:
        remove_path(tmp)
        error = write_error(what, exc)
        if error is not None:
            raise error from None
        raise


def write_final_values(parts: dict[str, ParamSet], run_dir: Path) -> None:
    """The trained values in their users' formats (``adapter/`` PEFT, ``scales/dense.safetensors``), which
    :func:`qzo.targets.load` reads back from ``run_dir``."""
    save_parts(parts.values(), run_dir)


# what a start that never trained leaves (a killed start, a refused one), with atomic_write_text's temp files
_UNSTARTED = {".lock", "config.yaml", "steps.jsonl", "data.json"}


def _unstarted(run_dir: Path) -> bool:
    """A run folder that a killed ``qzo train`` created but never trained: nothing in it is worth keeping."""
    names = {p.name for p in run_dir.iterdir()}
    steps = run_dir / "steps.jsonl"
    return (all(n in _UNSTARTED or n.startswith((".config.yaml.", ".data.json.")) for n in names)
            and (not os.path.lexists(steps) or os.lstat(steps).st_size == 0))


def claim_run_dir(run_dir: Path, lock: RunLock) -> None:
    """Make ``run_dir`` this process's new run folder, holding ``lock``, before a byte of the run is written.

    The lock is taken first: in an empty (or new) folder it is qzo's mark (:meth:`RunLock.marks`),
    and a folder that holds files but no mark is not a qzo run (a user's own files) and is
    refused untouched. In a run folder a live run holds it, and the start is refused
    (:class:`~qzo.runs.lock.RunInUseError`) before anything of that run is overwritten. Under
    the lock, a folder whose run has started is refused (resume it instead); one a killed start
    left unstarted is reused.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        names = os.listdir(run_dir)
    except (FileExistsError, NotADirectoryError):
        raise QzoError(f"out_dir {str(run_dir)!r} is a file, not a folder; choose a folder with --set "
                       "out_dir=...") from None
    if names and not RunLock.marks(run_dir, alone=names == [".lock"]):
        shown = ", ".join(repr(n)[:40] for n in sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise QzoError(f"out_dir {str(run_dir)!r} holds files ({shown}) and is not a qzo run folder (no .lock written "
                       "by qzo); qzo writes a new run only into an empty or new folder: choose another with --set "
                       "out_dir=..., or empty this one")
    lock.acquire(run_dir)  # in an empty folder: the first byte, and qzo's mark
    if not _unstarted(run_dir):
        raise QzoError(f"out_dir {str(run_dir)!r} already exists and holds a run; continue it with "
                       f"`qzo train --resume {run_dir}` or choose another with --set out_dir=...")


def new_run_dir(cfg: dict, config_path, lock: RunLock | None = None) -> Path:
    """Create the folder of a new run (``out_dir``, or ``runs/<config>-<time>``) with its config and empty step log.

    The folder is claimed first (:func:`claim_run_dir`: ``lock``, qzo's mark, then the check
    that no run started there), so a refused start has written nothing. Sets
    ``cfg["out_dir"]`` to the folder; ``lock`` is held on return (``None``: a lock of its own,
    released at once: for callers that train nothing).
    """
    if cfg["out_dir"]:
        run_dir = Path(cfg["out_dir"])
    else:
        name = Path(config_path).stem if config_path else "demo"
        run_dir = Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    held = lock if lock is not None else RunLock()
    try:
        claim_run_dir(run_dir, held)
        cfg["out_dir"] = str(run_dir)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        os.close(open_run_file(run_dir / "steps.jsonl", os.O_WRONLY | os.O_CREAT))
    except BaseException:
        if lock is None:
            held.release()
        raise
    if lock is None:
        held.release()
    return run_dir


def disk_full(run_dir: Path | None, exc: OSError) -> OSError:
    """A write that failed for a reason the user fixes (space, a read-only folder) as one clear
    :class:`RunDirError`: the path, the reason, the last checkpoint that verifies, how to go on.
    Other errors are returned as they are."""
    error = write_error(run_dir, exc)
    if error is None:
        return exc
    if run_dir is None:
        return error
    ckpt = latest_checkpoint(run_dir, log=lambda _: None)
    kept = f"the last checkpoint, {ckpt.name}, verifies" if ckpt else "no checkpoint had been written yet"
    return RunDirError(error.errno, f"{error}; {kept}; free space (or make {run_dir} writable) and continue with: "
                       f"qzo train --resume {run_dir}")


class RunWriter:
    """The writes of one run folder: logs, checkpoints, the best and final values, the summary.

    ``writes=False`` (ranks other than 0 under ``torchrun``): every write is skipped, the
    reads of what rank 0 wrote still work, so the loop is the same code on every rank.
    """

    def __init__(self, run_dir: Path, writes: bool = True):
        self.run_dir, self.writes = Path(run_dir), writes

    # the logs -------------------------------------------------------------------------------
    def log_step(self, record: dict) -> None:
        """One line of ``steps.jsonl`` (the step log: what replays the step)."""
        if self.writes:
            append_jsonl(self.run_dir / "steps.jsonl", record)

    def log_metrics(self, row: dict) -> None:
        """One line of ``metrics.jsonl`` (step, forwards, loss, wall_s, eval_loss)."""
        if self.writes:
            append_jsonl(self.run_dir / "metrics.jsonl", row)

    def metrics(self) -> list[dict]:
        """The rows of ``metrics.jsonl`` so far."""
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def logged_wall(self) -> float:
        """The wall seconds of the last logged step (a resumed run's clock goes on from it)."""
        path = self.run_dir / "steps.jsonl"
        lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        return float(json.loads(lines[-1])["wall_s"]) if lines else 0.0

    def write_json(self, name: str, payload: dict) -> None:
        """``RUN/name`` written atomically (``data.json``, ``summary.json``)."""
        if self.writes:
            atomic_write_text(self.run_dir / name, json.dumps(payload, indent=2))

    def write_config(self, cfg: dict) -> None:
        """``RUN/config.yaml``: the resolved config (what ``--resume`` reads back)."""
        if self.writes:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    # a resume ---------------------------------------------------------------------------------
    def cut_to(self, done: int) -> None:
        """A resume from step ``done`` redoes the later steps: their log lines and any best mark past it go."""
        if not self.writes:
            return
        truncate_jsonl(self.run_dir / "steps.jsonl", done)
        truncate_jsonl(self.run_dir / "metrics.jsonl", done)
        best = best_step(self.run_dir)
        if best is None or best["step"] <= done:
            return
        (self.run_dir / "best.json").unlink()  # recomputed from the evaluations kept whose checkpoint exists
        evals = [(m["eval_loss"], m["step"]) for m in self.metrics() if m.get("eval_loss") is not None
                 and 0 < m["step"] <= done and (self.run_dir / "checkpoints" / f"step-{m['step']:06d}").is_dir()]
        if evals:
            loss, step = min(evals)
            record_best(self.run_dir, step, loss)

    def evals_after(self, best: dict | None) -> int:
        """Held-out evaluations logged after the best one (what ``train.early_stop_patience`` counts)."""
        if best is None:
            return 0
        return sum(1 for r in self.metrics() if r.get("eval_loss") is not None and r["step"] > best["step"])

    # checkpoints and values -------------------------------------------------------------------
    def checkpoint(self, step: int, trainables: dict, opt_state: dict, forwards: int) -> Path | None:
        """``checkpoints/step-NNNNNN/`` (atomic, verified on resume); its path, or ``None`` on a silent rank."""
        if not self.writes:
            return None
        return save_checkpoint(self.run_dir, step, trainables, opt_state, extra={"forwards": forwards})

    def prune(self, keep: int, newest_good: Path | None, best: dict | None) -> None:
        """Keep the newest ``keep`` checkpoints, never the best one's or the one just written."""
        if self.writes:
            prune_checkpoints(self.run_dir, keep, newest_good=newest_good, best=best)

    def keep_best(self, step: int, eval_loss: float, parts: dict[str, ParamSet]) -> None:
        """Step ``step`` (checkpointed) becomes the run's best: ``RUN/best.json`` and ``RUN/best/`` (its values)."""
        if not self.writes:
            return
        record_best(self.run_dir, step, eval_loss)
        tmp = self.run_dir / ".best-tmp"
        write_into(tmp, lambda: write_final_values(parts, tmp), f"the best values in {self.run_dir / 'best'}")
        swap_in(tmp, self.run_dir / "best")

    def write_final(self, parts: dict[str, ParamSet]) -> None:
        """The final values (``adapter/``, ``scales/dense.safetensors``), written whole, then moved into place:
        a full disk leaves the previous ones."""
        if not self.writes:
            return
        tmp = self.run_dir / ".final-tmp"
        write_into(tmp, lambda: write_final_values(parts, tmp), f"the final values in {self.run_dir}")
        for item in list(tmp.iterdir()):
            swap_in(item, self.run_dir / item.name)
        tmp.rmdir()
