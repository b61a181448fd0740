"""qzo.load sources and errors; qzo.lora on quantized layers; the adapter loads in plain peft."""

import re

import pytest
import torch

import qzo
from qzo.errors import ModelSourceError, QzoError

from helpers import tiny_config


@pytest.mark.parametrize("quant,layer", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt"),
                                         ("none", "Linear")])
def test_load_from_config_quantizes(quant, layer):
    model, tok = qzo.load(tiny_config(1000), quant=quant, double_quant=quant == "nf4")
    assert tok is None
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_config_init_is_seeded():
    a, _ = qzo.load(tiny_config(1000), quant="none", seed=1)
    b, _ = qzo.load(tiny_config(1000), quant="none", seed=1)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_load_folder_and_lora_save_roundtrip(tiny_model_dir, tiny_batch, tmp_path):
    import peft

    model, tok = qzo.load(tiny_model_dir, quant="nf4")
    assert tok.chat_template
    params = qzo.lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert len(params) == 2 * 2 * 2 and all(t.tensor.dtype == torch.float32 for t in params)
    assert all(".default." not in t.name and "lora_" in t.name for t in params)
    with torch.no_grad():
        for t in params:
            t.tensor.add_(0.1 * torch.randn_like(t.tensor))
        want = model(**tiny_batch).logits
    params.save_adapter(tmp_path / "adapter")

    base, _ = qzo.load(tiny_model_dir, quant="nf4")
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = loaded(**tiny_batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_target_module_lists_existing(tiny_model_dir):
    model, _ = qzo.load(tiny_model_dir, quant="nf4")
    with pytest.raises(QzoError, match=r"\['qkv'\] match no module.*q_proj.*v_proj"):
        qzo.lora(model, target_modules=["qkv"])


def test_bad_sources(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        qzo.load(tmp_path / "no-such-model")
    with pytest.raises(ModelSourceError, match="does not exist"):
        qzo.load(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        qzo.load(fake)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        qzo.load(tmp_path / "empty")
    with pytest.raises(ModelSourceError, match="unknown model 'smollm3'"):
        qzo.load("smollm3")
    with pytest.raises(QzoError, match="unknown quant 'int4'"):
        qzo.load(tiny_config(1000), quant="int4")


def test_builtin_resolves_to_wheel_gguf():
    from qzo.models.load import resolve_source

    kind, path = resolve_source("smollm2-135m")
    assert kind == "gguf" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_gguf_is_converted_once_into_the_cache(smol_folder):
    from qzo.models.load import _convert_gguf, resolve_source

    assert (smol_folder / "config.json").is_file() and (smol_folder / "tokenizer.json").is_file()
    before = (smol_folder / "config.json").stat().st_mtime_ns
    assert _convert_gguf(resolve_source("smollm2-135m")[1]) == smol_folder
    assert (smol_folder / "config.json").stat().st_mtime_ns == before



def test_conversion_stages_report_start_and_duration_and_not_success_on_failure(capsys):
    from qzo.models.load import _stage

    with _stage("1/3 reading the tokenizer"):
        pass
    with pytest.raises(RuntimeError), _stage("2/3 dequantizing the weights"):
        raise RuntimeError("bad file")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "qzo: 1/3 reading the tokenizer ..."
    assert re.fullmatch(r"qzo: 1/3 reading the tokenizer: done in \d+\.\d s", lines[1])
    assert lines[2:] == ["qzo: 2/3 dequantizing the weights ..."]

def test_cache_command_shows_and_clears(tmp_path, monkeypatch, capsys):
    from qzo.cli.main import main

    monkeypatch.setenv("QZO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "gguf" / "m").mkdir(parents=True)
    (tmp_path / "cache" / "gguf" / "m" / "config.json").write_text("{}" * 1000)
    assert main(["cache"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache")
    assert main(["cache", "--clear"]) == 0
    assert "cleared" in capsys.readouterr().out and not (tmp_path / "cache").exists()


def test_lora_does_not_pass_on_peft_s_deprecation_warning():
    import warnings

    model, _ = qzo.load(tiny_config(1000), quant="nf4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qzo.lora(model, r=2, target_modules=["q_proj"])
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_hf_model_path_gives_transformers_a_loadable_path(smol_folder, tiny_model_dir):
    from qzo.models.load import hf_model_path

    assert hf_model_path("smollm2-135m") == str(smol_folder)  # the cached conversion
    assert hf_model_path(tiny_model_dir) == str(tiny_model_dir)
    with pytest.raises(ModelSourceError, match="save_pretrained"):
        hf_model_path(tiny_config(1000))


def test_all_linear_adapts_what_peft_s_all_linear_adapts(tiny_model_dir):
    """lora.target_modules all-linear: every decoder linear, not the LM head, exactly the modules peft picks."""
    import peft

    from qzo.targets.lora import all_linear_names

    model, _ = qzo.load(tiny_model_dir, quant="nf4")
    assert all_linear_names(model) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    params = qzo.lora(model, r=2, target_modules="all-linear")
    ours = {k.split(".lora_A.")[0] for k in params.state_dict() if ".lora_A." in k}
    ref_model, _ = qzo.load(tiny_model_dir, quant="nf4")
    ref = peft.get_peft_model(ref_model, peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.split(".lora_A.")[0] for n, _ in ref.named_parameters() if ".lora_A." in n}
    assert ours == theirs and len(ours) == 7 * 2  # 7 linears in each of the 2 layers
    assert not any("lm_head" in k for k in ours)
    with pytest.raises(QzoError, match=r"lora.target_modules is 'q_proj'; give a list of module names"):
        qzo.lora(qzo.load(tiny_model_dir, quant="none")[0], target_modules="q_proj")


def test_all_linear_in_the_config():
    from qzo.config.schema import load_config
    from qzo.errors import ConfigError

    assert load_config(None, ["lora.target_modules=all-linear"])["lora"]["target_modules"] == "all-linear"
    with pytest.raises(ConfigError, match=r"'lora.target_modules' is 'all_linear'; give a list of module names such "
                                          r"as \[q_proj, v_proj\], or all-linear"):
        load_config(None, ["lora.target_modules=all_linear"])
