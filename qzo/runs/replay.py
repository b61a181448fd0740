"""Rebuild trained values from a record of the run: two replays, one cheap and one exact.

**From the step log** (:func:`replay_sgd`, state-free rules). With SGD every step is
``theta <- (1 - lr * wd) * theta - lr * grad * d`` where ``d`` is a seed-replayed
combination of noise, and the step log records ``lr``, ``grad`` and ``d``'s ``(seed,
coefficient)`` terms. So the base model, the config (for the initial values and weight
decay) and ``steps.jsonl`` determine the trained adapter: no checkpoint needed, and a log of
a few hundred bytes per step is an exact, auditable record of the training. The rebuilt
values equal the trained ones up to float rounding: training reaches each update through
in-place +eps / -2 eps / restore passes, replay applies the update alone. A step the
divergence guard undid (``"reverted"`` in its record) puts back the values after the step
it names, as training did (``qzo.train.guard``).

**From the evaluations** (:class:`RecordingLoss` / :class:`ReplayedLoss`, every strategy,
rule and normalizer, bit-exact). Record the values each step's closure returned; hand them
back to a fresh optimizer, which then runs every pass the recorded one ran, in the same
order, minus the forwards. A few floats a step rebuild a run's whole state (trainables and
optimizer) on any machine whose noise and in-place passes are bit-identical, which
:func:`state_digest` checks. The convergence benchmark resumes its runs this way across
sessions, from logs small enough to commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

from ..zo.params import ParamSet, as_param_set, digest_tensors
from ..noise.passes import combine, noise_cache, perturb_

__all__ = ["read_step_log", "replay_sgd", "RecordingLoss", "ReplayedLoss", "ReplayMismatch", "state_digest"]


def read_step_log(run_dir) -> list[dict]:
    """The step records of a run directory's ``steps.jsonl``, in order."""
    path = Path(run_dir) / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay_sgd(params, records: Iterable, weight_decay: float = 0.0) -> ParamSet:
    """Apply the SGD updates of ``records`` (dicts or ``StepRecord``s) to ``params`` in place.

    Args:
        params: the trainables at their initial values (e.g. a fresh ``qzo.lora(...)`` with
            the run's seed).
        records: step records in order, each with ``lr``, ``grad`` and ``direction``.
        weight_decay: the run's ``optim.weight_decay``.
    """
    params = as_param_set(params)
    after: dict[int, dict] = {}  # the values after the last few steps: what a divergence guard's undo restores
    for r in records:
        r = r if isinstance(r, dict) else r.to_json()
        after = {k: v for k, v in after.items() if k >= int(r["step"]) - 2}
        after[int(r["step"]) - 1] = params.state_dict()
        if "reverted" in r:  # train.divergence_factor undid this step: the values after to_step, copied back
            params.load_state_dict(after[int(r["reverted"]["to_step"])])
            continue
        if float(r.get("direction_mu", 0.0)) != 0.0:
            raise ValueError(f"step {r['step']} moved along LDSD's learned mean, which the log does not hold; "
                             "replay covers state-free strategies (SPSA, GV, Greedy) with SGD")
        lr, grad = float(r["lr"]), float(r["grad"])
        seeds, coefs = combine([(int(s), -lr * grad * float(c)) for s, c in r["direction"]])
        scale = 1.0 - lr * weight_decay
        for t in params:
            perturb_(t.tensor, t.stream, seeds, coefs, scale=scale)
        noise_cache.clear()
    return params


# What the probe may read off a closure besides calling it: the batch's sizes, and the
# group evaluations of pool-batched and per-example strategies. Both wrappers answer exactly these.
BATCH_SIZES = ("rows", "tokens")
GROUP_EVALUATIONS = ("evaluate_candidates", "evaluate_rows")


class RecordingLoss:
    """An ``opt.step`` closure that keeps every value it hands the optimizer: the step's exact replay record.

    Wraps the closure a step is given (e.g. :class:`qzo.CausalLMLoss`) and forwards every
    call to it: ``closure()``, and ``evaluate_candidates`` / ``evaluate_rows`` where the
    wrapped closure has them (pool-batched and per-example strategies look for them). After
    the step, :attr:`record` holds the values in the order the probe received them, as the
    plain floats it converts them to, so ``json.dumps(record)`` round-trips them exactly.

    Why at the closure: every piece of an optimizer's state (the trainables after the
    +eps / -2 eps / restore passes, a rule's moments, a normalizer's running RMS, ConMeZO's
    momentum, LDSD's mean) is a deterministic function of the seeds, which are a function
    of the step, and of these values. :class:`ReplayedLoss` hands the same values back to a
    fresh optimizer that runs the same code, so a replay is bit-exact, for every strategy,
    rule and normalizer, without a single model forward (unlike :func:`replay_sgd`, which
    applies the updates alone and is exact to float rounding).
    """

    def __init__(self, closure):
        self.closure = closure
        self.record: dict = {"values": []}
        for name in BATCH_SIZES:
            value = getattr(closure, name, None)
            if value is not None:
                self.record[name] = int(value)

    def __call__(self):
        value = self.closure()
        self.record["values"].append(float(value.detach().float().item() if hasattr(value, "detach") else value))
        return value

    def __getattr__(self, name):
        if name not in GROUP_EVALUATIONS + BATCH_SIZES:
            raise AttributeError(name)
        if name in BATCH_SIZES:
            return getattr(self.closure, name)
        inner = getattr(self.closure, name)  # AttributeError when the wrapped closure lacks it, as the probe expects

        def recorded(params, candidates, mean=None):
            out = inner(params, candidates, mean=mean)
            parts = out if isinstance(out, tuple) else (out,)
            self.record["values"].append([_floats(p) for p in parts])
            return out

        return recorded


def _floats(values) -> list[float]:
    return [float(v) for v in torch.as_tensor(values).detach().float().cpu().tolist()]


class ReplayMismatch(ValueError):
    """A replayed step asked for other evaluations than the recorded one made (another config or code)."""


class ReplayedLoss:
    """Plays a :class:`RecordingLoss` record back to ``opt.step``: no model runs, the optimizer does the rest.

    ``opt.step(ReplayedLoss(record))`` on an optimizer built as the recorded one was (same
    trainables at the same values, strategy, rule, normalizer, seed, step) leaves it, and
    the trainables, bit-identical to the recorded run after that step. A step that asks for
    a different kind or number of evaluations than the record holds raises
    :class:`ReplayMismatch` instead of training on the wrong values.
    """

    def __init__(self, record: dict):
        self._values = list(record["values"])
        self._record = record

    def _next(self, kind: str):
        if not self._values:
            raise ReplayMismatch(f"the step asked for a {kind} evaluation past the {len(self._record['values'])} "
                                 "recorded: the optimizer is not the one that made the record")
        value = self._values.pop(0)
        if isinstance(value, list) != (kind != "loss"):
            raise ReplayMismatch(f"the step asked for a {kind} evaluation where the record holds "
                                 f"{'a group' if isinstance(value, list) else 'one loss'}")
        return value

    def __call__(self) -> float:
        return self._next("loss")

    def evaluate_candidates(self, params, candidates, mean=None):
        (losses,) = self._next("candidates")
        if len(losses) != len(candidates):
            raise ReplayMismatch(f"{len(candidates)} candidates asked for, {len(losses)} recorded")
        return torch.tensor(losses, dtype=torch.float64)

    def evaluate_rows(self, params, candidates, mean=None):
        losses, counts = self._next("rows")
        if len(losses) != len(candidates):
            raise ReplayMismatch(f"{len(candidates)} row perturbations asked for, {len(losses)} recorded")
        return torch.tensor(losses, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)

    def __getattr__(self, name):
        if name in BATCH_SIZES and name in self._record:
            return self._record[name]
        raise AttributeError(name)

    @property
    def exhausted(self) -> bool:
        """Whether the step consumed every recorded value (a replay that did not is a mismatch too)."""
        return not self._values


def state_digest(params) -> str:
    """SHA-256 of the trainables' bytes, in order: equal digests mean bit-identical values."""
    return digest_tensors(((t.name, t.tensor) for t in as_param_set(params)), hashlib.sha256()).hexdigest()
