"""train.divergence_factor: a blown-up step is undone bit-exactly, the lr backed off, N in a row stop the run.

Blow-ups are injected two ways: an lr a million times too large for one step (a real
divergence of real values), and a loss hook that returns inf at chosen steps of a real
``qzo train`` of the tiny model.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import qzo
from qzo.train import loop as trainer
from qzo.train.guard import DivergenceGuard
from qzo.runs.replay import read_step_log, replay_sgd
from qzo.train.loop import train

from helpers import run_overrides, write_code_chats


def _toy(rule):
    """A quadratic in 64 values, trained with SPSA: ``(opt, closure)``."""
    w = torch.linspace(-1, 1, 64)
    opt = qzo.ZO([("w", w)], rule=rule, eps=1e-3, seed=3)
    return opt, w, (lambda: ((w - 0.5) ** 2).sum())


@pytest.mark.parametrize("rule", ["sgd", "momentum"])
def test_an_lr_a_million_times_too_large_is_undone_bit_exactly(rule):
    opt, w, closure = _toy(qzo.SGD(lr=1e-2) if rule == "sgd" else qzo.Momentum(lr=1e-2, beta=0.9))
    guard = DivergenceGuard(factor=3.0, backoff=0.5, limit=3, base_lr=1e-2)
    for step in (1, 2):
        guard.step(opt, closure, step)
    values, state = w.clone(), opt.state_dict()  # after step 2: what the undo must give back
    opt.rule.lr = 1e4  # step 3's update throws the values far away...
    guard.step(opt, closure, 3)
    assert not torch.equal(w, values) and guard.last_event is None  # ...which step 3's own loss cannot see
    loss, record = guard.step(opt, closure, 4)  # step 4 measures it
    assert loss > 1e3 and record["reverted"]["to_step"] == 2 and "running mean" in record["reverted"]["reason"]
    assert torch.equal(w, values)  # bit-exact, not a subtracted update
    after = opt.state_dict()
    assert after["rule"].keys() == state["rule"].keys()
    assert all(torch.equal(after["rule"][k]["w"], state["rule"][k]["w"]) for k in after["rule"] if k != "t")
    assert opt.steps == 4 and opt.rule.lr == 5e-3  # the counter goes on; the lr is backed off once
    assert "lr backed off to 0.005" in guard.last_event
    loss, record = guard.step(opt, closure, 5)  # training goes on from the restored values
    assert "reverted" not in record and loss < 1e3


def test_a_step_after_an_undo_undoes_only_its_own_update():
    opt, w, closure = _toy(qzo.SGD(lr=1e-2))
    guard = DivergenceGuard(factor=3.0, backoff=0.5, limit=3, base_lr=1e-2)
    guard.step(opt, closure, 1)
    before = w.clone()
    _, record = guard.step(opt, lambda: torch.tensor(float("nan")), 2)
    assert record["reverted"]["to_step"] == 0 and record["loss"] is None  # the initial values
    assert torch.equal(w, torch.linspace(-1, 1, 64)) and not torch.equal(before, w)
    _, record = guard.step(opt, lambda: torch.tensor(float("inf")), 3)
    assert record["reverted"]["to_step"] == 2 and torch.equal(w, torch.linspace(-1, 1, 64))
    _, record = guard.step(opt, lambda: torch.tensor(float("inf")), 4)
    assert guard.stop_reason and "steps 2, 3, 4" in guard.stop_reason
    assert "step 4: loss is inf at step 4" in guard.stop_reason
    assert opt.rule.lr == 1e-2 * 0.5 ** 3


def _inject_inf(monkeypatch, steps):
    real = trainer.objective_closure

    def hooked(s, step, device):
        return (lambda: torch.tensor(float("inf"))) if step in steps else real(s, step, device)

    monkeypatch.setattr(trainer, "objective_closure", hooked)


def _run(tiny_model_dir, folder, name, **extra):
    data = write_code_chats(folder)
    sets = {"train.divergence_factor": 3.0, "optim.rule": "momentum", "train.report_to": "[]", **extra}
    out = folder / name
    return out, run_overrides(tiny_model_dir, data, out, **sets)


def test_a_run_undoes_an_inf_step_and_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    _inject_inf(monkeypatch, {5})
    out, sets = _run(tiny_model_dir, tmp_path, "run", **{"train.steps": 7, "train.save_every": 1,
                                                          "train.keep_checkpoints": 10})
    lines = []
    summary = train(None, sets, progress=False, log=lines.append)
    assert summary["steps"] == 7 and "stopped_by" not in summary
    log = read_step_log(out)
    assert [r["step"] for r in log] == list(range(1, 8))  # every step logged, the undone one marked
    assert [r["step"] for r in log if "reverted" in r] == [5] and log[4]["reverted"]["to_step"] == 3
    assert log[4]["lr"] == 5e-2 and log[5]["lr"] == 2.5e-2  # backed off from the step after
    ck = {n: load_file(str(out / f"checkpoints/step-{n:06d}/trainables.safetensors")) for n in (3, 4, 5)}
    assert all(torch.equal(ck[5][k], ck[3][k]) for k in ck[3])  # after step 5: step 3's values, bit for bit
    assert any(not torch.equal(ck[4][k], ck[3][k]) for k in ck[3])
    opt5 = load_file(str(out / "checkpoints/step-000005/optimizer.safetensors"))
    opt3 = load_file(str(out / "checkpoints/step-000003/optimizer.safetensors"))
    momenta = [k for k in opt3 if k.startswith("rule/")]
    assert momenta and all(torch.equal(opt5[k], opt3[k]) for k in momenta)  # the momentum too
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(8)) and metrics[5].get("reverted") and metrics[5]["loss"] is None


def test_three_in_a_row_stop_the_run_naming_the_step(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _inject_inf(monkeypatch, {3, 4, 5})
    out, sets = _run(tiny_model_dir, tmp_path, "run", **{"train.steps": 8})
    summary = train(None, sets, progress=False, log=print)
    assert summary["steps"] == 5 and "steps 3, 4, 5" in summary["stopped_by"]
    assert "the last, step 5: loss is inf" in summary["stopped_by"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["stopped_by"] == summary["stopped_by"]
    assert "divergence guard" in capsys.readouterr().out
    meta = json.loads((out / "checkpoints/step-000005/meta.json").read_text())  # the stop is checkpointed
    assert meta["step"] == 5


def test_off_by_default_a_non_finite_loss_stops_as_before(tiny_model_dir, tmp_path, monkeypatch):
    _inject_inf(monkeypatch, {2})
    out, sets = _run(tiny_model_dir, tmp_path, "run", **{"train.divergence_factor": "null"})
    with pytest.raises(qzo.NonFiniteLossError, match="step 2"):
        train(None, sets, progress=False, log=lambda *_: None)


def test_a_resume_right_before_the_blow_up_matches_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    """The checkpoint holds the guard's snapshot: resumed at step 3, step 4's undo still reaches step 2."""
    _inject_inf(monkeypatch, {4})
    full, sets = _run(tiny_model_dir, tmp_path, "full", **{"train.steps": 6})
    train(None, sets, progress=False, log=lambda *_: None)
    part, sets = _run(tiny_model_dir, tmp_path, "part", **{"train.steps": 3})
    train(None, sets, progress=False, log=lambda *_: None)
    train(None, ["train.steps=6"], resume=part, progress=False, log=lambda *_: None)
    for name in ("trainables.safetensors", "optimizer.safetensors"):
        a, b = (load_file(str(r / "checkpoints/step-000006" / name)) for r in (full, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_step_log(part)[3]["reverted"]["to_step"] == 2


def test_replay_follows_the_undo(tiny_model_dir, tmp_path, monkeypatch):
    _inject_inf(monkeypatch, {4})
    out, sets = _run(tiny_model_dir, tmp_path, "run", **{"optim.rule": "sgd"})
    train(None, sets, progress=False, log=lambda *_: None)
    model, _ = qzo.load(tiny_model_dir, quant="nf4")
    params = qzo.lora(model, r=4, alpha=16, target_modules=["q_proj", "v_proj"], seed=1)
    replay_sgd(params, read_step_log(out))
    trained = load_file(str(out / "checkpoints/step-000006/trainables.safetensors"))
    init = qzo.lora(qzo.load(tiny_model_dir, quant="nf4")[0], r=4, alpha=16, target_modules=["q_proj", "v_proj"],
                    seed=1).state_dict()
    for t in params:  # replay applies each update alone: equal up to float rounding (as test_trainer's replay)
        moved = (trained[t.name] - init[t.name]).abs().max().item()
        torch.testing.assert_close(t.tensor, trained[t.name], rtol=0, atol=moved * 1e-3)
