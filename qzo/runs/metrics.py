"""Training metrics mirrored to experiment trackers (``metrics.jsonl`` stays the source of truth).

``train.report_to`` names the trackers, any of ``tensorboard``, ``wandb`` and ``mlflow``
(default ``[tensorboard]``; ``[]``: none). Each is one :class:`Reporter` (``log(values,
step)``, ``close()``); :class:`Reporters` fans a step out to all of them, and it is the one
object the trainer calls (rank 0 only). A tracker that is not installed is skipped with one
message naming its ``pip install``; it is never an error, and qzo imports none of them
unless the config names it.

Every step reports (:func:`step_values`):

    train/loss            the step's loss (the strategy's loss at theta, or the mean of its evaluations)
    eval/loss             the held-out loss, on evaluation steps (and step 0)
    lr                    the learning rate the schedule gave this step
    forwards              loss evaluations so far (the x axis ZO budgets are counted in)
    zo/projected_grad     the step record's ``grad``: the projected gradient, the scalar the update
                          multiplies the direction by (after ``optim.normalize`` and ``optim.clip``)
    zo/loss_spread        the population standard deviation of the step's evaluated losses (SPSA: half
                          of |f(+) - f(-)|); the noise floor the projected gradient is read against
    speed/forwards_per_s  forwards / wall seconds of the run so far (evaluations included)

Where each one writes:

* ``tensorboard``: ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``); a resume
  purges the events of the steps it trains again.
* ``wandb``: a run in project ``$WANDB_PROJECT`` (default ``qzo``) named after the run
  directory, with the resolved config; its files under ``$WANDB_DIR``, else the run
  directory. ``WANDB_MODE=offline`` works without network (``wandb sync`` uploads later).
  The wandb run id is kept in ``RUN/report_ids.json`` so a resume continues the same run
  (wandb drops the redone steps it already has: a resume is bit-exact, so they are equal).
* ``mlflow``: a run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``qzo``) at
  ``$MLFLOW_TRACKING_URI`` (mlflow's default otherwise), the config as flattened params;
  its run id is kept in ``RUN/report_ids.json`` too.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from ..config.schema import REPORTERS
from ..errors import QzoError

__all__ = ["REPORTERS", "Reporter", "Reporters", "TensorBoardReporter", "WandbReporter", "MlflowReporter",
           "open_reporters", "step_values", "TensorBoardScalars", "tensorboard_available"]

#: the trackers ``train.report_to`` may name, and what installs each
IDS_FILE = "report_ids.json"  # the wandb / mlflow run ids of a run directory, for resume


def step_values(row: dict, lr: float | None = None, record: dict | None = None) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` row, its lr and its step record (``steps.jsonl``), by tag."""
    values = {"train/loss": row.get("loss"), "eval/loss": row.get("eval_loss"), "lr": lr,
              "forwards": row.get("forwards")}
    if record is not None:
        values["zo/projected_grad"] = record.get("grad")
        losses = record.get("losses") or []
        if len(losses) > 1:
            values["zo/loss_spread"] = statistics.pstdev(float(v) for v in losses)
    wall = row.get("wall_s")
    if wall and row.get("forwards") is not None:
        values["speed/forwards_per_s"] = row["forwards"] / wall
    return {tag: float(v) for tag, v in values.items() if v is not None}


class Reporter:
    """One tracker: ``log`` a step's scalars, ``close`` at the end. Subclasses are the backends."""

    name = ""

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: torch raises ImportError on import
        return None
    return SummaryWriter


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (the ``tensorboard`` package is installed)."""
    return _summary_writer_class() is not None


class TensorBoardReporter(Reporter):
    """Scalars under ``run_dir/tensorboard``; ``purge_step`` (a resume's first step) drops later events."""

    name = "tensorboard"

    def __init__(self, run_dir, purge_step: int | None = None, flush_secs: int = 10):
        self.writer = _summary_writer_class()(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step,
                                              flush_secs=flush_secs)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


def _read_ids(run_dir: Path) -> dict:
    path = run_dir / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _keep_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = _read_ids(run_dir)
    if ids.get(name) != run_id:
        ids[name] = run_id
        (run_dir / IDS_FILE).write_text(json.dumps(ids, indent=2) + "\n")


class WandbReporter(Reporter):
    """A wandb run (online, or offline with ``WANDB_MODE=offline``), continued on resume."""

    name = "wandb"

    def __init__(self, run_dir, config: dict | None = None):
        import wandb

        run_dir = Path(run_dir)
        run_id = _read_ids(run_dir).get("wandb")  # None: a new run, wandb makes the id
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "qzo"), name=run_dir.name, id=run_id,
                              resume="allow" if run_id else None, dir=os.environ.get("WANDB_DIR", str(run_dir)),
                              config=config or {})
        _keep_id(run_dir, "wandb", self.run.id)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


class MlflowReporter(Reporter):
    """An mlflow run at ``$MLFLOW_TRACKING_URI`` (the client API: no global active run is touched)."""

    name = "mlflow"

    def __init__(self, run_dir, config: dict | None = None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        self.client = MlflowClient()
        run_id = _read_ids(run_dir).get("mlflow")
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "qzo")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in _flat(config or {}).items()]  # mlflow's limit on a value
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
                self.client.log_batch(run_id, params=params[i:i + 100])
            _keep_id(run_dir, "mlflow", run_id)
        self.run_id = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, value, now, step) for tag, value in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _installed(name: str) -> bool:
    if name == "tensorboard":
        return tensorboard_available()
    import importlib.util

    return importlib.util.find_spec(name) is not None


class Reporters:
    """The fan-out the trainer calls: each metrics row goes to every tracker in ``reporters``.

    A tracker that fails while logging is reported once (to ``log``) and dropped, so an
    upload hiccup never ends a run; ``metrics.jsonl`` has every value anyway.
    """

    def __init__(self, reporters: list[Reporter] = (), log=print):
        self.reporters, self._log = list(reporters), log

    @property
    def enabled(self) -> bool:
        """Whether any tracker is receiving the values."""
        return bool(self.reporters)

    def add(self, row: dict, lr: float | None = None, record: dict | None = None) -> None:
        """Report one ``metrics.jsonl`` row (``step``, ``forwards``, ``loss``, ``eval_loss``, ``wall_s``), the
        step's lr and its step record (``grad``, ``losses``)."""
        if not self.reporters:
            return
        values, step = step_values(row, lr, record), int(row["step"])
        for r in list(self.reporters):
            try:
                r.log(values, step)
            except Exception as exc:  # a tracker's own failure (network, disk): drop it, keep training
                self._log(f"qzo: {r.name} failed at step {step} ({type(exc).__name__}: {exc}); it gets no more "
                          "values this session (metrics.jsonl has them all)")
                self.reporters.remove(r)
                try:
                    r.close()  # what it can still flush, e.g. a wandb run's end
                except Exception:
                    pass

    def close(self) -> None:
        """Flush and close every tracker (safe to call twice)."""
        reporters, self.reporters = self.reporters, []
        for r in reporters:
            try:
                r.close()
            except Exception as exc:
                self._log(f"qzo: closing {r.name} failed ({type(exc).__name__}: {exc})")


def open_reporters(run_dir, report_to=("tensorboard",), config: dict | None = None, purge_step: int | None = None,
                   log=print) -> Reporters:
    """The trackers ``report_to`` names (``train.report_to``), started for ``run_dir``.

    A tracker that is not installed is skipped with one message naming its pip command.
    One that is installed but cannot start (a bad ``MLFLOW_TRACKING_URI``, wandb not
    logged in while online) is a :class:`QzoError` before the first step, naming the
    tracker and the two ways out.
    """
    unknown = [n for n in report_to if n not in REPORTERS]
    if unknown:
        raise QzoError(f"train.report_to names {', '.join(map(repr, unknown))}; choose any of "
                       f"{', '.join(REPORTERS)} (or [] for none)")
    run_dir, started = Path(run_dir), []
    builders = {"tensorboard": lambda: TensorBoardReporter(run_dir, purge_step=purge_step),
                "wandb": lambda: WandbReporter(run_dir, config), "mlflow": lambda: MlflowReporter(run_dir, config)}
    for name in dict.fromkeys(report_to):
        if not _installed(name):
            log(f"qzo: train.report_to names {name}, which is not installed: skipping it ({REPORTERS[name]} to "
                "use it; metrics.jsonl has every value)")
            continue
        try:
            started.append(builders[name]())
        except Exception as exc:
            for r in started:
                r.close()
            raise QzoError(f"train.report_to: {name} could not start ({type(exc).__name__}: {exc}); fix its "
                           f"setup or leave it out (--set 'train.report_to=[...]' without {name})") from exc
    return Reporters(started, log=log)


class TensorBoardScalars(Reporters):
    """The TensorBoard mirror alone (``open_reporters(run_dir, ["tensorboard"])`` without the message);
    a no-op without tensorboard."""

    def __init__(self, run_dir, purge_step: int | None = None, flush_secs: int = 10):
        super().__init__([TensorBoardReporter(run_dir, purge_step, flush_secs)] if tensorboard_available() else [])
