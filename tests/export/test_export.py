"""qzo export: each format loads outside qzo and gives the trained model's outputs (tolerance per format)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import qzo

from qzo.models.bnb import choose_cpu_path
from qzo.cli.main import main
from qzo.errors import QzoError
from qzo.export.formats import export
from qzo.runs.reader import load_run_model
from qzo.train.loop import train

from helpers import write_code_chats

PROMPT = [[1, 324, 3, 17, 421, 42, 7, 7, 2]]  # ids of the tiny tokenizer (512)


def _train(model_dir, tmp_path, name, **extra):
    data = write_code_chats(tmp_path)
    sets = {"model.source": str(model_dir), "model.quant": "nf4", "lora.r": 4, "data.train": str(data),
            "data.eval": str(data), "optim.lr": 0.5, "train.steps": 4, "train.batch_size": 4, "train.max_len": 48,
            "train.eval_every": 4, "train.save_every": 4, "out_dir": str(tmp_path / name), **extra}
    train(None, [f"{k}={v}" for k, v in sets.items()], progress=False, log=lambda *_: None)
    return tmp_path / name


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROMPT)).logits.float()


@pytest.fixture(scope="module")
def mixed_run(tiny_model_dir, tmp_path_factory):
    """LoRA + trained NF4 scales + two dense slices, and the trained model's logits."""
    run = _train(tiny_model_dir, tmp_path_factory.mktemp("mixed"), "run", **{
        "targets.scales": "[q_proj]", "targets.dense": "[model.norm, layers.1.mlp.down_proj]"})
    model, _, params, _ = load_run_model(run)
    moved = max(t.tensor.abs().max().item() for t in params if "lora_B" in t.name)
    assert moved > 0  # the adapters did train
    return run, _logits(model)


def test_merged_float32_equals_the_trained_model(mixed_run, tmp_path):
    run, expected = mixed_run
    out = export(run, "merged", out=tmp_path / "merged", dtype="float32", log=lambda *_: None)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(plain.config, "quantization_config")
    # the same float32 numbers, summed in another order (W x + B A x vs (W + B A) x)
    torch.testing.assert_close(_logits(plain), expected, rtol=0, atol=2e-5)


def test_merged_bfloat16_is_within_bf16_rounding(mixed_run, tmp_path):
    run, expected = mixed_run
    from safetensors import safe_open

    out = export(run, "merged", out=tmp_path / "merged", log=lambda *_: None)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # computed in float32, only the weights' bf16 rounding (8 significant bits, ~0.4%) remains
    got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    rel = ((got - expected).norm() / expected.norm()).item()
    print(f"bf16 merged export: relative logit error {rel:.4f}")
    assert rel <= 2e-2


def test_quantized_folder_has_the_trained_scales_and_adapter(mixed_run, tmp_path):
    import peft

    run, expected = mixed_run
    out = export(run, "quantized", out=tmp_path / "q4", log=lambda *_: None)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(base.model.layers[1].mlp.down_proj) is torch.nn.Linear  # the dense slice, unquantized
    # a run that trains scales runs bitsandbytes' plain CPU path (qzo.train.loop); left alone,
    # bitsandbytes would repack this readback for its fused bf16 kernel on AVX512-BF16 CPUs
    choose_cpu_path(base, fused=False)
    model = peft.PeftModel.from_pretrained(base, out / "adapter")
    # the same 4-bit codes, trained scales and adapters on the same CPU path: identical
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)


def test_peft_export_of_a_lora_run_loads_with_peft(tiny_model_dir, tiny_lora_run):
    import peft

    import qzo

    run = tiny_lora_run  # the suite's shared run (conftest)
    model, _, params, _ = load_run_model(run)
    out = export(run, "peft", log=lambda *_: None)
    assert out == run / "export-peft"
    base, _ = qzo.load(tiny_model_dir, "nf4")
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(base, out)), _logits(model), rtol=0, atol=0)
    # the adapter names a base that loads: the model folder, absolute (nothing is fetched: there is no hub here)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(out))
    loaded = {k.replace(".default.", "."): v for k, v in auto.state_dict().items() if "lora_" in k}
    assert loaded.keys() == params.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in params.state_dict().items())
    with pytest.raises(QzoError, match="already exists"):
        export(run, "peft", log=lambda *_: None)


def test_int8_run_merges_and_refuses_a_4bit_export(tiny_model_dir, tmp_path):
    # lr 0.05 (measured on the tiny model): the row scales move by up to 5x their largest start value and the
    # int8 and merged logits agree to 0.6%. At lr 0.5 they differed by 20%: int8 rounds activations per row
    # inside its matmul, coarsely once the scales are that far off; a wrong merge would show at either lr
    run = _train(tiny_model_dir, tmp_path, "int8", **{"model.quant": "int8", "targets.scales": "all",
                                                       "optim.lr": 0.05})
    model, _, _, _ = load_run_model(run)
    base = qzo.load(str(tiny_model_dir), quant="int8")[0].state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if k.endswith("SCB")}
    moved = max(((v - base[k]).abs().max() / base[k].abs().max()).item() for k, v in trained.items())
    assert moved > 1e-3  # training moved the scales the merge must fold in
    out = export(run, "merged", dtype="float32", log=lambda *_: None)
    expected = _logits(model)
    # the int8 model quantizes activations per row inside its matmuls; the merged one does not: an error of
    # that rounding's size, not of a wrong merge (which moves logits by as much as the scales' training did)
    got = _logits(AutoModelForCausalLM.from_pretrained(out))
    assert (got - expected).norm() <= 2e-2 * expected.norm()
    with pytest.raises(QzoError, match="supports nf4/fp4 bases; this run's base is int8"):
        export(run, "quantized", log=lambda *_: None)
    with pytest.raises(QzoError, match="cannot hold scales or dense slices"):
        export(run, "peft", log=lambda *_: None)


def test_moved_base_is_found_with_base(tiny_model_dir, tmp_path):
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, moved)
    run = _train(moved, tmp_path, "run")
    shutil.move(moved, tmp_path / "elsewhere")
    with pytest.raises(QzoError, match="pass its new place with --base"):
        export(run, "merged", log=lambda *_: None)
    assert not (run / "export-merged").exists() and not list(run.glob(".tmp-*"))  # nothing half-written
    assert main(["export", str(run), "--merged", "--base", str(tmp_path / "elsewhere")]) == 0
    assert (run / "export-merged" / "model.safetensors").is_file()


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--peft"]) == 2
    assert "not a qzo run directory" in capsys.readouterr().err
