"""Config loading: the demo recipe is the defaults; bad keys, types and values name the key."""

from pathlib import Path

import pytest
import yaml

from qzo.config.schema import DEFAULTS, load_config
from qzo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_no_config_is_the_demo_recipe_which_differs_from_the_defaults_only_where_measured():
    from qzo.config.schema import DEFAULTS, flat_keys

    demo = load_config(ROOT / "qzo/recipes/smollm2-135m/demo.yaml")
    assert demo == load_config(None) == load_config("smollm2-135m/demo")  # by path, with no config, by name
    raw = yaml.safe_load((ROOT / "qzo/recipes/smollm2-135m/demo.yaml").read_text())
    assert {f"{s}.{k}" for s, keys in raw.items() if isinstance(keys, dict) for k in keys} <= set(flat_keys())
    differs = {f"{s}.{k}" for s in DEFAULTS if isinstance(DEFAULTS[s], dict) for k in DEFAULTS[s]
               if demo[s][k] != DEFAULTS[s][k]}
    # B-only directions at their own lr (benchmarks/results/convergence.json), and the benchmark's batch
    assert differs == {"optim.noise_scale", "optim.lr", "train.batch_size", "train.steps"}


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "qzo/recipes").rglob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_overrides_parse_values():
    cfg = load_config(None, ["optim.lr=2e-4", "lora.target_modules=[q_proj, k_proj]", "data.eval=null"])
    assert cfg["optim"]["lr"] == 2e-4
    assert cfg["lora"]["target_modules"] == ["q_proj", "k_proj"]
    assert cfg["data"]["eval"] is None
    assert DEFAULTS["optim"]["lr"] == 1e-3  # defaults untouched


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.lrr=1"], r"unknown config key 'optim.lrr'.*optim.lr"),
        (["optim.lr"], "key=value"),
        (["optim.lr=fast"], r"'optim.lr' must be float"),
        (["optim.lr=-1"], r"'optim.lr' must be > 0"),
        (["model.quant=int3"], r"'model.quant'.*nf4, fp4, int8, none"),
        (["train.steps=0"], r"'train.steps' must be >= 1"),
        (["lora.target_modules=[]"], "target_modules"),
        (["optim.batched=true"], r"'optim.batched' applies to pool strategies"),
        (["optim.clip=0"], r"'optim.clip' must be > 0"),
        (['optim.noise_scale={"*lora_A*": -1}'], r"'optim.noise_scale' maps name patterns to scales >= 0"),
        (["optim.noise_scale=null", "optim.noise_scale_steps=10"], r"'optim.noise_scale_steps'.*needs optim.noise_scale"),
    ],
)
def test_bad_overrides(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_yaml_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  nesterov: true\n")
    with pytest.raises(ConfigError, match=r"'optim.nesterov'.*optim.lr"):
        load_config(path)
    path.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"'trainer'.*model, lora"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_noise_scale_keys_reach_the_optimizer():
    import torch

    from qzo.config.build import build_optimizer

    cfg = load_config(None, ['optim.noise_scale={"*lora_A*": 0}', "optim.noise_scale_steps=5"])
    params = [("x.lora_A.weight", torch.zeros(3)), ("x.lora_B.weight", torch.zeros(3))]
    opt = build_optimizer(cfg, params)
    assert [t.name for t in opt.params_at(5)] == ["x.lora_B.weight"]
    assert [t.name for t in opt.params_at(6)] == ["x.lora_A.weight", "x.lora_B.weight"]
    typo = load_config(None, ['optim.noise_scale={"*lora_a*": 0}'])
    with pytest.raises(ConfigError, match=r"'optim.noise_scale': noise scale pattern '\*lora_a\*' matches no "
                                          "trainable"):
        build_optimizer(typo, params)
