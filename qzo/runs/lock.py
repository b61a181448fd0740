"""One live ``qzo train`` per run directory: an exclusive lock that dies with its process.

Two processes writing one run directory would interleave their step logs and overwrite
each other's checkpoints. ``RUN/.lock`` is held with ``flock`` for as long as the run
trains: the kernel drops it when the process ends in any way (``kill -9`` included), so a
crashed run never leaves a stale lock behind, and no pid file has to be trusted. The file
itself stays (it records who held it last, for the error message); only the lock matters. It is
opened by :func:`qzo.runs.checkpoint.open_run_file`: a link planted at ``RUN/.lock`` is refused,
never followed (it would truncate whatever it points to).

The lock is also what makes a folder a qzo run folder: a new run takes it before writing
anything else, so a folder without qzo's ``.lock`` (:func:`RunLock.marks`) is not one, and
``qzo train`` refuses to write a new run into it (:func:`qzo.runs.writer.claim_run_dir`).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

from ..errors import QzoError
from .checkpoint import open_run_file

__all__ = ["RunLock", "RunInUseError"]


class RunInUseError(QzoError):
    """The run directory is being trained by another live process."""


class RunLock:
    """Holds a run directory's lock: ``RunLock(run_dir).acquire()`` or ``with RunLock(run_dir):``.

    Raises :class:`RunInUseError` if another live process holds it. ``release`` is safe to
    call more than once, and on a lock never acquired.
    """

    def __init__(self, run_dir=None):
        self.path = Path(run_dir) / ".lock" if run_dir is not None else None
        self._fd: int | None = None

    def acquire(self, run_dir=None) -> "RunLock":
        import fcntl

        if run_dir is not None:
            self.path = Path(run_dir) / ".lock"
        fd = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(fd)
            raise RunInUseError(f"run {str(self.path.parent)!r} is being trained by another process ({holder}); "
                                "wait for it to finish or stop it first (a killed run releases it at once)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    @staticmethod
    def marks(run_dir, alone: bool = False) -> bool:
        """Whether ``run_dir`` holds a lock file qzo wrote: a regular file (not a link) with the ``{"pid", "host"}``
        its holder writes, or empty where it is the folder's only file (``alone``: a start killed between creating
        the file and writing it)."""
        path = Path(run_dir) / ".lock"
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
                return False
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return False
        if not text:
            return alone
        try:
            info = json.loads(text)
        except ValueError:
            return False
        return isinstance(info, dict) and {"pid", "host"} <= set(info)

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on {info['host']}"
        except (OSError, ValueError, KeyError):
            return "pid unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
