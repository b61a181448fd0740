"""qzo's part of a Trainer checkpoint: what ``resume_from_checkpoint`` needs to continue bit-exactly.

Beside the Trainer's files (the peft adapter, ``trainer_state.json``, the scheduler) a
checkpoint folder gets ``qzo/``, laid out as a qzo run directory's part so qzo's own readers
take it (``qzo.replay.read_step_log(folder / "qzo")``, ``qzo.runs.checkpoint.load_checkpoint``)::

    checkpoint-40/qzo/steps.jsonl                         the step log: seeds, losses, lr of every step so far
    checkpoint-40/qzo/checkpoints/step-000040/            trainables (float32, exact), the optimizer's state
                                                          (step counter, strategy, rule moments), meta.json

The trainables are saved here too, not only in the adapter: they are what qzo perturbs and
updates, written from the tensors themselves, so a resume puts back the very bits whatever the
adapter's saver did. The Trainer's own ``optimizer.pt`` holds only the scheduled lr.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QzoError
from ..runs.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from ..runs.replay import read_step_log
from ..zo.optim import ZO

__all__ = ["STATE_DIR", "save_state", "load_state", "log_values"]

#: the folder qzo writes inside each checkpoint (and inside ``save_model``'s folder)
STATE_DIR = "qzo"


def _components(zo: ZO) -> dict:
    return {"strategy": type(zo.strategy).__name__, "rule": type(zo.rule).__name__, "eps": zo.eps, "seed": zo.seed}


def save_state(folder, zo: ZO, records: list[dict]) -> Path:
    """Write ``folder/qzo/``: the step log and a verified checkpoint of the trainables and ``zo``'s state."""
    run = Path(folder) / STATE_DIR
    run.mkdir(parents=True, exist_ok=True)
    written = save_checkpoint(run, zo.steps, zo.params.state_dict(), zo.state_dict(),
                              extra={"forwards": zo.forwards, "trainer": "qzo.hf", **_components(zo)})
    prune_checkpoints(run, keep=1, newest_good=written)  # save_model into one folder twice keeps the newest
    atomic_write_text(run / "steps.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return written


def load_state(folder, zo: ZO) -> list[dict]:
    """Put ``folder/qzo/``'s trainables and optimizer state into ``zo``; returns the step log so far.

    Raises:
        QzoError: the folder has no qzo state (a first-order checkpoint, or one whose save was cut
            short), its files fail their checksums, or it was trained with another strategy, rule,
            eps or seed than ``zo`` has.
    """
    run = Path(folder) / STATE_DIR
    found = latest_checkpoint(run, log=lambda _: None) if run.is_dir() else None
    if found is None:
        raise QzoError(f"{folder} has no qzo state that verifies ({STATE_DIR}/): it was not written by a qzo.hf "
                       "trainer, or the run stopped while saving it; resume from the checkpoint before it")
    trainables, opt_state, meta = load_checkpoint(found)
    theirs = {k: meta.get(k) for k in _components(zo)}
    if theirs != _components(zo):
        raise QzoError(f"{folder} was trained with {theirs}, this trainer has {_components(zo)}: resume with the same "
                       "strategy, rule, eps and seed (TrainingArguments.seed)")
    zo.params.load_state_dict(trainables)
    zo.load_state_dict(opt_state)
    records = read_step_log(run) if (run / "steps.jsonl").is_file() else []
    if len(records) != zo.steps or (records and records[-1]["step"] != zo.steps):
        raise QzoError(f"{run / 'steps.jsonl'} has {len(records)} steps, its checkpoint is at step {zo.steps}; the "
                       "folder was altered: resume from another checkpoint")
    return records


def log_values(window: list[dict], zo: ZO) -> dict[str, float]:
    """qzo's numbers for a Trainer log line: the last step's projected gradient and losses, the forwards so far."""
    last = window[-1]
    return {"zo/grad": float(last["grad"]), "zo/loss_min": float(min(last["losses"])),
            "zo/loss_max": float(max(last["losses"])), "zo/forwards": float(zo.forwards)}
