"""Ctrl-C and ``kill`` (SIGTERM) stop a run at the next step boundary, with a checkpoint.

A ZO step is seconds to minutes of forwards; stopping inside one would lose it and, worse,
leave the trainables perturbed. The first SIGINT or SIGTERM only raises a flag: the loop
finishes the step it is in, writes a checkpoint, prints the resume command and returns. A
second signal stops at once (``KeyboardInterrupt``): checkpoints and run files are written
atomically, so even then the last checkpoint stays intact, and ``--resume`` continues from
it.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["GracefulStop"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """``with GracefulStop() as stop:`` ... ``if stop.requested:`` (its name in ``stop.signal_name``).

    Outside the main thread (where Python cannot install handlers) it does nothing and
    ``requested`` stays False.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._saved: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number is not None else ""

    def _handle(self, number, frame) -> None:
        if self.signal_number is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signal_number = number

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for number in _SIGNALS:
                self._saved[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._saved.items():
            signal.signal(number, handler)
        self._saved.clear()
