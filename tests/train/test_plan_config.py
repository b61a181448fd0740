"""``qzo plan`` from a recipe (a YAML file or a shipped name) and from a hub id whose config is in the local cache.

The cache is a folder in the Hugging Face hub layout under the test's tmp (``HF_HUB_CACHE``
pointed there, and huggingface_hub's resolved constant with it); nothing is downloaded.
"""

import re

import pytest
import yaml
from transformers import LlamaConfig

from qzo import recipes
from qzo.cli.main import main
from qzo.config.schema import load_config
from qzo.errors import QzoError
from qzo.train.plan import GiB, HUB_PRESETS, PRESETS, config_settings, model_config, plan, plan_config

SHAPES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache; ``add(repo_id, config)`` puts a config.json in it as `hf download ID config.json` does."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once, at import

    def add(repo_id: str, config) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        revision = "0" * 40
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
        config.save_pretrained(repo / "snapshots" / revision)

    return add


def _printed_total(out: str) -> float:
    return float(re.search(r"^total\s+([\d.]+) GiB", out, re.M).group(1))


def test_a_shipped_recipe_plans_its_own_step_on_its_card(hub_cache, capsys):
    """The hub id is not cached: the recipe's model is planned with its preset, and the header's number comes out."""
    assert main(["plan", "llama-2-7b-chat/gpu-24gib"]) == 0
    out = capsys.readouterr().out
    assert "GPU budget 24GiB: the card llama-2-7b-chat/gpu-24gib is sized for" in out
    assert ("meta-llama/Llama-2-7b-chat-hf's config.json is not in the local Hugging Face cache; planning with the "
            "preset llama-2-7b") in out
    assert "meta-llama/Llama-2-7b-chat-hf, nf4, batch 10 x 4096, pool 4 stacked, LoRA r 8 on q_proj,v_proj" in out
    assert _printed_total(out) == 22.75  # what the recipe's header quotes
    assert re.search(r"GPU budget\s+24.00 GiB: fits", out)
    # a flag overrides what the recipe says
    assert main(["plan", "llama-2-7b-chat/gpu-24gib", "--batch", "2", "--gpu", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 x 4096" in out and re.search(r"GPU budget\s+8.00 GiB", out)


def test_a_recipe_file_with_a_cached_hub_model(hub_cache, tmp_path, capsys):
    hub_cache("acme/tiny-chat", LlamaConfig(**SHAPES))
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "acme/tiny-chat", "quant": "int8", "dtype": "float16"},
                                    "lora": {"r": 4, "target_modules": "all-linear"},
                                    "optim": {"strategy": {"name": "fzoo", "probes": 3}, "batched": True},
                                    "train": {"batch_size": 2, "max_len": 128}}))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not in the local Hugging Face cache" not in out and "GPU budget" not in out  # no card: no verdict
    assert "acme/tiny-chat, int8, batch 2 x 128, pool 3 stacked, LoRA r 4 on all-linear, float16" in out
    want = plan(LlamaConfig(**SHAPES), quant="int8", dtype="float16", batch=2, seq=128, lora_r=4,
                lora_targets="all-linear", strategy="fzoo", pool=3)
    assert _printed_total(out) == round(want.total / GiB, 2)
    assert plan_config(load_config(path)).total == want.total
    assert "LoRA all-linear: every linear of the decoder layers" in out


def test_a_cached_hub_id_is_planned_from_its_config(hub_cache, capsys):
    hub_cache("acme/tiny", LlamaConfig(**SHAPES))
    assert model_config("acme/tiny").hidden_size == 256
    assert main(["plan", "acme/tiny", "--batch", "1", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert _printed_total(out) == round(plan(LlamaConfig(**SHAPES), batch=1, seq=64).total / GiB, 2)
    # a shipped recipe's hub id in the cache: its real config, not the preset
    hub_cache("meta-llama/Llama-2-7b-chat-hf", LlamaConfig(**SHAPES))
    lines = []
    from qzo.train.plan import plan_source

    assert plan_source("meta-llama/Llama-2-7b-chat-hf", lines.append).hidden_size == 256 and not lines
    with pytest.raises(QzoError, match=r"'acme/absent' is not there: `hf download acme/absent config.json`"):
        plan_source("acme/absent", lines.append)


def test_every_shipped_recipe_maps_to_a_planner_preset_and_its_settings():
    for name in recipes.names():
        cfg = load_config(name)
        source = cfg["model"]["source"]
        if "/" in source:  # a hub id: planned without its config in the cache
            assert HUB_PRESETS.get(source) in PRESETS, f"{name}: map {source} to its preset in qzo.plan.HUB_PRESETS"
        s = config_settings(cfg)
        assert (s["batch"], s["seq"], s["lora_r"]) == (cfg["train"]["batch_size"], cfg["train"]["max_len"],
                                                       cfg["lora"]["r"])


def test_all_linear_plans_every_decoder_linear():
    base = plan("llama-2-7b", lora_r=8, lora_targets=("q_proj", "v_proj"))
    every = plan("llama-2-7b", lora_r=8, lora_targets="all-linear")
    h, i = 4096, 11008
    assert every.trainables == 4 * 8 * (4 * (h + h) + 3 * (h + i)) * 32  # q, k, v, o and gate, up, down; float32
    assert every.trainables > base.trainables and every.weights == base.weights
    assert any("not the LM head" in n for n in every.notes)
