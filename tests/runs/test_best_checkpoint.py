"""The checkpoint with the best held-out loss is kept (never pruned) and chosen with --checkpoint best."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qzo.runs.checkpoint import best_step, find_checkpoint, list_checkpoints
from qzo.cli.main import main
from qzo.errors import QzoError
from qzo.runs.reader import load_run_model
from qzo.train.loop import train

from helpers import run_overrides, write_code_chats


@pytest.fixture(scope="module")
def noisy_run(tiny_model_dir, tmp_path_factory):
    """Held-out loss every step at an lr high enough to go up and down; one checkpoint kept."""
    folder = tmp_path_factory.mktemp("best")
    data = write_code_chats(folder)
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
    kept = {p.name for p in list_checkpoints(noisy_run)}
    gone = next(n for n in range(1, 8) if f"step-{n:06d}" not in kept)  # pruned (which one depends on the losses)
    with pytest.raises(QzoError, match=f"has no checkpoint step-{gone}; it has: step-"):
        find_checkpoint(noisy_run, f"step-{gone}")
    with pytest.raises(QzoError, match="give last"):
        find_checkpoint(noisy_run, "newest")
    assert main(["export", str(noisy_run), "--peft", "--checkpoint", "step-99"]) == 2
    assert "has no checkpoint step-99" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["patience", "factor"])
def test_early_stop_ends_the_run_and_says_why(rule, tiny_model_dir, tmp_path, code_chats):
    data = code_chats
    # patience: the tiny random model's loss stays near ln(vocab) = 10.8 and at lr 3 it stalls, so later
    # evaluations lose to the first ones. factor: Sign steps of 0.5 move every LoRA value by 0.5 whatever
    # the (noisy) slope says, a random walk of the adapters that takes the held-out loss well above its
    # start within a few steps on any CPU (lr 300 SGD, the earlier setting, improved on some CPUs)
    extra = {"train.steps": 40, "train.eval_every": 1, "train.save_every": 100,
             "optim.lr": 3.0 if rule == "patience" else 0.5,
             "train.early_stop_patience" if rule == "patience" else "train.early_stop_factor": 2 if rule == "patience"
             else 1.003}
    if rule == "factor":
        extra["optim.rule"] = "sign"
    said = []
    summary = train(None, run_overrides(tiny_model_dir, data, tmp_path / "run", **extra), progress=False,
                    log=said.append)
    assert summary["steps"] < 40 and summary["stopped_by"].startswith("early stop")
    best = best_step(tmp_path / "run")
    if rule == "patience":
        assert summary["steps"] == best["step"] + 2
        assert "no better held-out loss in 2 evaluations" in summary["stopped_by"]
    else:
        assert "over 1.003 x the best" in summary["stopped_by"]
    assert any("early stop" in line and "qzo train --resume" in line for line in said)
    assert (tmp_path / "run" / f"checkpoints/step-{summary['steps']:06d}").is_dir()
