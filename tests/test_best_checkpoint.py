"""The checkpoint with the best held-out loss is kept (never pruned) and chosen with --checkpoint best."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qzo.checkpoint import best_step, find_checkpoint, list_checkpoints
from qzo.cli import main
from qzo.errors import QzoError
from qzo.trainer import load_run_model, train

from conftest import run_overrides


@pytest.fixture(scope="module")
def noisy_run(tiny_model_dir, tmp_path_factory):
    """Held-out loss every step at an lr high enough to go up and down; one checkpoint kept."""
    folder = tmp_path_factory.mktemp("best")
    rows = [{"messages": [{"role": "user", "content": f"Code {i}?"}, {"role": "assistant", "content": "CODE"}]}
            for i in range(8)]
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = folder / "run"
    train(None, run_overrides(tiny_model_dir, data, out, **{"train.steps": 8, "train.eval_every": 1,
                                                            "train.save_every": 100, "train.keep_checkpoints": 1,
                                                            "optim.lr": 0.5}), progress=False, log=lambda *_: None)
    return out


def _evals(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in rows if r.get("eval_loss") is not None and r["step"] > 0}


def test_the_best_checkpoint_is_recorded_kept_and_written_out(noisy_run):
    evals = _evals(noisy_run)
    best = best_step(noisy_run)
    assert best["step"] == min(evals, key=evals.get) and best["eval_loss"] == min(evals.values())
    kept = [p.name for p in list_checkpoints(noisy_run)]
    assert f"step-{best['step']:06d}" in kept and "step-000008" in kept  # best and last survive keep 1
    assert len(kept) == (1 if best["step"] == 8 else 2)
    assert (noisy_run / "best" / "adapter" / "adapter_model.safetensors").is_file()
    ckpt = find_checkpoint(noisy_run, "best")
    assert ckpt.name == f"step-{best['step']:06d}"
    _, _, params, _ = load_run_model(noisy_run, "best")
    saved = load_file(str(ckpt / "trainables.safetensors"))
    assert all(torch.equal(t.tensor, saved[t.name]) for t in params)


def test_checkpoint_names_and_bad_ones(noisy_run, capsys):
    assert find_checkpoint(noisy_run, "last").name == "step-000008"
    assert find_checkpoint(noisy_run, "step-8").name == "step-000008"
    with pytest.raises(QzoError, match="has no checkpoint step-3; it has: step-"):
        find_checkpoint(noisy_run, "step-3")
    with pytest.raises(QzoError, match="give last"):
        find_checkpoint(noisy_run, "newest")
    assert main(["export", str(noisy_run), "--peft", "--checkpoint", "step-99"]) == 2
    assert "has no checkpoint step-99" in capsys.readouterr().err
