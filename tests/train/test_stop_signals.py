"""SIGTERM / Ctrl-C stop a real ``qzo train`` at a step boundary with a checkpoint; --resume continues it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qzo.train.stop_signals import GracefulStop
from qzo.train.loop import train

from helpers import run_overrides


@pytest.fixture
def data(code_chats):
    return code_chats


def _steps_logged(run) -> int:
    path = run / "steps.jsonl"
    return len([line for line in path.read_text().splitlines() if line.strip()]) if path.is_file() else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(sig, tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    sets = run_overrides(tiny_model_dir, data, run, **{"train.steps": 400, "train.save_every": 1000,
                                                       "train.eval_every": 1000})
    argv = [sys.executable, "-m", "qzo", "train", "--no-progress"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while _steps_logged(run) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, out
    assert f"{signal.Signals(sig).name} received" in out and f"qzo train --resume {run}" in out
    stopped = _steps_logged(run)
    assert 2 <= stopped < 400
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == f"{signal.Signals(sig).name} received" and summary["steps"] == stopped
    assert (run / f"checkpoints/step-{stopped:06d}/trainables.safetensors").is_file()
    # the checkpoint is the step the log ends on: the same bytes as a run that only went that far
    same = tmp_path / "same"
    train(None, run_overrides(tiny_model_dir, data, same, **{"train.steps": stopped, "train.save_every": 1000,
                                                             "train.eval_every": 1000}),
          progress=False, log=lambda *_: None)
    a, b = (r / f"checkpoints/step-{stopped:06d}/trainables.safetensors" for r in (run, same))
    assert a.read_bytes() == b.read_bytes()
    summary = train(None, [f"train.steps={stopped + 2}"], resume=run, progress=False, log=lambda *_: None)
    assert summary["steps"] == stopped + 2 and "stopped_by" not in summary


def test_a_second_signal_stops_at_once():
    # what was installed before (Python's default, or SIG_IGN in a background job of a non-interactive shell)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # let the handler run
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored on exit
