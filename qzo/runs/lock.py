"""One live ``qzo train`` per run directory: an exclusive lock that dies with its process.

Two processes writing one run directory would interleave their step logs and overwrite
each other's checkpoints. ``RUN/.lock`` is held with ``flock`` for as long as the run
trains: the kernel drops it when the process ends in any way (``kill -9`` included), so a
crashed run never leaves a stale lock behind, and no pid file has to be trusted. The file
itself stays (it records who held it last, for the error message); only the lock matters.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..errors import QzoError

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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
