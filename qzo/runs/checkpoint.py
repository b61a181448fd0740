"""Checkpoints of a run: only what was trained, written atomically.

Layout of ``<run>/checkpoints/step-000120/``:

* ``trainables.safetensors``: the trained tensors by name (never base weights);
* ``optimizer.safetensors``: dense optimizer/strategy state tensors, when there are any;
* ``meta.json``: step, forwards, the optimizer's scalar state, the qzo version, and the
  size and SHA-256 of each tensor file (``files``).

A checkpoint is written into a hidden ``.tmp-*`` folder next to it, its files flushed to
disk, and renamed into place, so a crash mid-write leaves the previous checkpoint untouched
and no half-written one. Reading goes through :func:`verify_checkpoint`: a checkpoint whose
files are missing, truncated or altered (a disk that lied, a copy that stopped half way) is
reported and skipped, and :func:`latest_checkpoint` falls back to the newest one that
verifies, saying which it skipped and why.

A write that fails (a full disk, a read-only or unwritable folder, a quota) raises
:class:`RunDirError` naming the path and the reason, after removing what it had written:
a checkpoint's temp folder, a text file's temp file. :func:`check_writable` tries a folder
before a run starts, so an unwritable ``out_dir`` is an error before the model loads.

Nothing qzo writes in a run folder goes through a link planted there (``ln -s ~/victim RUN/.lock``
would otherwise truncate the victim): a file written in place (the lock, the step logs) is opened
by :func:`open_run_file` (``O_NOFOLLOW``, a regular file with one name, or refused); a file
rewritten whole is a temp file (``O_EXCL``) renamed over the name (:func:`atomic_write_text`), so a
link there is replaced, never followed; a sub-folder is taken by :func:`run_folder` (a link is
refused) and removed by :func:`remove_path` (a link is unlinked, never what it points to).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file, save_file

from ..cache import file_sha256
from ..errors import QzoError

if TYPE_CHECKING:  # the type only: targets/ is read lazily, where a run names its starting values
    from ..targets.lora import InitialValues

__all__ = ["lora_values", "swap_in", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "atomic_write_text",
           "verify_checkpoint", "CheckpointError", "find_checkpoint", "best_step", "record_best", "CHOICES_HELP",
           "remove_partial_writes", "RunDirError", "check_writable", "write_error", "open_run_file", "run_folder",
           "remove_path"]

#: what ``--checkpoint`` takes in ``qzo eval``, ``qzo chat`` and ``qzo export``
CHOICES_HELP = "last (default: the newest that verifies), best (lowest held-out loss) or step-N"


class CheckpointError(QzoError):
    """A checkpoint folder that cannot be trusted: a file missing, truncated or altered, or unreadable meta."""

CHECKPOINT_FILES = ("trainables.safetensors", "meta.json")


class RunDirError(QzoError, OSError):
    """A run directory that cannot be written: full, read-only, unwritable or over quota. Names the path."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] ..."
        return str(self.strerror if self.strerror is not None else super().__str__())


# the errors a write to the run directory meets that the user fixes on the machine (not qzo's bugs)
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large for the filesystem"}


def _disk_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the ``(os error N)`` safetensors' Rust writer reports."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(exc))
        if found and int(found[1]) in _DISK_ERRNOS:
            return int(found[1])
    return None


def write_error(path, exc: BaseException) -> RunDirError | None:
    """``exc`` (raised writing ``path``) as a :class:`RunDirError` naming the path; ``None``: not a disk error."""
    if isinstance(exc, RunDirError):
        return exc
    code = _disk_errno(exc)
    if code is None:
        return None
    where = getattr(exc, "filename", None) or path
    return RunDirError(code, f"cannot write {where}: {_DISK_ERRNOS[code]}")


def check_writable(folder) -> None:
    """Raise :class:`RunDirError` unless a file can be created in ``folder`` (or, if it does not exist yet, in the
    nearest folder above it that does): a 1-byte probe, written, flushed and removed. Root ignores permission bits,
    so this tries instead of asking ``os.access``."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".qzo-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"q")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        code = exc.errno if exc.errno in _DISK_ERRNOS else None
        reason = _DISK_ERRNOS[code] if code is not None else exc.strerror
        raise RunDirError(exc.errno, f"cannot write the run directory {str(folder)!r} ({existing}: {reason}); free "
                          "space, make it writable, or choose another with --set out_dir=...") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temp file + rename: readers see the old or the new file, never half."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) or exc from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        error = write_error(path, exc)
        if error is not None:
            raise error from None
        raise


def _planted(path, what: str, fix: str = "remove it") -> RunDirError:
    return RunDirError(errno.ELOOP, f"refusing to write {path}: it is {what}; qzo writes only its own regular files "
                                    f"in a run folder, never through a link; {fix} and run again")


def _link(path) -> str:
    try:
        return f"a symbolic link (to {os.readlink(path)!r})"
    except OSError:
        return "a symbolic link"


def open_run_file(path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a file in a run folder that is written in place (the lock, a step log), never through a link.

    ``O_NOFOLLOW`` refuses a symbolic link at ``path``; ``O_NONBLOCK`` keeps a planted fifo from
    blocking the open; what opens must be a regular file with one name (a hard link's other name
    would be written too). Anything else is a :class:`RunDirError` naming the path. Returns the
    descriptor (blocking again).
    """
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _planted(path, _link(path)) from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a fifo without a reader, a folder
            raise _planted(path, "not a regular file") from None
        raise write_error(path, exc) or exc from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = _planted(path, "not a regular file")
    elif st.st_nlink > 1:
        problem = _planted(path, f"a file with {st.st_nlink} names (hard links), which an in-place write would change "
                                 "under all of them", f"replace it with a copy (cp {path} {path}.new && mv {path}.new "
                                                      f"{path})")
    if problem is not None:
        os.close(fd)
        raise problem
    os.set_blocking(fd, True)
    return fd


def run_folder(path) -> Path:
    """The folder ``path`` inside a run folder (``checkpoints/``), created if missing; a link or a file there is
    refused (:class:`RunDirError`): writing into it would write wherever it points."""
    path = Path(path)
    try:
        path.mkdir()
    except FileExistsError:
        pass
    except OSError as exc:
        raise write_error(path, exc) or exc from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _planted(path, _link(path))
    if not stat.S_ISDIR(st.st_mode):
        raise _planted(path, "not a folder")
    return path


def remove_path(path) -> None:
    """Delete a file, a folder tree or a link (the link itself, never what it points to); a missing path is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)  # unlinks the links inside it, follows none
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk, so a rename cannot outlive its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the data files were synced
        pass
    finally:
        os.close(fd)


def _split_state(state, prefix: str = "") -> tuple[dict, dict]:
    """Nested dict -> (flat tensors by 'a/b' key, the same tree with tensors replaced by markers)."""
    tensors, tree = {}, {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().to("cpu").contiguous()
            tree[k] = {"__tensor__": key}
        elif isinstance(v, dict):
            sub_t, sub_tree = _split_state(v, key + "/")
            tensors.update(sub_t)
            tree[k] = sub_tree
        else:
            tree[k] = v
    return tensors, tree


def _join_state(tree, tensors: dict):
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in tree.items()}
    return tree


def save_checkpoint(run_dir: Path, step: int, trainables: dict, optimizer_state: dict, extra: dict | None = None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and return its path.

    A failed write (:class:`RunDirError`, naming the checkpoint) leaves the checkpoints as they were.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        run_folder(root)  # a planted link is refused, not written through
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    except OSError as exc:
        raise write_error(final, exc) or exc from None
    try:
        save_file(trainables, str(tmp / "trainables.safetensors"))
        tensors, tree = _split_state(optimizer_state)
        if tensors:
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        from .. import __version__

        files = {}
        for name in ("trainables.safetensors", "optimizer.safetensors"):
            if (tmp / name).is_file():
                _fsync(tmp / name)
                files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
        meta = {"step": step, "optimizer": tree, "qzo_version": __version__, **(extra or {}), "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _fsync(tmp / "meta.json")
        _fsync(tmp)
        swap_in(tmp, final)  # an identical step re-saved (e.g. after a resume) is replaced whole
        _fsync(root)
    except Exception as exc:
        error = write_error(final, exc)
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunDirError(error.errno, f"cannot write checkpoint {final} ({error.strerror.split(': ')[-1]}); "
                              "the checkpoints before it are intact") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's meta, after checking every tensor file against the size and SHA-256 it records.

    Raises :class:`CheckpointError` naming the file and what is wrong with it. Checkpoints
    written before checksums existed (no ``files`` in meta) are checked for their files
    being present and readable.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict) or "step" not in meta or "optimizer" not in meta:
            raise ValueError("not a checkpoint's meta (no step / optimizer)")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'meta.json'} is unreadable: {exc}") from None
    files = meta.get("files")
    if files is None:  # an older checkpoint: no checksums to compare
        files = {"trainables.safetensors": None}
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if want is None:
            continue
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{file} has {size} bytes, its checkpoint recorded {want['bytes']} (truncated?)")
        if file_sha256(file) != want["sha256"]:
            raise CheckpointError(f"{file} does not match the SHA-256 its checkpoint recorded (altered)")
    return meta


def latest_checkpoint(run_dir: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported (to ``log``, else a warning) and skipped."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            skipped.append((path, exc))
            continue
        for bad, exc in skipped:
            _say(f"qzo: checkpoint {bad.name} is corrupt ({exc}); using {path.name} instead", log)
        return path
    for bad, exc in skipped:
        _say(f"qzo: checkpoint {bad.name} is corrupt ({exc}); no older checkpoint verifies", log)
    return None


def _say(message: str, log) -> None:
    if log is not None:
        log(message)
    else:
        warnings.warn(message, stacklevel=3)


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """``(trainables, optimizer_state, meta)`` of a checkpoint folder, verified first (:func:`verify_checkpoint`)."""
    path = Path(path)
    meta = verify_checkpoint(path)
    trainables = load_file(str(path / "trainables.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors")) if (path / "optimizer.safetensors").is_file() else {}
    return trainables, _join_state(meta["optimizer"], tensors), meta


def remove_partial_writes(run_dir: Path) -> list[str]:
    """Delete what a process killed inside a write left: ``checkpoints/.tmp-*`` / ``.old-*`` folders, and in the
    run folder the temp folders of the best and final values and :func:`atomic_write_text`'s temp files.

    Only the process that owns the run (it holds the run's lock) may call this. Returns the
    paths removed, relative to the run folder.
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    partial = ([p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
               if root.is_dir() and not root.is_symlink() else [])  # a planted link: nothing deleted through it
    texts = ("config.yaml", "steps.jsonl", "metrics.jsonl", "summary.json", "best.json", "data.json")
    partial += [p for p in run_dir.iterdir() if p.name in (".best-tmp", ".best-old", ".final-tmp", ".adapter-old")
                or (p.is_file() and any(p.name.startswith(f".{t}.") for t in texts))] if run_dir.is_dir() else []
    for p in partial:
        remove_path(p)
    return [str(p.relative_to(run_dir)) for p in partial]


def best_step(run_dir: Path) -> dict | None:
    """``{"step", "eval_loss"}`` of the run's best held-out loss so far (``RUN/best.json``), or ``None``."""
    path = Path(run_dir) / "best.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def record_best(run_dir: Path, step: int, eval_loss: float) -> None:
    """Mark ``step`` (whose checkpoint exists) as the run's best; atomically, so a crash keeps the old mark."""
    atomic_write_text(Path(run_dir) / "best.json", json.dumps({"step": int(step), "eval_loss": float(eval_loss)}))


def find_checkpoint(run_dir: Path, which: str = "last", log: Callable[[str], None] | None = None) -> Path:
    """The checkpoint ``which`` names (see :data:`CHOICES_HELP`), verified; :class:`QzoError` naming what exists."""
    run_dir = Path(run_dir)
    which = str(which).strip()
    if which == "last":
        found = latest_checkpoint(run_dir, log)
        if found is None:
            raise QzoError(f"run {str(run_dir)!r} has no checkpoint that verifies yet; train it first (or let it "
                           "reach train.save_every)")
        return found
    if which == "best":
        best = best_step(run_dir)
        if best is None:
            raise QzoError(f"run {str(run_dir)!r} has no best checkpoint yet (one is kept at each held-out "
                           "evaluation that improves on the best); use --checkpoint last")
        which = f"step-{best['step']}"
    if not which.startswith("step-") or not which[5:].isdigit():
        raise QzoError(f"--checkpoint {which!r}: give {CHOICES_HELP}")
    path = run_dir / "checkpoints" / f"step-{int(which[5:]):06d}"
    if not (path / "meta.json").is_file():
        have = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
        raise QzoError(f"run {str(run_dir)!r} has no checkpoint {which}; it has: {have}")
    verify_checkpoint(path)
    return path


def prune_checkpoints(run_dir: Path, keep: int, newest_good: Path | None = None, best: dict | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints; never the newest one that verifies, nor the best one.

    A caller that has just written a checkpoint passes it as ``newest_good`` (and its best
    mark as ``best``), so nothing is read back: otherwise the newest checkpoint that verifies
    is looked up, which hashes every tensor file.
    """
    if (Path(run_dir) / "checkpoints").is_symlink():  # a planted link: nothing is deleted through it
        return
    good = Path(newest_good) if newest_good is not None else latest_checkpoint(run_dir, log=lambda _: None)
    best = best if best is not None else best_step(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        if old != good and not (best and old.name == f"step-{best['step']:06d}"):
            remove_path(old)


def lora_values(path: Path) -> "InitialValues":
    """The LoRA tensors of a qzo run's last checkpoint, or of one checkpoint folder, with the run's settings.

    What ``lora.init_from`` starts from when it names a run: the run folder's layout is known here, not in
    :mod:`qzo.targets.lora`, which checks and installs the values (:func:`qzo.targets.lora.load_initial_values`).
    """
    from ..targets.lora import INIT_HELP, InitialValues

    if (path / "config.yaml").is_file() and (path / "steps.jsonl").exists():
        ckpt, run_dir = find_checkpoint(path, "last"), path
    elif (path / "meta.json").is_file() and (path / "trainables.safetensors").is_file():
        ckpt, run_dir = path, path.parent.parent
    else:
        raise QzoError(f"lora.init_from {str(path)!r} is neither a PEFT adapter folder nor a qzo run or checkpoint; "
                       f"{INIT_HELP}")
    tensors = {k: v for k, v in load_checkpoint(ckpt)[0].items() if ".lora_A." in k or ".lora_B." in k}
    if not tensors:
        raise QzoError(f"lora.init_from {str(ckpt)!r} holds no LoRA values (its run did not train LoRA); start from a "
                       "run that did (targets.lora: true)")
    r0 = alpha0 = base = None
    if (run_dir / "config.yaml").is_file():  # a checkpoint copied out of its run: rank and shapes are still checked
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        r0, alpha0 = cfg.get("lora", {}).get("r"), cfg.get("lora", {}).get("alpha")
        base = cfg.get("model", {}).get("source")
    return InitialValues(f"{ckpt.name} of the qzo run {run_dir}", tensors, r0, alpha0, base)


def swap_in(src: Path, dest: Path) -> None:
    """Move ``src`` (a file or folder) to ``dest``, replacing a folder there whole (renames only: nothing is copied;
    a link at ``dest`` is replaced, never followed)."""
    if src.is_dir() and os.path.lexists(dest):
        old = dest.parent / f".{dest.name}-old"
        remove_path(old)
        os.replace(dest, old)
        os.replace(src, dest)
        remove_path(old)
    else:
        os.replace(src, dest)
