"""Training metrics mirrored to TensorBoard (optional; ``metrics.jsonl`` stays the source of truth).

When ``torch.utils.tensorboard`` imports (the ``tensorboard`` package is installed), the
trainer writes the scalars ``train/loss``, ``eval/loss``, ``lr`` and ``forwards`` of every
``metrics.jsonl`` row to ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``).
Without tensorboard, :class:`TensorBoardScalars` does nothing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TensorBoardScalars", "tensorboard_available"]


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: torch raises ImportError on import
        return None
    return SummaryWriter


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (the ``tensorboard`` package is installed)."""
    return _summary_writer_class() is not None


class TensorBoardScalars:
    """Writes metrics rows as TensorBoard scalars under ``run_dir/tensorboard``; a no-op without tensorboard.

    ``purge_step`` (set on resume to the first step trained again) makes TensorBoard drop
    events of that step and later that an interrupted session had written past its checkpoint.
    """

    def __init__(self, run_dir, purge_step: int | None = None, flush_secs: int = 10):
        writer_cls = _summary_writer_class()
        self.writer = None
        if writer_cls is not None:
            self.writer = writer_cls(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step,
                                     flush_secs=flush_secs)

    @property
    def enabled(self) -> bool:
        """Whether events are being written."""
        return self.writer is not None

    def add(self, row: dict, lr: float | None = None) -> None:
        """Log one ``metrics.jsonl`` row (``step``, ``forwards``, ``loss``, ``eval_loss``) and the step's lr."""
        if self.writer is None:
            return
        step = int(row["step"])
        for tag, value in (("train/loss", row.get("loss")), ("eval/loss", row.get("eval_loss")), ("lr", lr),
                           ("forwards", row.get("forwards"))):
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        """Flush and close the event file (safe to call twice)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
