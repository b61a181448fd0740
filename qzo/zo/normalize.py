"""Scale-free steps: the projected gradient divided by a measure of its own size, for any strategy.

Every method on the demo blew up at 1.5-2x its best lr: a plain ZO step is lr * g * z, and
g (the slope along z) swings by orders of magnitude between batches and as training goes.
Dividing g by a running or per-step measure of its scale makes the step's size set by lr
alone:

* ``"spread"`` (FZOO's normalization, ICLR 2026, github DKmiyan/FZOO): g is divided
  by sigma / eps, with sigma the population standard deviation of the step's probe losses
  (FZOO: the N one-sided probes, not f(theta); SPSA: f+ and f-). For FZOO this is exactly its
  published update, lr * sum_i (f_i - f(theta)) z_i / (N sigma). For SPSA it turns the step
  into lr * sign(f+ - f-) * z. A step whose probes all tie carries no information and
  moves nothing.
* ``"rms"``: g is divided by a bias-corrected running RMS of the past g's (beta 0.99 by
  default), a scalar Adam second moment: large slopes shrink, the sign and the relative
  size of this step's slope are kept.

What neither does is shrink the step as the gradient shrinks near a minimum: with a
constant lr a normalized run keeps stepping at full size (measured on the demo task: FZOO
at a constant lr led MeZO early and then stalled). Pair it with a decaying schedule
(``qzo.Schedule("cosine", ...)``) or a clip.

The step log records the normalized g, so a state-free rule replays from the log alone;
the running RMS is part of the optimizer's checkpoint.
"""

from __future__ import annotations

import math

from ..errors import QzoError
from .types import Component, Estimate

__all__ = ["Normalize", "NORMALIZATIONS", "clip_grad"]

NORMALIZATIONS = ("spread", "rms")


class Normalize(Component):
    """Divide a step's projected gradient by the spread of its losses or a running RMS of past ones.

    Args:
        kind: ``"spread"`` or ``"rms"`` (see the module docs).
        beta: ``"rms"``: the running mean's decay (0.99: about the last 100 steps).
    """

    def __init__(self, kind: str = "spread", beta: float = 0.99):
        if kind not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {kind!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.kind, self.beta = kind, float(beta)
        self.mean_square, self.t = 0.0, 0

    def __call__(self, est: Estimate, eps: float) -> float:
        """The normalized projected gradient of ``est`` (its ``grad`` divided by the scale)."""
        if self.kind == "spread":
            losses = est.spread if est.spread is not None else est.losses
            mean = math.fsum(losses) / len(losses)
            sigma = math.sqrt(math.fsum((f - mean) ** 2 for f in losses) / len(losses))
            return est.grad * eps / sigma if sigma > 0 else 0.0
        self.t += 1
        self.mean_square = self.beta * self.mean_square + (1 - self.beta) * est.grad * est.grad
        rms = math.sqrt(self.mean_square / (1 - self.beta**self.t))
        return est.grad / rms if rms > 0 else 0.0

    def state_dict(self) -> dict:
        return {"mean_square": self.mean_square, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.mean_square, self.t = float(state.get("mean_square", 0.0)), int(state.get("t", 0))


def clip_grad(grad: float, clip: float | None) -> float:
    """QZO's directional-derivative clipping: ``grad`` limited to ``[-clip, clip]``.

    ``grad`` is the projected gradient ``(f+ - f-) / (2 eps)``. A quantized model's loss
    can jump when a scale perturbation flips the rounding of many activations, and one
    such step would otherwise throw the scales far off; QZO clips at C = 100. ``None``
    leaves the value as it is; NaN passes through so the caller's finiteness check still
    sees it.
    """
    if clip is None:
        return grad
    if not clip > 0:
        raise QzoError(f"clip must be > 0 (QZO uses 100), got {clip}")
    if math.isnan(grad):
        return grad
    return max(-clip, min(clip, grad))
