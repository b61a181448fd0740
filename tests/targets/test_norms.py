"""``qzo.norms`` and ``targets.norms``: the normalization layers' gains as trainables."""

import json

import pytest
import torch

import qzo
from qzo.errors import TargetError

from helpers import run_overrides, tiny_config
from zo_reference import PlainZO


def _model(tiny_tokenizer):
    model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant="nf4", seed=0)
    return model


def test_norms_picks_every_normalization_layer_and_patterns_pick_some(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    layers = model.config.num_hidden_layers
    params = qzo.norms(model)
    names = [t.name for t in params]
    assert len(names) == 2 * layers + 1 and names[-1] == "model.norm.weight"
    assert all(t.tensor.dtype == torch.float32 and t.tensor.dim() == 1 for t in params)
    assert params.numel == (2 * layers + 1) * model.config.hidden_size
    some = qzo.norms(_model(tiny_tokenizer), modules=["*post_attention_layernorm"])
    assert [t.name for t in some] == [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(layers)]
    with pytest.raises(TargetError, match="match no normalization"):
        qzo.norms(_model(tiny_tokenizer), modules=["q_proj"])  # a linear is not a norm


def test_norms_equal_their_materialized_noise_twin(tiny_tokenizer, tiny_batch):
    model_a, model_b = _model(tiny_tokenizer), _model(tiny_tokenizer)
    params_a, params_b = qzo.norms(model_a), qzo.norms(model_b)
    init = params_a.state_dict()
    opt = qzo.ZO(params_a, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-2), eps=1e-2, seed=5)
    plain = PlainZO([(t.name, t.tensor) for t in params_b], "spsa", "sgd", lr=1e-2, eps=1e-2, seed=5)
    for step in range(1, 6):
        opt.step(lambda: model_a(**tiny_batch).loss)
        plain.step(lambda: model_b(**tiny_batch).loss, step)
        assert opt.last_record.losses == pytest.approx(plain.log[-1][1], rel=1e-5)
    for ta, tb in zip(params_a, params_b):
        moved = (tb.tensor - init[tb.name]).abs().max().item()
        assert moved > 1e-4
        torch.testing.assert_close(ta.tensor, tb.tensor, rtol=0, atol=moved * 1e-3)


def test_norms_round_trip_through_the_target_files(tiny_tokenizer, tiny_batch, tmp_path):
    model = _model(tiny_tokenizer)
    params = qzo.norms(model)
    for t in params:
        t.tensor.mul_(1.0 + 0.1 * qzo.noise.randn(7, t.stream, t.tensor.numel()).view_as(t.tensor))
    with torch.no_grad():
        want = model(**tiny_batch).logits
    qzo.targets.save(params, tmp_path / "saved")
    fresh = _model(tiny_tokenizer)
    with torch.no_grad():
        assert not torch.allclose(fresh(**tiny_batch).logits, want)
    loaded = qzo.targets.load(fresh, tmp_path / "saved")
    assert loaded.state_dict().keys() == params.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**tiny_batch).logits, want, rtol=0, atol=0)


def _sets(model_dir, data, out, **extra):
    return run_overrides(model_dir, data, out, **{"targets.lora": False, "targets.norms": "all", "optim.lr": 1e-3,
                                                  "train.steps": 4, "train.eval_every": 2, "train.save_every": 2,
                                                  **extra})


@pytest.mark.parametrize("subsample", [None, 0.3])
def test_a_norms_run_resumes_bit_exactly(subsample, tiny_model_dir, code_chats, tmp_path):
    """Also with optim.subsample: the tensors a step perturbs are a function of the seed and the step."""
    from qzo.train.loop import train

    full, half = tmp_path / "full", tmp_path / "half"
    extra = {"optim.subsample": "null" if subsample is None else subsample}
    train(None, _sets(tiny_model_dir, code_chats, full, **extra))
    train(None, _sets(tiny_model_dir, code_chats, half, **{"train.steps": 2, **extra}))
    train(None, ["train.steps=4"], resume=half)
    for name in ("trainables.safetensors", "meta.json"):
        a, b = (run / "checkpoints/step-000004" / name for run in (full, half))
        assert a.read_bytes() == b.read_bytes()
    assert (full / "dense.safetensors").is_file()  # the gains are dense slices: qzo.load_dense reads them


def test_auto_lr_is_deterministic_counted_and_not_tested_again_on_resume(tiny_model_dir, code_chats, tmp_path):
    from qzo.train.loop import train

    logs = {name: [] for name in ("a", "b", "half", "resumed")}
    for name in ("a", "b"):
        train(None, _sets(tiny_model_dir, code_chats, tmp_path / name, **{"optim.lr": "auto"}), log=logs[name].append)
    search = json.loads((tmp_path / "a" / "auto_lr.json").read_text())
    assert search == json.loads((tmp_path / "b" / "auto_lr.json").read_text())  # the same seeds, the same lr
    assert search["blowup_lr"] is not None and search["lr"] == pytest.approx(search["blowup_lr"] / 64)
    assert search["forwards"] == 2 * len(search["lrs"])
    steps = [json.loads(line) for line in (tmp_path / "a" / "steps.jsonl").read_text().splitlines()]
    assert [s["lr"] for s in steps] == [search["lr"]] * 4
    assert steps[0]["forwards"] == search["forwards"] + 2  # the test's forwards count in the run's
    half = tmp_path / "half"
    train(None, _sets(tiny_model_dir, code_chats, half, **{"optim.lr": "auto", "train.steps": 2}),
          log=logs["half"].append)
    train(None, ["train.steps=4"], resume=half, log=logs["resumed"].append)
    assert any("range test" in line for line in logs["half"])
    assert not any("range test" in line for line in logs["resumed"])  # read back, not tested again
    a, b = (run / "checkpoints/step-000004/trainables.safetensors" for run in (tmp_path / "a", half))
    assert a.read_bytes() == b.read_bytes()


def test_auto_lr_is_the_only_word_optim_lr_takes(tiny_model_dir, code_chats, tmp_path):
    from qzo.config.schema import load_config
    from qzo.errors import ConfigError

    assert load_config(None, ["optim.lr=auto"])["optim"]["lr"] == "auto"
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])
