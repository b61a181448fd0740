"""``qzo plot``, ``RUN/loss.png`` at the end of ``qzo train``, and the TensorBoard mirror of metrics.jsonl."""

import contextlib
import io
import json
import struct
import sys

import pytest

from qzo.cli.main import main
from qzo.errors import QzoError
from qzo.runs.metrics import TensorBoardScalars, tensorboard_available
from qzo.cli.plot import moving_average, plot_runs, write_run_plot

from helpers import run_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sets(model_dir, data, out_dir, **extra):
    return run_overrides(model_dir, data, out_dir, **{**{"train.steps": 5, "train.eval_every": 2, "train.save_every": 5}, **extra})


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Two 5-step runs (different lr), each in a folder named ``run`` so labels need their paths."""
    root = tmp_path_factory.mktemp("plot")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say the code {i}."},
                                                     {"role": "assistant", "content": "CODE CODE"}]}) + "\n"
                            for i in range(8)))
    out = []
    for name, lr in (("a", 5e-2), ("b", 2e-2)):  # through the CLI: `qzo train` draws the curves, the loop does not
        printed = io.StringIO()
        argv = ["train", "--no-progress"]
        for item in _sets(tiny_model_dir, data, root / name / "run", **{"optim.lr": lr}):
            argv += ["--set", item]
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
        out.append((root / name / "run", printed.getvalue().splitlines()))
    return out


def test_qzo_train_leaves_loss_png(runs):
    run, lines = runs[0]
    png = run / "loss.png"
    assert _png_size(png) == (990, 550) and png.stat().st_size > 10_000
    assert f"qzo: loss curves in {png}" in lines
    assert not list(run.glob(".loss.png*"))  # written through a temp file


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")
def test_train_writes_tensorboard_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs[0][0]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "eval/loss", "lr", "forwards", "zo/projected_grad",
                                          "zo/loss_spread", "speed/forwards_per_s"}  # tests/runs/test_reporting.py
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert train_loss == [(m["step"], pytest.approx(m["loss"])) for m in metrics if m["loss"] is not None]
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 2, 4, 5]
    assert [e.value for e in acc.Scalars("forwards")] == [0, 2, 4, 6, 8, 10]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([5e-2] * 5)


def test_tensorboard_writer_is_a_no_op_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    assert not tensorboard_available()
    scalars = TensorBoardScalars(tmp_path)
    assert not scalars.enabled
    scalars.add({"step": 1, "forwards": 2, "loss": 1.0}, lr=0.1)
    scalars.close()
    assert not (tmp_path / "tensorboard").exists()


def test_plot_one_and_two_runs(runs, tmp_path):
    one = plot_runs([runs[0][0]], tmp_path / "one.png")
    two = plot_runs([r for r, _ in runs], tmp_path / "two.png")
    assert (one, two) == (tmp_path / "one.png", tmp_path / "two.png")
    assert _png_size(one) == _png_size(two) == (990, 550)
    assert two.stat().st_size > 10_000 and two.read_bytes() != one.read_bytes()


def test_plot_defaults_to_the_run_folder(runs):
    run = runs[1][0]
    (run / "loss.png").unlink()
    assert plot_runs([run]) == run / "loss.png"
    assert (run / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_moving_average():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_without_matplotlib_plot_says_how_to_install_and_train_skips(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(QzoError, match="pip install matplotlib"):
        plot_runs([runs[0][0]], tmp_path / "x.png")
    lines = []
    assert write_run_plot(runs[0][0], log=lines.append) is None and lines == []
    assert main(["plot", str(runs[0][0]), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "pip install matplotlib" in err[-1]


def test_cli_plot(runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["plot", *(str(r) for r, _ in runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _png_size(out) == (990, 550)


@pytest.mark.parametrize("make,match", [
    (lambda tmp: tmp, "not a qzo run directory"),
    (lambda tmp: tmp / "missing", "not a qzo run directory"),
])
def test_cli_plot_errors(make, match, tmp_path, capsys):
    assert main(["plot", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and match in err[-1]


def test_plot_errors_for_a_run_without_metrics_or_a_missing_folder(runs, tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.yaml").write_text((runs[0][0] / "config.yaml").read_text())
    (fresh / "steps.jsonl").touch()
    with pytest.raises(QzoError, match="no metrics yet"):
        plot_runs([fresh], tmp_path / "x.png")
    with pytest.raises(QzoError, match="does not exist"):
        plot_runs([runs[0][0]], tmp_path / "no" / "x.png")
