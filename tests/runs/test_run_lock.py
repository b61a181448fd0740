"""One live run per run directory: a second is refused while the first lives, and a killed run leaves no lock."""

import os
import signal
import subprocess
import sys

import pytest

from qzo.runs.lock import RunInUseError, RunLock
from qzo.train.loop import train

from helpers import run_overrides, write_code_chats

HOLD = """
import sys, time
from qzo.runs.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("holding", flush=True)
time.sleep(120)
"""


@pytest.fixture
def finished_run(tiny_model_dir, tmp_path):
    data = write_code_chats(tmp_path)
    out = tmp_path / "run"
    train(None, run_overrides(tiny_model_dir, data, out, **{"train.steps": 3}), progress=False, log=lambda *_: None)
    return out


def test_a_second_process_is_refused_until_the_first_is_killed(finished_run):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(finished_run)], stdout=subprocess.PIPE, text=True,
                              cwd=finished_run.parent)
    try:
        assert holder.stdout.readline().strip() == "holding"
        config_before = (finished_run / "config.yaml").read_bytes()
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"):
            train(None, ["train.steps=6"], resume=finished_run, progress=False, log=lambda *_: None)
        assert (finished_run / "config.yaml").read_bytes() == config_before  # refused before any write
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    summary = train(None, ["train.steps=6"], resume=finished_run, progress=False, log=lambda *_: None)
    assert summary["steps"] == 6  # the killed holder's lock went with it


def test_the_lock_is_released_after_a_run_and_after_a_failed_setup(finished_run):
    with RunLock(finished_run):  # the finished run let go of it
        pass
    import yaml

    from qzo.errors import ModelSourceError

    cfg = yaml.safe_load((finished_run / "config.yaml").read_text())
    cfg["model"]["source"] = "/no/such/model"  # fails in setup, after the lock was taken
    (finished_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelSourceError):
        train(None, [], resume=finished_run, progress=False, log=lambda *_: None)
    with RunLock(finished_run):
        with pytest.raises(RunInUseError):
            RunLock(finished_run).acquire()  # another open of the file: flock conflicts even in one process
