"""The progress bar of ``qzo train``: the terminal side of :class:`qzo.train.loop.Progress`."""

from __future__ import annotations

__all__ = ["TqdmProgress"]


class TqdmProgress:
    """A tqdm bar with the step's loss, the last held-out loss and forwards a second; lines print above it."""

    def start(self, total: int, done: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc="qzo train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, eval_loss: float | None, forwards_per_s: float | None) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", eval=f"{eval_loss:.3f}" if eval_loss is not None else "-",
                             fwd_s=f"{forwards_per_s:.2f}" if forwards_per_s is not None else "-",
                             refresh=False)  # drawn once, by update
        self.bar.update(1)

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
