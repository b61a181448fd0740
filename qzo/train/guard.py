"""The divergence guard (``train.divergence_factor``): a step whose loss blows up is undone exactly.

A ZO step's loss is measured at the values the *previous* update left: step t evaluates
``f(theta_{t-1} +- eps z)``. So a loss that is not finite, or that jumps past
``divergence_factor`` x the running mean of the last :data:`WINDOW` accepted steps' losses,
convicts update t-1, and makes update t (estimated at that point) worthless too. The guard
then puts back the values from before update t-1: the trainables *and* the optimizer's
state (momenta, Adam moments, a strategy's mean, the normalizer's RMS), copied, not
subtracted (``x - lr g z + lr g z`` is not ``x`` in floats), so they are bit-exact. The
lr is multiplied by ``divergence_backoff`` from then on, the step log marks the step
(``"reverted": {"reason", "to_step", "lr"}``), and ``divergence_limit`` undone steps in a
row stop the run, naming them.

After an undo the values in place are ones whose loss was accepted; a bad loss right after
(a hard batch, not a bad update) undoes only that step's own update.

Cost: two copies of the trainables and the optimizer state (host RAM; the LoRA of a 135M
model is 0.9 MB each), made every step, and held in each checkpoint so that a resumed run
can still undo the step before it (its ``optimizer.safetensors`` grows by that much).
Off by default (``divergence_factor: null``): a non-finite loss then stops the run with
:class:`qzo.errors.NonFiniteLossError`, as without the guard.
"""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteLossError

__all__ = ["DivergenceGuard", "WINDOW"]

WINDOW = 20  # accepted steps in the running mean: ~5 batches' worth of noise at batch 4-8 on the demo


def _clone(state):
    """A deep copy of a state tree: tensors cloned (the live ones are updated in place)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


class DivergenceGuard:
    """Undo a step whose loss is non-finite or past ``factor`` x the running mean; back the lr off.

    Args:
        factor: a loss above ``mean + (factor - 1) * |mean|`` (``factor x mean`` for a positive
            loss) of the last :data:`WINDOW` accepted steps is a blow-up (> 1).
        backoff: the lr is multiplied by this at every undone step (0 < backoff <= 1).
        limit: this many undone steps in a row stop the run (:attr:`stop_reason`).
        base_lr: the rule's configured lr (what the backoff scales).
    """

    def __init__(self, factor: float, backoff: float, limit: int, base_lr: float):
        self.factor, self.backoff, self.limit, self.base_lr = float(factor), float(backoff), int(limit), float(base_lr)
        self.lr_scale = 1.0
        self.losses: list[float] = []  # accepted steps' losses, the last WINDOW
        self.undone: list[int] = []  # the steps undone in a row, up to now
        self.prev: dict | None = None  # the state before the last accepted update, while its loss is unknown
        self.prev_step = 0  # ...which is the state after this step
        self.last_event: str | None = None  # what the last step did, when it was undone (for the log)
        self.stop_reason: str | None = None

    @classmethod
    def from_config(cls, train: dict, opt) -> "DivergenceGuard | None":
        """The guard ``train.divergence_*`` asks for (``None``: off)."""
        if train.get("divergence_factor") is None:
            return None
        return cls(train["divergence_factor"], train["divergence_backoff"], train["divergence_limit"], opt.rule.lr)

    def _why_bad(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not self.losses:
            return None
        mean = math.fsum(self.losses) / len(self.losses)
        if loss > mean + (self.factor - 1.0) * abs(mean):
            return (f"loss {loss:.4f} is over {self.factor:g} x the running mean {mean:.4f} of the last "
                    f"{len(self.losses)} accepted steps")
        return None

    @staticmethod
    def _snapshot(opt) -> dict:
        return {"values": opt.params.state_dict(), "opt": _clone(opt.state_dict())}

    def _restore(self, opt, snap: dict) -> None:
        """Put ``snap`` back; the step and forward counters go on (the forwards were spent)."""
        steps, forwards, calls = opt.steps, opt.forwards, opt.forward_calls
        opt.params.load_state_dict(snap["values"])
        opt.load_state_dict(_clone(snap["opt"]))
        opt.steps, opt.forwards, opt.forward_calls = steps, forwards, calls

    def step(self, opt, closure, step: int) -> tuple[float, dict]:
        """``opt.step(closure)`` under the guard: ``(loss, the step log's record)``."""
        before = self._snapshot(opt)  # the values after step - 1
        lr = opt.lr_at(step)
        self.last_event = None
        try:
            loss = opt.step(closure)
            record = opt.last_record.to_json()
            why = self._why_bad(loss)
        except NonFiniteLossError as exc:  # raised with the trainables at `before`; the step's forwards are spent
            loss, why = float("nan"), str(exc).split(";")[0]  # "loss is inf at step 4 (evaluation 1 of the step)"
            opt.steps = step
            record = {"step": step, "seeds": [], "direction": [], "grad": None, "losses": [], "loss": None,
                      "lr": lr, "forwards": opt.forwards}
        if why is None:
            self.prev, self.prev_step = before, step - 1
            self.losses = (self.losses + [loss])[-WINDOW:]
            self.undone = []
            return loss, record
        # the loss was measured at the values update step-1 left: undo it (and this step's own update);
        # right after an undo those values were accepted already, and only this step's update goes
        target, to_step = (self.prev, self.prev_step) if self.prev is not None else (before, step - 1)
        self._restore(opt, target)
        self.prev = None
        self.lr_scale *= self.backoff
        opt.rule.lr = self.base_lr * self.lr_scale
        self.undone.append(step)
        record["loss"] = loss if math.isfinite(loss) else None
        record["reverted"] = {"reason": why, "to_step": to_step, "lr": opt.rule.lr}
        self.last_event = (f"step {step}: {why}; undone (the values after step {to_step} are back), "
                           f"lr backed off to {opt.rule.lr:.3g}")
        if len(self.undone) >= self.limit:
            steps = ", ".join(map(str, self.undone))
            self.stop_reason = (f"divergence guard: {len(self.undone)} steps in a row undone (steps {steps}; "
                                f"the last, step {step}: {why}); the values are those after step {to_step}, the "
                                f"lr is down to {opt.rule.lr:.3g}: lower optim.lr or check the data")
        return loss, record

    def state_dict(self) -> dict:
        """What a checkpoint keeps (the snapshot's tensors go to ``optimizer.safetensors``)."""
        return {"lr_scale": self.lr_scale, "losses": list(self.losses), "undone": list(self.undone),
                "prev_step": self.prev_step, "prev": self.prev}

    def load_state_dict(self, state: dict | None, opt) -> None:
        """Continue from a checkpoint's guard state (``None``: a checkpoint written without the guard)."""
        state = state or {}
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.losses = [float(x) for x in state.get("losses", [])]
        self.undone = [int(x) for x in state.get("undone", [])]
        self.prev_step = int(state.get("prev_step", 0))
        self.prev = _clone(state.get("prev"))
        opt.rule.lr = self.base_lr * self.lr_scale
