"""One save/load API for every kind of trainable (qzo.targets.save / qzo.targets.load) and the former module paths.

Real tiny Llamas quantized by bitsandbytes on the plain CPU path: values are trained a few
ZO steps (so they differ from any init), saved, and read back onto a fresh load of the
same base, where the forward must equal the trained model's exactly.
"""

import pytest
import torch

import qzo
from qzo.targets import FILE_NAMES, TargetError, load, save

from helpers import tiny_config

IDS = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def _base():
    model, _ = qzo.load(tiny_config(1000), quant="nf4", seed=0, cpu_fused_4bit=False)
    return model


def _trained(params, model):
    batch = {"input_ids": IDS, "labels": IDS}
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=5e-2), eps=1e-2, seed=0)
    for _ in range(3):
        opt.step(lambda: model(**batch).loss)
    with torch.no_grad():
        return model(input_ids=IDS).logits


BUILDERS = {
    "lora": lambda m: qzo.lora(m, r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "scales": lambda m: qzo.scales(m, modules=["model.layers.0.*"]),
    "dense": lambda m: qzo.dense(m, modules=["model.norm", "model.layers.1.mlp.down_proj"]),
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_each_kind_round_trips_onto_a_fresh_base(kind, tmp_path):
    model = _base()
    params = BUILDERS[kind](model)
    if kind == "lora":  # B starts at 0: give it values, or a lost B would go unseen
        with torch.no_grad():
            for t in params:
                t.tensor.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(t.name)))
    logits = _trained(params, model)
    where = save(params, tmp_path / FILE_NAMES[kind])
    assert where.exists() and (where.is_dir() == (kind == "lora"))
    fresh = _base()
    back = load(fresh, where)
    assert type(back) is type(params) and [t.name for t in back] == [t.name for t in params]
    for a, b in zip(params, back):
        assert torch.equal(a.tensor, b.tensor), a.name
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, logits)


def test_a_combined_set_saves_as_a_folder_of_its_parts_and_loads_back(tmp_path):
    model = _base()
    parts = [BUILDERS[k](model) for k in ("lora", "scales", "dense")]
    params = qzo.combine(*parts)
    logits = _trained(params, model)
    folder = params.save(tmp_path / "values")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILE_NAMES.values())
    fresh = _base()
    back = load(fresh, folder)
    assert [type(p) for p in back.parts] == [type(p) for p in parts]
    assert back.state_dict().keys() == params.state_dict().keys()
    for name, value in params.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, logits)


def test_what_cannot_be_saved_or_loaded_is_named(tmp_path):
    model = _base()
    with pytest.raises(TargetError, match="not a kind qzo can save"):
        save(qzo.ParamSet([("w", torch.zeros(3))]), tmp_path / "w")
    assert not (tmp_path / "w").exists()
    with pytest.raises(TargetError, match="does not exist"):
        load(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetError, match="holds none of"):
        load(model, tmp_path / "empty")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(TargetError, match="does not say what it holds"):
        load(model, tmp_path / "bare.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TargetError, match="not a safetensors file"):
        load(model, tmp_path / "junk.safetensors")
    two = qzo.combine(qzo.scales(model, modules=["model.layers.0.*"]), qzo.scales(model, modules=["model.layers.1.*"]))
    with pytest.raises(TargetError, match="more than one scales part"):
        two.save(tmp_path / "two")


def test_the_former_module_paths_are_the_same_modules():
    import qzo.models.bnb
    import qzo.targets.dense
    import qzo.targets.lora
    import qzo.targets.scales
    from qzo.models.bnb import choose_cpu_path
    from qzo.targets.dense import DenseParams
    from qzo.targets.lora import LoraParams
    from qzo.targets.scales import ScaleParams

    assert choose_cpu_path is qzo.models.bnb.choose_cpu_path
    assert (LoraParams, ScaleParams, DenseParams) == (qzo.targets.lora.LoraParams, qzo.targets.scales.ScaleParams,
                                                      qzo.targets.dense.DenseParams)
    assert (qzo.lora, qzo.scales, qzo.dense) == (qzo.targets.lora.lora, qzo.targets.scales.scales,
                                                 qzo.targets.dense.dense)
    from qzo.zo.rules.dense_grad import DenseRule  # the rules' module before it became rules/dense_grad.py

    assert DenseRule is qzo.zo.rules.DenseRule
