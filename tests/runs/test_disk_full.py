"""Full disks and read-only run directories: an error naming the path, the last checkpoint intact, nothing
half-written left, and a resume that ends where an uninterrupted run ends.

On a real small filesystem where the machine allows it: a tmpfs mounted for the test (root
with CAP_SYS_ADMIN, as CI's machines are), filled with a filler file to the byte count a
case needs, and remounted read-only for the read-only cases. Where mounting is refused, the
narrowest simulation instead, and the test says so in its id: the checkpoint's tensor
writer writes half its file and raises ``OSError(ENOSPC)``; a read-only folder is
``chmod 0555`` (not root) or ``os.open`` raising ``EROFS`` under it (root, which ignores
permission bits).
"""

import errno
import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors.torch import load_file

from qzo.runs import checkpoint, writer as run_writer
from qzo.runs.checkpoint import RunDirError, list_checkpoints, verify_checkpoint
from qzo.train.loop import train

from helpers import run_overrides, write_code_chats


def _mount(path, *options) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join(("size=8m",) + options)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """``(folder, real)``: an 8 MiB tmpfs (``real``) or a plain folder for the simulation."""
    folder = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    real = not os.environ.get("QZO_TEST_SIMULATE_DISK") and _mount(folder)  # =1: the fallback, on any machine
    folder.mkdir(exist_ok=True)
    yield folder, real
    if real:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder, leave: int) -> "os.PathLike":
    """Fill ``folder``'s filesystem to the last byte, then free ``leave`` bytes: a filler file to delete afterwards."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: no write is left pending to fail at close
        for chunk in (1 << 20, 65536, 4096, 512, 1):
            try:
                while f.write(b"\0" * chunk):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        if leave:
            f.truncate(f.tell() - leave)
    return filler


def _sets(model, data, out):
    return run_overrides(model, data, out, **{"train.steps": 6, "train.save_every": 3, "train.report_to": "[]"})


def _no_half_writes(run):
    left = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    left += [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert left == []
    for name in ("steps.jsonl", "metrics.jsonl"):
        for line in (run / name).read_text().splitlines():
            json.loads(line)  # no torn line


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("disk-ref")
    data = write_code_chats(folder)
    train(None, _sets(tiny_model_dir, data, folder / "run"), progress=False, log=lambda *_: None)
    return load_file(str(folder / "run" / "checkpoints" / "step-000006" / "trainables.safetensors"))


@pytest.mark.parametrize("moment", ["mid-checkpoint", "right-after-a-checkpoint"])
def test_a_full_disk_names_the_path_keeps_the_last_checkpoint_and_resumes(moment, small_fs, tiny_model_dir,
                                                                          monkeypatch, uninterrupted):
    folder, real = small_fs
    data = write_code_chats(folder.parent)
    run = folder / "run"
    saves, filler = [], []
    real_save = run_writer.save_checkpoint

    def save(run_dir, step, *args, **kwargs):
        saves.append(step)
        if moment == "mid-checkpoint" and step == 6:
            if real:  # one page free: room for part of the trainables file (7 KiB), not all of it
                filler.append(_fill(folder, leave=4096))
            else:
                def half_then_enospc(tensors, path):
                    with open(path, "wb") as f:
                        f.write(b"\0" * 1000)
                    raise OSError(errno.ENOSPC, "No space left on device")

                monkeypatch.setattr(checkpoint, "save_file", half_then_enospc)
        out = real_save(run_dir, step, *args, **kwargs)
        if moment == "right-after-a-checkpoint" and step == 3:
            if real:
                filler.append(_fill(folder, leave=0))
            else:
                monkeypatch.setattr(run_writer, "append_jsonl", _enospc_append)
        return out

    monkeypatch.setattr(run_writer, "save_checkpoint", save)
    with pytest.raises(RunDirError) as info:
        train(None, _sets(tiny_model_dir, data, run), progress=False, log=lambda *_: None)
    message = str(info.value)
    assert "no space left on the device" in message and str(run) in message
    assert "the last checkpoint, step-000003, verifies" in message and f"qzo train --resume {run}" in message
    if moment == "mid-checkpoint":
        assert f"cannot write checkpoint {run}/checkpoints/step-000006" in message
    _no_half_writes(run)
    assert [verify_checkpoint(c)["step"] for c in list_checkpoints(run)] == [3]
    for f in filler:
        os.unlink(f)
    monkeypatch.undo()
    train(None, [], resume=run, progress=False, log=lambda *_: None)
    done = load_file(str(run / "checkpoints" / "step-000006" / "trainables.safetensors"))
    assert done.keys() == uninterrupted.keys() and all(torch.equal(done[k], uninterrupted[k]) for k in done)
    _no_half_writes(run)


def _enospc_append(path, record):
    raise checkpoint.write_error(path, OSError(errno.ENOSPC, "No space left on device"))


def _read_only(folder, real, monkeypatch):
    """Make ``folder`` read-only: remount the tmpfs, else chmod (not root) or os.open raising EROFS under it."""
    if real:
        assert subprocess.run(["mount", "-o", "remount,ro", str(folder)]).returncode == 0
        return None
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return None
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "open", refusing)
    return "simulated"


def _cli(argv, cwd):
    return subprocess.run([sys.executable, "-m", "qzo", "train", "--no-progress", *argv], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_a_read_only_out_dir_is_refused_before_the_model_loads(small_fs, tiny_model_dir, monkeypatch, capsys):
    folder, real = small_fs
    data = write_code_chats(folder.parent)
    simulated = _read_only(folder, real, monkeypatch)
    sets = _sets(tiny_model_dir, data, folder / "runs" / "new")
    reason = "the filesystem is read-only" if real or simulated else "permission denied"
    if simulated:  # os.open patched in this process: train in it
        with pytest.raises(RunDirError, match=f"cannot write the run directory '{folder}/runs/new'"):
            train(None, sets, progress=False, log=print)
        assert "loading" not in capsys.readouterr().out
        return
    result = _cli([a for s in sets for a in ("--set", s)], folder.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write the run directory '{folder}/runs/new' ({folder}: {reason}); free space, make it "
        "writable, or choose another with --set out_dir=...")
    assert "qzo: loading" not in result.stdout  # refused before the model loads


def test_a_run_whose_folder_became_read_only_resumes_with_a_clear_error(small_fs, tiny_model_dir, monkeypatch):
    folder, real = small_fs
    data = write_code_chats(folder.parent)
    run = folder / "run"
    train(None, run_overrides(tiny_model_dir, data, run, **{"train.steps": 3, "train.report_to": "[]"}),
          progress=False, log=lambda *_: None)
    simulated = _read_only(folder, real, monkeypatch)
    if simulated:
        with pytest.raises(RunDirError, match=f"cannot write the run directory '{run}'"):
            train(None, ["train.steps=6"], resume=run, progress=False, log=lambda *_: None)
    else:
        result = _cli(["--resume", str(run), "--set", "train.steps=6"], folder.parent)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot write the run directory '{run}'")
        assert "qzo: loading" not in result.stdout
    assert verify_checkpoint(run / "checkpoints" / "step-000003")["step"] == 3
