"""The trainer on a tiny model: loss goes down, checkpoints round-trip, resume is bit-exact, bad input."""

import json

import pytest
import torch

from qzo.runs.checkpoint import list_checkpoints
from qzo.cli.main import main
from qzo.errors import ConfigError, QzoError
from qzo.runs.reader import load_run_model
from qzo.zo.strategies import STRATEGIES
from qzo.train.loop import train

from helpers import run_overrides as _sets


@pytest.fixture
def overfit_data(tmp_path):
    chats = [
        {"messages": [{"role": "user", "content": f"Say the code {i}."},
                      {"role": "assistant", "content": "CODE CODE CODE"}]}
        for i in range(8)
    ]
    path = tmp_path / "overfit.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return path


def test_training_lowers_loss_and_writes_the_run(tiny_model_dir, overfit_data, tmp_path):
    out = tmp_path / "run"
    summary = train(None, _sets(tiny_model_dir, overfit_data, out, **{"train.steps": 40, "train.eval_every": 20,
                                                                        "train.save_every": 20}), progress=False)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.05
    optional = {"loss.png", "tensorboard"}  # with matplotlib / tensorboard installed (tests/cli/test_plot.py)
    assert {p.name for p in out.iterdir()} - optional == {"config.yaml", "steps.jsonl", "metrics.jsonl",
                                                          "checkpoints", "adapter", "summary.json",
                                                          ".lock",  # qzo.runs.lock: who trained it last
                                                          "best.json", "best",  # the best held-out checkpoint
                                                          "data.json"}  # what a resume checks the data against
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(41))
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 20, 40]
    assert metrics[-1]["forwards"] == 80
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert set(steps[0]) >= {"step", "seeds", "direction", "losses", "lr", "forwards", "wall_s", "grad"}


def test_checkpoint_files_and_reload_gives_identical_outputs(tiny_model_dir, overfit_data, tmp_path, tiny_batch):
    from qzo.train.loop import run, setup

    out = tmp_path / "run"
    session = setup(None, _sets(tiny_model_dir, overfit_data, out), log=lambda *_: None)
    run(session, log=lambda *_: None, progress=False)
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["step-000003", "step-000006"]
    assert {p.name for p in ckpts[-1].iterdir()} == {"trainables.safetensors", "meta.json"}
    assert not list((out / "checkpoints").glob(".*"))
    with torch.no_grad():
        live = session.model(**tiny_batch).logits
    model, _, params, _ = load_run_model(out)  # a fresh base + LoRA with the checkpoint's values
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_batch).logits, live, rtol=0, atol=0)
    saved = json.loads((ckpts[-1] / "meta.json").read_text())
    assert saved["step"] == 6 and saved["forwards"] == 12


def test_resume_is_bit_exact(tiny_model_dir, overfit_data, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train(None, _sets(tiny_model_dir, overfit_data, full), progress=False)
    train(None, _sets(tiny_model_dir, overfit_data, half, **{"train.steps": 3}), progress=False)
    train(None, ["train.steps=6"], resume=half, progress=False)
    a = (full / "checkpoints/step-000006/trainables.safetensors").read_bytes()
    b = (half / "checkpoints/step-000006/trainables.safetensors").read_bytes()
    assert a == b
    assert (full / "adapter/adapter_model.safetensors").read_bytes() == (half / "adapter/adapter_model.safetensors").read_bytes()
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in p.read_text().splitlines()]
    assert strip(full / "steps.jsonl") == strip(half / "steps.jsonl")


def test_resume_errors(tiny_model_dir, overfit_data, tmp_path):
    with pytest.raises(QzoError, match="not a qzo run directory"):
        train(None, [], resume=tmp_path, progress=False)
    out = tmp_path / "run"
    train(None, _sets(tiny_model_dir, overfit_data, out, **{"train.steps": 1}), progress=False)
    with pytest.raises(ConfigError, match="cannot change on --resume"):
        train(None, ["optim.lr=1.0"], resume=out, progress=False)
    with pytest.raises(QzoError, match="already exists"):
        train(None, _sets(tiny_model_dir, overfit_data, out), progress=False)


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_model_dir, overfit_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--no-progress"]
    for s in _sets(tiny_model_dir, overfit_data, out, **{"optim.lr": 1e30, "train.steps": 20, "train.save_every": 1}):
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 3
    assert "error: loss is" in err and "the last good checkpoint is" in err
    good = list_checkpoints(out)[-1]
    step = json.loads((good / "meta.json").read_text())["step"]
    assert f"step {step + 1}" in err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["train", "--set", "model.source=/no/such/model"], "does not exist"),
        (["train", "--set", "model.quant=q3"], "model.quant"),
        (["train", "--resume", "/tmp"], "not a qzo run directory"),
    ],
)
def test_cli_bad_input_is_one_line_error(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and match in err[-1]


def test_world_size_without_torchrun_is_a_clear_error(monkeypatch, capsys):
    # WORLD_SIZE alone (no rendezvous) would make init_process_group wait or fail obscurely
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "WORLD_SIZE=2" in err and "one process" in err


def test_sgd_run_is_rebuilt_from_its_step_log(tiny_model_dir, overfit_data, tmp_path):
    from safetensors.torch import load_file

    import qzo
    from qzo.runs.replay import read_step_log, replay_sgd

    out = tmp_path / "run"
    train(None, _sets(tiny_model_dir, overfit_data, out, **{"optim.rule": "{name: sgd, weight_decay: 0.5}"}), progress=False)
    model, _ = qzo.load(tiny_model_dir, quant="nf4")
    params = qzo.lora(model, r=4, alpha=16, target_modules=["q_proj", "v_proj"], seed=1)  # the run's init
    init = params.state_dict()
    replay_sgd(params, read_step_log(out), weight_decay=0.5)
    trained = load_file(str(out / "checkpoints/step-000006/trainables.safetensors"))
    for t in params:
        moved = (trained[t.name] - init[t.name]).abs().max().item()
        assert moved > 1e-3
        torch.testing.assert_close(t.tensor, trained[t.name], rtol=0, atol=moved * 1e-3)


@pytest.mark.parametrize("strategy,rule,normalize", [("gv", "momentum", None), ("greedy", "sign", None),
                                                    ("ldsd", "adam", None), ("fzoo", "sgd", "rms"),
                                                    ("fzoo", "momentum", "spread"), ("conmezo", "sgd", None)])
def test_resume_is_bit_exact_for_stateful_strategies_and_rules(strategy, rule, normalize, tiny_model_dir,
                                                                overfit_data, tmp_path):
    pool_arg = STRATEGIES[strategy].pool_arg  # a pool of 3 for the strategies that have one
    spec = f"{{name: {strategy}{f', {pool_arg}: 3' if pool_arg else ''}}}"
    extra = {"optim.strategy": spec, "optim.rule": rule, "optim.normalize": normalize or "null", "optim.lr": 1e-2, "train.steps": 4,
             "train.eval_every": 2, "train.save_every": 2}
    full, half = tmp_path / "full", tmp_path / "half"
    train(None, _sets(tiny_model_dir, overfit_data, full, **extra), progress=False)
    train(None, _sets(tiny_model_dir, overfit_data, half, **{**extra, "train.steps": 2}), progress=False)
    train(None, ["train.steps=4"], resume=half, progress=False)
    stateful = strategy in ("ldsd", "conmezo") or rule in ("momentum", "adam")  # mu, momentum, moments
    names = ["trainables.safetensors", "meta.json"] + (["optimizer.safetensors"] if stateful else [])
    for name in names:
        a, b = full / "checkpoints/step-000004" / name, half / "checkpoints/step-000004" / name
        assert a.is_file() and a.read_bytes() == b.read_bytes()  # meta holds the running RMS of normalize rms
    assert (full / "checkpoints/step-000004/optimizer.safetensors").is_file() == stateful
    meta = json.loads((full / "checkpoints/step-000004/meta.json").read_text())
    assert meta["forwards"] == 4 * {"gv": 5, "greedy": 4, "ldsd": 4, "fzoo": 4, "conmezo": 2}[strategy]
    logs = [[{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in (run / "steps.jsonl").open()]
            for run in (full, half)]
    assert logs[0] == logs[1]  # the same seeds, losses and (normalized) grads, step for step


def test_a_budget_in_forwards_stops_at_the_first_step_reaching_it(tiny_model_dir, overfit_data, tmp_path):
    # fzoo with 3 probes against f(theta): 4 forwards a step, so 18 forwards end at step 5 (20 forwards)
    out = tmp_path / "run"
    summary = train(None, _sets(tiny_model_dir, overfit_data, out, **{
        "optim.strategy": "{name: fzoo, probes: 3}", "train.forwards": 18, "train.steps": 1000,
        "train.eval_every_forwards": 8, "train.save_every": 100}), progress=False)
    assert summary["steps"] == 5 and summary["forwards"] == 20
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # held-out loss at 0, then at the first step past 8 and 16 forwards (steps 2 and 4), and at the end
    assert [r["step"] for r in rows if r.get("eval_loss") is not None] == [0, 2, 4, 5]
    assert [r["forwards"] for r in rows if r.get("eval_loss") is not None] == [0, 8, 16, 20]


def test_batched_pool_and_clip_through_the_config(tiny_model_dir, overfit_data, tmp_path):
    """optim.batched and optim.clip reach the optimizer: same seeds as one by one, 1 forward call per pool."""
    extra = {"optim.strategy": "{name: gv, pool: 3}", "optim.lr": 1e-2, "optim.clip": 50.0, "train.steps": 2,
             "train.eval_every": 2, "train.save_every": 2}
    plain, batched = tmp_path / "plain", tmp_path / "batched"
    train(None, _sets(tiny_model_dir, overfit_data, plain, **extra), progress=False)
    train(None, _sets(tiny_model_dir, overfit_data, batched, **{**extra, "optim.batched": True}), progress=False)
    steps = [[json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()] for run in (plain, batched)]
    for a, b in zip(*steps):
        assert a["seeds"] == b["seeds"] and a["forwards"] == b["forwards"]
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)
        assert abs(a["grad"]) <= 50.0


def test_scale_and_dense_targets_train_resume_and_reload(tiny_model_dir, overfit_data, tmp_path, tiny_batch):
    """targets.scales + targets.dense + LoRA from the config: trained, resumed bit-exactly, reloaded on a fresh base."""
    from safetensors.torch import load_file

    from qzo.train.loop import run, setup

    extra = {"targets.scales": "[q_proj]", "targets.dense": "[model.norm]", "optim.clip": 100,
             "train.steps": 4, "train.eval_every": 2, "train.save_every": 2}
    full, half = tmp_path / "full", tmp_path / "half"
    session = setup(None, _sets(tiny_model_dir, overfit_data, full, **extra), log=lambda *_: None)
    assert sorted(session.parts) == ["dense", "lora", "scales"]
    before = {t.name: t.tensor.clone() for t in session.params}
    run(session, log=lambda *_: None, progress=False)
    moved = {kind: max((t.tensor - before[t.name]).abs().max().item() for t in part)
             for kind, part in session.parts.items()}
    assert all(m > 0 for m in moved.values()), moved
    assert {"adapter", "scales.safetensors", "dense.safetensors"} <= {p.name for p in full.iterdir()}

    train(None, _sets(tiny_model_dir, overfit_data, half, **{**extra, "train.steps": 2}), progress=False)
    train(None, ["train.steps=4"], resume=half, progress=False)
    for name in ("checkpoints/step-000004/trainables.safetensors", "scales.safetensors", "dense.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(half / name))  # (metadata order varies, so not bytes)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with torch.no_grad():
        live = session.model(**tiny_batch).logits
    model, _, _, _ = load_run_model(full)
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_batch).logits, live, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["targets.lora=false"], "nothing to train"),
        (["targets.scales=some"], r"'targets.scales' is 'some'"),
        (["targets.dense=[]"], r"'targets.dense' must be null or a non-empty list"),
        (["targets.scales=all", "optim.strategy=gv", "optim.batched=true"], "cannot batch scale or dense"),
    ],
)
def test_bad_target_keys(overrides, match):
    from qzo.config.schema import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_target_pattern_matching_nothing_is_a_one_line_error(tiny_model_dir, overfit_data, tmp_path, capsys):
    args = ["train", "--no-progress"]
    for s in _sets(tiny_model_dir, overfit_data, tmp_path / "run", **{"targets.dense": "[no_such_module]"}):
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: qzo.dense: ['no_such_module'] match no")


def test_a_run_written_before_new_keys_existed_resumes_with_their_defaults(tiny_model_dir, overfit_data, tmp_path):
    import yaml

    out = tmp_path / "run"
    train(None, _sets(tiny_model_dir, overfit_data, out, **{"train.steps": 2}), progress=False)
    old = yaml.safe_load((out / "config.yaml").read_text())
    del old["targets"], old["data"]["format"], old["data"]["packing"]  # as an earlier qzo wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    summary = train(None, ["train.steps=4"], resume=out, progress=False)
    assert summary["steps"] == 4
    assert yaml.safe_load((out / "config.yaml").read_text())["targets"]["lora"] is True
