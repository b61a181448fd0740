"""Writes where they must not be (issue 32): a link planted in a run folder is never written through, a refused
second start has written nothing, and a folder of the user's own files is never taken for a run.

Real runs of the tiny model, real symbolic and hard links, a real second process holding the lock.
"""

import os
import shutil
import subprocess
import sys

import pytest

from qzo.errors import QzoError
from qzo.runs.checkpoint import RunDirError
from qzo.runs.lock import RunInUseError
from qzo.train.loop import train

from helpers import run_overrides, write_code_chats

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 3-step run with checkpoints, best/ and adapter/: each test copies it (``cp -r RUN r``)."""
    root = tmp_path_factory.mktemp("hostile-writes")
    data = write_code_chats(root)
    train(None, run_overrides(tiny_model_dir, data, root / "run", **{"train.steps": 3, "train.eval_every": 1,
                                                                     "train.save_every": 1, "train.report_to": "[]"}),
          **QUIET)
    return root / "run"


@pytest.fixture
def victims(tmp_path):
    """A file and a folder outside the run that a planted link points at, and a check that they are untouched."""
    file, folder = tmp_path / "victim.txt", tmp_path / "victim-dir"
    file.write_text("precious\n")
    folder.mkdir()
    (folder / "keep.txt").write_text("precious\n")
    for name in ("step-000001", ".tmp-step-000009-x"):  # what a prune or a clean-up would look for there
        (folder / name).mkdir()
        (folder / name / "meta.json").write_text("{}")

    def untouched():
        assert file.read_text() == "precious\n"
        assert sorted(p.name for p in folder.iterdir()) == [".tmp-step-000009-x", "keep.txt", "step-000001"]
        assert (folder / "keep.txt").read_text() == "precious\n"
        assert (folder / "step-000001" / "meta.json").read_text() == "{}"

    return file, folder, untouched


def _copy(run, tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(run, copy, symlinks=True)
    return copy


# refused: files written in place (the lock, the step logs) and folders written into; replaced: files rewritten whole
@pytest.mark.parametrize("name,kind,refused", [
    (".lock", "file", True), ("steps.jsonl", "file", True), ("metrics.jsonl", "file", True),
    ("checkpoints", "dir", True), ("summary.json", "file", False), ("best.json", "file", False),
    ("adapter", "dir", False), ("best", "dir", False),
])
def test_a_planted_link_is_never_written_through(finished_run, tmp_path, victims, name, kind, refused):
    file, folder, untouched = victims
    run = _copy(finished_run, tmp_path)
    target = file if kind == "file" else folder
    path = run / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(target)
    if refused:
        with pytest.raises(RunDirError, match=f"refusing to write {path}: it is a symbolic link"):
            train(None, ["train.steps=5"], resume=run, **QUIET)
    else:
        train(None, ["train.steps=5"], resume=run, **QUIET)
        assert not path.is_symlink()  # the run's own file or folder is in its place now
    untouched()


def test_a_hard_link_into_a_run_folder_is_refused(finished_run, tmp_path, victims):
    file, _, untouched = victims
    run = _copy(finished_run, tmp_path)
    (run / "steps.jsonl").unlink()
    os.link(file, run / "steps.jsonl")  # the same file under two names: an in-place write changes both
    with pytest.raises(RunDirError, match="hard links"):
        train(None, ["train.steps=5"], resume=run, **QUIET)
    untouched()


# A live run that has just created its folder (its steps.jsonl still empty): the real start of qzo train, held there.
LIVE_START = """
import sys, time
from qzo.config.schema import load_config
from qzo.runs.lock import RunLock
from qzo.runs.writer import new_run_dir
lock = RunLock()
new_run_dir(load_config(None, sys.argv[2:]), None, lock)
print("started", flush=True)
time.sleep(120)
"""


def test_a_refused_second_start_has_written_nothing(tiny_model_dir, tmp_path):
    data = write_code_chats(tmp_path)
    out = tmp_path / "run"
    sets = run_overrides(tiny_model_dir, data, out, **{"train.report_to": "[]"})
    live = subprocess.Popen([sys.executable, "-c", LIVE_START, "-", *sets], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "started"
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert (out / "steps.jsonl").read_bytes() == b""  # not started: the case that used to count as reusable
        second = run_overrides(tiny_model_dir, data, out, **{"train.report_to": "[]", "train.seed": 7})
        with pytest.raises(RunInUseError, match=f"pid {live.pid}"):
            train(None, second, **QUIET)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not a byte of the live run changed
    finally:
        live.kill()
        live.wait(timeout=30)
    summary = train(None, sets, **QUIET)  # the killed start left it unstarted: a new start reuses it
    assert summary["steps"] == 6


@pytest.mark.parametrize("files", [
    {"config.yaml": "mine: 1\n", "data.json": "{\"mine\": true}\n"},  # the names of a run's first files
    {"steps.jsonl": "", ".lock": "not qzo's\n"},  # a lock file qzo did not write
    {"notes.txt": "mine\n"},
])
def test_a_folder_of_the_users_own_files_is_refused_untouched(tiny_model_dir, tmp_path, files):
    data = write_code_chats(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(QzoError, match="is not a qzo run folder"):
        train(None, run_overrides(tiny_model_dir, data, out, **{"train.report_to": "[]"}), **QUIET)
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # nothing added, nothing replaced


def test_the_refusals_reach_the_cli_as_one_line(tiny_model_dir, tmp_path):
    data = write_code_chats(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("mine: 1\n")
    args = [a for s in run_overrides(tiny_model_dir, data, out) for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "qzo", "train", "--no-progress", *args], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: out_dir")
    assert "Traceback" not in done.stderr and (out / "config.yaml").read_text() == "mine: 1\n"
