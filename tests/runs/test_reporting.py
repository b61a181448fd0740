"""``train.report_to``: one reporter per tracker behind one fan-out; each reads back what a real run logged.

TensorBoard is read back with its EventAccumulator, wandb from its offline run file
(``WANDB_MODE=offline``, nothing leaves the machine), mlflow from a file store in the test's
folder. A tracker that is not installed skips its test (with the pip command) and is
skipped by the trainer with one message.
"""

import glob
import importlib.util
import json
import statistics
import struct
import sys

import pytest

from qzo.config.schema import load_config
from qzo.errors import ConfigError, QzoError
from qzo.runs.metrics import Reporter, Reporters, open_reporters, step_values, tensorboard_available
from qzo.train.loop import train

from helpers import run_overrides, write_code_chats

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed "
                                 "(pip install wandb)")
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed "
                                  "(pip install mlflow)")
needs_tensorboard = pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")

ZO_TAGS = {"train/loss", "eval/loss", "lr", "forwards", "zo/projected_grad", "zo/loss_spread", "speed/forwards_per_s"}


def _run(tiny_model_dir, tmp_path, report_to, lines=None, **extra):
    """A 4-step SPSA run of the tiny model reporting to ``report_to``; its run folder."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_code_chats(tmp_path)
    out = tmp_path / "run"
    sets = run_overrides(tiny_model_dir, data, out, **{"train.steps": 4, "train.eval_every": 2, "train.save_every": 4,
                                                       "train.report_to": report_to, **extra})
    train(None, sets, log=(lines.append if lines is not None else lambda *_: None), progress=False)
    return out


def _expected(run):
    """What each step should have reported, from the run's own logs."""
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {s["step"]: s for s in map(json.loads, (run / "steps.jsonl").read_text().splitlines())}
    return {m["step"]: step_values(m, steps.get(m["step"], {}).get("lr"), steps.get(m["step"])) for m in metrics}


def test_step_values_carry_the_zo_signals():
    row = {"step": 3, "forwards": 6, "loss": 2.5, "wall_s": 2.0, "eval_loss": 2.4}
    record = {"grad": -0.75, "losses": [2.0, 3.0], "lr": 1e-3}
    values = step_values(row, 1e-3, record)
    assert values == {"train/loss": 2.5, "eval/loss": 2.4, "lr": 1e-3, "forwards": 6.0, "zo/projected_grad": -0.75,
                      "zo/loss_spread": 0.5, "speed/forwards_per_s": 3.0}  # spread: SPSA's |f+ - f-| / 2
    assert step_values({"step": 0, "forwards": 0, "eval_loss": 3.0}) == {"eval/loss": 3.0, "forwards": 0.0}
    assert step_values(row, None, {"grad": 0.1, "losses": [1.0]})["zo/projected_grad"] == 0.1  # one loss: no spread
    assert "zo/loss_spread" not in step_values(row, None, {"grad": 0.1, "losses": [1.0]})


class _Recorder(Reporter):
    name = "recorder"

    def __init__(self, fail_at=None):
        self.seen, self.closed, self.fail_at = [], 0, fail_at

    def log(self, values, step):
        if step == self.fail_at:
            raise ConnectionError("tracker unreachable")
        self.seen.append((step, values))

    def close(self):
        self.closed += 1


def test_fan_out_sends_every_row_to_every_reporter_and_drops_one_that_fails():
    a, b, lines = _Recorder(), _Recorder(fail_at=2), []
    fan = Reporters([a, b], log=lines.append)
    for step in (1, 2, 3):
        fan.add({"step": step, "forwards": 2 * step, "loss": 1.0 / step}, lr=0.1,
                record={"grad": 1.0, "losses": [1, 2]})
    assert [s for s, _ in a.seen] == [1, 2, 3] and [s for s, _ in b.seen] == [1]  # b dropped at its failure
    assert len(lines) == 1 and "recorder failed at step 2 (ConnectionError: tracker unreachable)" in lines[0]
    fan.close()
    fan.close()
    assert a.closed == 1 and b.closed == 1 and not fan.enabled


def test_an_uninstalled_tracker_is_skipped_with_its_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec now finds nothing
    monkeypatch.setitem(sys.modules, "mlflow", None)
    lines = []
    fan = open_reporters(tmp_path, ["tensorboard", "wandb", "mlflow"], log=lines.append)
    assert not fan.enabled
    assert [line.split(" to use it")[0] for line in lines] == [
        f"qzo: train.report_to names {name}, which is not installed: skipping it (pip install {name}"
        for name in ("tensorboard", "wandb", "mlflow")]
    fan.add({"step": 1, "forwards": 2, "loss": 1.0})
    fan.close()
    assert list(tmp_path.iterdir()) == []


def test_an_installed_tracker_that_cannot_start_is_an_error_naming_it(tmp_path, monkeypatch):
    import qzo.runs.metrics

    def broken(*args, **kwargs):
        raise RuntimeError("no tracking server at http://localhost:5000")

    monkeypatch.setattr(qzo.runs.metrics, "_installed", lambda name: True)
    monkeypatch.setattr(qzo.runs.metrics, "MlflowReporter", broken)
    with pytest.raises(QzoError, match=r"train.report_to: mlflow could not start \(RuntimeError: no tracking "
                                       r"server.*leave it out"):
        open_reporters(tmp_path, ["mlflow"])


def test_report_to_in_the_config():
    assert load_config(None)["train"]["report_to"] == ["tensorboard"]
    assert load_config(None, ["train.report_to=[]"])["train"]["report_to"] == []
    assert load_config(None, ["train.report_to=wandb"])["train"]["report_to"] == ["wandb"]  # one name
    assert load_config(None, ["train.report_to=none"])["train"]["report_to"] == []  # transformers' spelling
    assert load_config(None, ["train.report_to=[mlflow, tensorboard]"])["train"]["report_to"] == ["mlflow",
                                                                                               "tensorboard"]
    with pytest.raises(ConfigError, match=r"'train.report_to' names 'comet'; give a list of tensorboard, wandb, "
                                          r"mlflow \(any subset; \[\] for none\)"):
        load_config(None, ["train.report_to=[tensorboard, comet]"])
    with pytest.raises(ConfigError, match="'train.report_to' must be list"):
        load_config(None, ["train.report_to=3"])


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tmp_path_factory):
    """One run reporting to all three trackers (those installed): wandb offline, mlflow in a file store."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root / "wandb-dir"))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants a database; a folder is enough here
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "qzo-test")
        (root / "wandb-dir").mkdir()
        lines = []
        run = _run(tiny_model_dir, root, "[tensorboard, wandb, mlflow]", lines)
        yield run, root, lines


def test_a_run_reports_to_each_installed_tracker(tracked):
    run, _, lines = tracked
    skipped = {n for n in ("wandb", "mlflow") if importlib.util.find_spec(n) is None}
    assert {n for n in ("wandb", "mlflow") if any(f"names {n}, which is not installed" in line for line in lines)} \
        == skipped
    ids = json.loads((run / "report_ids.json").read_text()) if (run / "report_ids.json").exists() else {}
    assert set(ids) == {"wandb", "mlflow"} - skipped


@needs_tensorboard
def test_tensorboard_reads_back_the_zo_values(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tracked[0]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == ZO_TAGS
    expected = _expected(run)
    for tag in ZO_TAGS:
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert logged == [(s, pytest.approx(v[tag], rel=1e-6)) for s, v in expected.items() if tag in v], tag
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    spread = [e.value for e in acc.Scalars("zo/loss_spread")]
    assert spread == pytest.approx([statistics.pstdev(s["losses"]) for s in steps], rel=1e-6)


def test_an_empty_report_to_writes_no_tracker_files(tiny_model_dir, tmp_path):
    run = _run(tiny_model_dir, tmp_path, "[]", **{"train.steps": 1, "train.eval_every": 1, "train.save_every": 1})
    assert not (run / "tensorboard").exists() and not (run / "report_ids.json").exists()
    assert (run / "metrics.jsonl").is_file()


def _wandb_records(path):
    """The records of an offline wandb run file (W&B's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


@needs_wandb
def test_wandb_offline_logs_the_zo_values_and_the_config(tracked):
    run, root, _ = tracked
    files = glob.glob(str(root / "wandb-dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    run_id = json.loads((run / "report_ids.json").read_text())["wandb"]
    assert files[0].endswith(f"run-{run_id}.wandb")
    history, config = {}, {}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    expected = _expected(run)
    assert sorted(history) == sorted(expected)
    for step, values in expected.items():
        assert history[step] == pytest.approx(values, rel=1e-6), step
    assert config["optim"]["strategy"] == "spsa" and config["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]


@needs_mlflow
def test_mlflow_file_store_logs_the_zo_values_and_params(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    run, root, _ = tracked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    run_id = json.loads((run / "report_ids.json").read_text())["mlflow"]
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert client.get_experiment(got.info.experiment_id).name == "qzo-test"
    assert got.data.params["optim.strategy"] == "spsa" and got.data.params["lora.r"] == "4"
    expected = _expected(run)
    for tag in ZO_TAGS:
        history = [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, tag), key=lambda m: m.step)]
        assert history == [(s, pytest.approx(v[tag], rel=1e-6)) for s, v in expected.items() if tag in v], tag


@needs_wandb
@needs_mlflow
def test_a_resumed_session_continues_the_same_tracker_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ids = []
    for steps in ((1, 2), (2, 3)):  # the second session redoes step 2, as a resume from step 1 does
        fan = open_reporters(run_dir, ["wandb", "mlflow"], config={"train": {"steps": 3}})
        for step in steps:
            fan.add({"step": step, "forwards": 2 * step, "loss": 1.0 / step, "wall_s": float(step)})
        fan.close()
        ids.append(json.loads((run_dir / "report_ids.json").read_text()))
    assert ids[0] == ids[1] and set(ids[0]) == {"wandb", "mlflow"}
    history = MlflowClient().get_metric_history(ids[0]["mlflow"], "train/loss")
    assert sorted({m.step for m in history}) == [1, 2, 3]
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{ids[0]['wandb']}.wandb"))) == 2
