"""Checkpoint integrity: every tensor file's size and SHA-256 are recorded; a corrupt checkpoint is skipped.

Real runs of the tiny model write real checkpoints; the corruption is done to the files
on disk (truncation, one flipped byte, garbage meta), as a failing disk or an interrupted
copy would leave them.
"""

import json

import pytest

from qzo.runs.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, verify_checkpoint
from qzo.train.loop import train

from helpers import run_overrides


@pytest.fixture
def data(code_chats):
    return code_chats


def _run(model_dir, data, out, **extra):
    train(None, run_overrides(model_dir, data, out, **extra), progress=False, log=lambda *_: None)
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte], ids=["truncated", "altered"])
def test_resume_skips_a_corrupt_checkpoint_and_matches_the_uninterrupted_run(damage, tiny_model_dir, data,
                                                                              tmp_path):
    full = _run(tiny_model_dir, data, tmp_path / "full")
    half = _run(tiny_model_dir, data, tmp_path / "half", **{"train.steps": 6})
    step3, step6 = list_checkpoints(half)
    meta = json.loads((step6 / "meta.json").read_text())
    assert set(meta["files"]) == {"trainables.safetensors"}
    assert len(meta["files"]["trainables.safetensors"]["sha256"]) == 64
    damage(step6 / "trainables.safetensors")
    with pytest.raises(CheckpointError, match="trainables.safetensors"):
        verify_checkpoint(step6)
    said = []
    assert latest_checkpoint(half, log=said.append) == step3
    assert said == [f"qzo: checkpoint step-000006 is corrupt ({_reason(step6)}); using step-000003 instead"]
    said.clear()
    train(None, [], resume=half, progress=False, log=said.append)
    assert any("step-000006 is corrupt" in line and "using step-000003" in line for line in said)
    assert any("resuming" in line and "from step 3" in line for line in said)
    # steps 4-6 were redone from step 3's checkpoint: the same bytes as the run that never broke
    a, b = (run / "checkpoints/step-000006/trainables.safetensors" for run in (full, half))
    assert a.read_bytes() == b.read_bytes()


def _reason(path):
    try:
        verify_checkpoint(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def test_unreadable_meta_and_a_missing_file_are_named(tiny_model_dir, data, tmp_path):
    run = _run(tiny_model_dir, data, tmp_path / "run")
    step3, step6 = list_checkpoints(run)
    (step6 / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is unreadable"):
        verify_checkpoint(step6)
    (step3 / "trainables.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(step3)
    said = []
    assert latest_checkpoint(run, log=said.append) is None
    assert len(said) == 2 and all("no older checkpoint verifies" in line for line in said)


def test_pruning_never_deletes_the_newest_good_checkpoint(tiny_model_dir, data, tmp_path):
    from qzo.runs.checkpoint import prune_checkpoints

    run = _run(tiny_model_dir, data, tmp_path / "run", **{"train.steps": 6, "train.save_every": 2,
                                                          "train.keep_checkpoints": 3, "train.eval_every": 100})
    steps = list_checkpoints(run)
    assert [p.name for p in steps] == ["step-000002", "step-000004", "step-000006"]
    _truncate(steps[2] / "trainables.safetensors")
    prune_checkpoints(run, keep=1)  # would keep only the corrupt step 6
    assert [p.name for p in list_checkpoints(run)] == ["step-000004", "step-000006"]
    assert latest_checkpoint(run, log=lambda _: None).name == "step-000004"


def test_a_resume_removes_what_an_interrupted_checkpoint_write_left(tiny_model_dir, data, tmp_path):
    run = _run(tiny_model_dir, data, tmp_path / "run")
    torn = run / "checkpoints" / ".tmp-step-000007-abc"
    torn.mkdir()
    (torn / "trainables.safetensors").write_bytes(b"half")
    said = []
    train(None, [], resume=run, progress=False, log=said.append)
    assert not torn.exists() and any(".tmp-step-000007-abc" in line for line in said)
