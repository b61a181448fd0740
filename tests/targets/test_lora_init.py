"""``lora.init_from``: adapters start from a peft-saved adapter or an earlier qzo run, checked before use.

The reference for "starts from the adapter" is peft itself: ``PeftModel.from_pretrained`` of
the same folder on the same NF4 base (loaded the same way, so the same bitsandbytes path).
"""

import json
import shutil

import pytest

from qzo.runs.checkpoint import lora_values
import torch

import qzo
from qzo.runs.checkpoint import find_checkpoint, load_checkpoint
from qzo.config.schema import load_config
from qzo.data.dataset import eval_loss
from qzo.errors import ConfigError, QzoError
from qzo.targets.lora import load_initial_values
from qzo.train.loop import setup, train

from helpers import TINY, run_overrides

PROMPT = [[1, 324, 3, 17, 421, 42, 7, 7, 2]]  # ids of the tiny tokenizer (512)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROMPT)).logits.float()


def _peft_adapter(model_dir, folder, r=4, alpha=8, targets=("q_proj", "v_proj"), config=None, **lora_kwargs):
    """A LoRA adapter saved by peft (as Unsloth / TRL leave one) on a full-precision base, with B != 0."""
    import peft
    from transformers import AutoModelForCausalLM, LlamaConfig

    if config is None:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                      lora_dropout=0.0, **lora_kwargs))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # first-order training moved B: the adapter changes the logits
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return _peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("peft") / "adapter")


@pytest.fixture(scope="module")
def reference_logits(tiny_model_dir, adapter):
    """peft's own adapter model on the NF4 base: what qzo must reproduce at step 0."""
    import peft

    base, _ = qzo.load(tiny_model_dir, "nf4")
    plain = _logits(base)
    model = peft.PeftModel.from_pretrained(base, str(adapter))
    return model, _logits(model), plain


def test_lora_from_a_peft_adapter_gives_peft_logits(tiny_model_dir, adapter, reference_logits):
    _, expected, plain = reference_logits
    model, _ = qzo.load(tiny_model_dir, "nf4")
    params = qzo.lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_from=adapter)
    assert (expected - plain).abs().max() > 0.1  # the adapter does change the model
    # the same NF4 layers, the same float32 adapter values, the same peft layer code: identical
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    assert all(t.tensor.dtype == torch.float32 for t in params)


def test_a_run_with_init_from_starts_at_the_adapter(tiny_model_dir, adapter, reference_logits, code_chats, tmp_path):
    reference, expected, _ = reference_logits
    sets = run_overrides(tiny_model_dir, code_chats, tmp_path / "run",
                         **{"lora.alpha": 8, "lora.init_from": str(adapter)})
    s = setup(None, sets, log=lambda *_: None)
    try:
        torch.testing.assert_close(_logits(s.model), expected, rtol=0, atol=0)
        pad = s.tok.pad_token_id
        # the step-0 held-out loss of the run is the adapter's
        assert eval_loss(s.model, s.eval_ds, 16, pad) == eval_loss(reference, s.eval_ds, 16, pad)
    finally:
        s.lock.release()


def test_mismatches_name_the_difference_and_the_fix(tiny_model_dir, adapter, tmp_path):
    model, _ = qzo.load(tiny_model_dir, "nf4")
    params = qzo.lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(QzoError, match=r"has rank 4, this run has lora.r 8; set lora.r: 4"):
        load_initial_values(params, adapter, r=8, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(QzoError, match=r"has alpha 8, this run has lora.alpha 16.*set lora.alpha: 8"):
        load_initial_values(params, adapter, r=4, alpha=16, target_modules=["q_proj", "v_proj"])
    with pytest.raises(QzoError, match=r"adapts q_proj, v_proj; this run's lora.target_modules is q_proj, k_proj.*"
                                       r"set lora.target_modules: \[q_proj, v_proj\]"):
        load_initial_values(params, adapter, r=4, alpha=8, target_modules=["q_proj", "k_proj"])
    other = _peft_adapter(None, tmp_path / "other", config=dict(TINY, hidden_size=32, vocab_size=1000))
    with pytest.raises(QzoError, match=r"q_proj.lora_A.weight is \(4, 32\) in the PEFT adapter .* but \(4, 64\) in "
                                       r"this model.*another base"):
        load_initial_values(params, other, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    dora = shutil.copytree(adapter, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True, modules_to_save=["lm_head"])))
    with pytest.raises(QzoError, match=r"use_dora .*modules_to_save \['lm_head'\].*cannot start from"):
        load_initial_values(params, dora, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    (dora / "adapter_config.json").write_text(json.dumps(config))
    (dora / "adapter_model.safetensors").unlink()
    with pytest.raises(QzoError, match="no adapter_model.safetensors"):
        load_initial_values(params, dora, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(QzoError, match="does not exist; give a PEFT adapter folder"):
        load_initial_values(params, tmp_path / "nowhere", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(QzoError, match="not a PEFT adapter folder .* qzo.runs.checkpoint.lora_values"):
        load_initial_values(params, tmp_path, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(QzoError, match="neither a PEFT adapter folder nor a qzo run"):
        lora_values(tmp_path)  # where a run folder is read: it knows the layout


def test_rslora_alpha_is_compared_as_the_scale_it_gives(tiny_model_dir, tmp_path):
    rs = _peft_adapter(tiny_model_dir, tmp_path / "rs", alpha=8, use_rslora=True)  # scale 8 / sqrt(4) = 16 / 4
    model, _ = qzo.load(tiny_model_dir, "nf4")
    with pytest.raises(QzoError, match=r"has alpha 16 \(rsLoRA lora_alpha 8 / sqrt\(r\), as alpha / r\)"):
        qzo.lora(model, r=4, alpha=8, init_from=rs)


def test_targets_load_reads_an_rslora_adapter_at_the_scale_peft_gives(tiny_model_dir, tmp_path):
    """qzo.targets.load takes rank, alpha and modules from the folder: an rsLoRA adapter (scale alpha / sqrt(r))
    loads with the alpha whose alpha / r is that scale, and computes what peft's own model computes."""
    import peft

    rs = _peft_adapter(tiny_model_dir, tmp_path / "rs", alpha=8, use_rslora=True)
    base, _ = qzo.load(tiny_model_dir, "nf4")
    expected = _logits(peft.PeftModel.from_pretrained(base, str(rs)))
    model, _ = qzo.load(tiny_model_dir, "nf4")
    params = qzo.targets.load(model, rs)
    assert params.peft_model.peft_config["default"].lora_alpha == 16 and params.peft_model.peft_config["default"].r == 4
    torch.testing.assert_close(_logits(model), expected, rtol=1e-6, atol=1e-6)
    broken = shutil.copytree(rs, tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(QzoError, match=r"^load: .*adapter_config.json is not valid JSON"):
        qzo.targets.load(qzo.load(tiny_model_dir, "nf4")[0], broken)


def test_init_from_needs_lora_targets():
    with pytest.raises(ConfigError, match="lora.init_from"):
        load_config(None, ["lora.init_from=some/adapter", "targets.lora=false", "targets.scales=all"])
    with pytest.raises(ConfigError, match="lora.init_from"):
        load_config(None, ["lora.init_from=' '"])


def test_a_new_run_starts_from_an_old_runs_values(tiny_model_dir, code_chats, tmp_path):
    old = tmp_path / "old"
    train(None, run_overrides(tiny_model_dir, code_chats, old, **{"train.steps": 1}), progress=False,
          log=lambda *_: None)
    last = {k: v for k, v in load_checkpoint(find_checkpoint(old, "last"))[0].items()}
    assert max(v.abs().max().item() for k, v in last.items() if "lora_B" in k) > 0
    for source in (old, find_checkpoint(old, "last")):  # the run (its last checkpoint) or a checkpoint folder
        new = tmp_path / f"new-{source.name}"
        sets = run_overrides(tiny_model_dir, code_chats, new, **{"lora.init_from": str(source), "optim.lr": 1e-2})
        s = setup(None, sets, log=lambda *_: None)
        try:
            got = s.params.state_dict()
            assert got.keys() == last.keys()
            for name, value in last.items():
                assert torch.equal(got[name], value), name
        finally:
            s.lock.release()
    with pytest.raises(QzoError, match=r"has alpha 16, this run has lora.alpha 32"):
        setup(None, run_overrides(tiny_model_dir, code_chats, tmp_path / "bad", **{"lora.init_from": str(old),
                                                                                 "lora.alpha": 32}),
              log=lambda *_: None)


def test_a_resume_with_a_checkpoint_does_not_need_the_start_folder(tiny_model_dir, code_chats, tmp_path):
    start = _peft_adapter(tiny_model_dir, tmp_path / "start")
    run = tmp_path / "run"
    sets = run_overrides(tiny_model_dir, code_chats, run, **{"lora.alpha": 8, "lora.init_from": str(start),
                                                              "train.steps": 2, "train.save_every": 2})
    train(None, sets, progress=False, log=lambda *_: None)
    shutil.rmtree(start)  # the adapter the run started from is gone; its checkpoint holds the values
    summary = train(None, ["train.steps=4"], resume=run, progress=False, log=lambda *_: None)
    assert summary["steps"] == 4
