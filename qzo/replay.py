"""Rebuild trained values from a run's step log (the replay contract, for state-free rules).

With SGD every step is ``theta <- (1 - lr * wd) * theta - lr * grad * d`` where ``d`` is a
seed-replayed combination of noise, and the step log records ``lr``, ``grad`` and ``d``'s
``(seed, coefficient)`` terms. So the base model, the config (for the initial values and
weight decay) and ``steps.jsonl`` determine the trained adapter: no checkpoint needed, and
a log of a few hundred bytes per step is an exact, auditable record of the training.

The rebuilt values equal the trained ones up to float rounding: training reaches each
update through in-place +eps / -2 eps / restore passes, replay applies the update alone.
A step the divergence guard undid (``"reverted"`` in its record) puts back the values after
the step it names, as training did (``qzo.guard``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .params import ParamSet, as_param_set
from .perturb import combine, noise_cache, perturb_

__all__ = ["read_step_log", "replay_sgd"]


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
