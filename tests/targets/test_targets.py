"""Trainable targets besides LoRA: quantization scales (qzo.scales), dense slices (qzo.dense), combine.

Every model is a real tiny Llama quantized by bitsandbytes on CPU (no mocks), loaded on
bitsandbytes' plain CPU path (``cpu_fused_4bit=False``) on every kind of CPU: these tests
check trained values against that quantized forward exactly, and ``qzo train`` runs scales
and dense slices on it. The fused AVX512-BF16 path has its own tests (test_cpu_paths.py);
where a target meets a repacked layer, the repacking is applied with bitsandbytes' own
function (``_convert_weight_packed_for_cpu``), which runs on any CPU.
"""

import pytest
import torch

import qzo
from qzo.targets.dense import dense, load_dense
from qzo.targets.scales import clip_grad, load_scales, scales
from qzo.targets import TargetError, combine

from helpers import tiny_config

# (quant, double_quant) of every scale layout: 4-bit float32 absmax, nested absmax, int8 SCB
LAYOUTS = [("nf4", False), ("fp4", False), ("nf4", True), ("int8", False)]
LAYOUT_IDS = ["nf4", "fp4", "nf4-dq", "int8"]
# (name, out_features, in_features) of the tiny Llama's quantized layers, per block
LAYERS = [("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 32, 64), ("self_attn.v_proj", 32, 64),
          ("self_attn.o_proj", 64, 64), ("mlp.gate_proj", 128, 64), ("mlp.up_proj", 128, 64),
          ("mlp.down_proj", 64, 128)]
IDS = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))



def _load(quant, double_quant=False, vocab=1000, **kw):
    kw.setdefault("cpu_fused_4bit", False)
    model, _ = qzo.load(tiny_config(vocab), quant=quant, double_quant=double_quant, seed=0, **kw)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _zo_run(model, params, batch, strategy, rule, steps=15, eps=1e-3):
    loss = lambda: model(**batch).loss  # noqa: E731
    with torch.no_grad():
        start = float(loss())
    opt = qzo.ZO(params, strategy=strategy, rule=rule, eps=eps, seed=0)
    for _ in range(steps):
        opt.step(loss)
    with torch.no_grad():
        return start, float(loss())


def _pack_like_fused_cpu_forward(model):
    """What bitsandbytes' first no-grad forward does to each 4-bit layer on an AVX512-BF16 CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
            w = module.weight
            if not getattr(w.quant_state, "packing_format_for_cpu", False):
                w.data, w.quant_state = _convert_weight_packed_for_cpu(w.data, w.quant_state)


# ---------------------------------------------------------------- scales


@pytest.mark.parametrize("quant,double_quant", LAYOUTS, ids=LAYOUT_IDS)
def test_scales_layout_exact_outputs_and_effect(quant, double_quant):
    # reference: the same weights on bitsandbytes' plain path, nested scales left as they are
    want = _logits(_load(quant, double_quant))
    model = _load(quant, double_quant)
    params = scales(model)
    suffix = "SCB" if quant == "int8" else "absmax"
    expected = {f"model.layers.{i}.{name}.weight.{suffix}": (out if quant == "int8" else out * inp // 64,)
                for i in range(2) for name, out, inp in LAYERS}
    assert {t.name: tuple(t.tensor.shape) for t in params} == expected
    assert all(t.tensor.dtype == torch.float32 and t.tensor.is_contiguous() for t in params)
    if quant != "int8":  # nested scales were swapped for a float32 master; no layer may take the fused path
        layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert all(not m.weight.quant_state.nested and not m.support_avx512bf16_for_cpu for m in layers)
    before = _logits(model)
    torch.testing.assert_close(before, want, rtol=1e-6, atol=1e-6)  # the swap changes nothing but rounding
    with torch.no_grad():
        params.items[3].tensor[:4] *= 1.05  # a few scales of one layer
    assert (_logits(model) - before).abs().max() > 1e-4
    with torch.no_grad():
        params.items[3].tensor[:4] /= 1.05
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant,double_quant", LAYOUTS, ids=LAYOUT_IDS)
def test_scales_spsa_sgd_lowers_loss(quant, double_quant, tiny_tokenizer, tiny_batch):
    model = _load(quant, double_quant, vocab=len(tiny_tokenizer))
    start, end = _zo_run(model, scales(model), tiny_batch, qzo.SPSA(), qzo.SGD(lr=0.1))
    assert end < start - 0.03, (start, end)


def test_scales_gv_adam_lowers_loss(tiny_tokenizer, tiny_batch):
    model = _load("nf4", vocab=len(tiny_tokenizer))
    start, end = _zo_run(model, scales(model), tiny_batch, qzo.GV(pool=2), qzo.Adam(lr=1e-2), steps=10)
    assert end < start - 0.03, (start, end)


@pytest.mark.parametrize("quant,double_quant", [("nf4", True), ("int8", False)], ids=["nf4-dq", "int8"])
def test_scales_checkpoint_round_trip_onto_fresh_model(quant, double_quant, tmp_path):
    model = _load(quant, double_quant)
    params = scales(model, ["model.layers.1.*", "model.layers.0.self_attn.q_proj"], clip=100.0)
    assert len(params) == 8 and params.clip == 100.0
    with torch.no_grad():
        for t in params:
            t.tensor.mul_(1 + 0.1 * torch.randn_like(t.tensor))
    want = _logits(model)
    path = params.save(tmp_path / "scales.safetensors")

    fresh = _load(quant, double_quant)
    assert (_logits(fresh) - want).abs().max() > 1e-4  # the trained scales matter
    loaded = load_scales(fresh, path)
    assert [t.name for t in loaded] == [t.name for t in params]
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=0)

    again = params.apply_to(_load(quant, double_quant))
    torch.testing.assert_close(_logits(again.model), want, rtol=0, atol=0)


def test_scales_of_a_repacked_fused_cpu_layer_are_unpacked_and_take_effect():
    # On AVX512-BF16 CPUs qzo.load(cpu_fused_4bit=True) repacks 4-bit layers and bitsandbytes
    # copies absmax into a bf16 transposed tensor the fused kernel reads; trained scales
    # would have no effect unless the layer is unpacked.
    for double_quant in (False, True):
        model = _load("nf4", double_quant)
        want = _logits(model)
        _pack_like_fused_cpu_forward(model)
        params = scales(model, ["model.layers.0.*"])
        layer = model.model.layers[0].self_attn.q_proj
        state = layer.weight.quant_state
        assert not layer.support_avx512bf16_for_cpu and not state.packing_format_for_cpu and not state.nested
        assert state.absmax is params.items[0].tensor and state.absmax.shape == (64,)
        dense(model, ["model.layers.1.*_proj"])  # dense slices unpack too
        got = _logits(model)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # the fused copy kept bf16 scales
        with torch.no_grad():
            params.items[0].tensor.mul_(1.1)
        assert (_logits(model) - got).abs().max() > 1e-4


def test_clip_grad():
    assert clip_grad(250.0, 100.0) == 100.0 and clip_grad(-250.0, 100.0) == -100.0
    assert clip_grad(3.5, 100.0) == 3.5 and clip_grad(1e9, None) == 1e9
    assert clip_grad(float("nan"), 100.0) != clip_grad(float("nan"), 100.0)  # NaN stays NaN
    with pytest.raises(qzo.QzoError, match="clip must be > 0"):
        clip_grad(1.0, 0.0)


# ---------------------------------------------------------------- dense


@pytest.mark.parametrize("quant,dtype,tol", [("nf4", "float32", 1e-5), ("fp4", "float32", 1e-5),
                                             ("int8", "float32", 2e-2), ("nf4", "bfloat16", 2e-2)])
def test_dense_slices_match_the_quantized_forward(quant, dtype, tol):
    # int8 quantizes activations too (the dense slice does not), bf16 computes in bf16
    model = _load(quant, dtype=dtype)
    want = _logits(model)
    params = dense(model, ["model.layers.0.self_attn.q_proj", "model.norm"])
    assert [t.name for t in params] == ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    assert all(t.tensor.dtype == torch.float32 for t in params)
    layers = model.model.layers
    assert type(layers[0].self_attn.q_proj) is torch.nn.Linear
    assert layers[0].self_attn.q_proj.weight.data_ptr() == params.items[0].tensor.data_ptr()
    quantized = "Linear8bitLt" if quant == "int8" else "Linear4bit"
    rest = [layers[0].self_attn.k_proj, layers[0].mlp.down_proj, layers[1].self_attn.q_proj]
    assert all(type(m).__name__ == quantized for m in rest)
    got = _logits(model)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    with torch.no_grad():
        params.items[1].tensor.mul_(0.5)
    assert (_logits(model).float() - got.float()).abs().max() > 1e-3


def test_dense_tied_lm_head_in_bf16_keeps_the_model_in_bf16():
    model = _load("nf4", dtype="bfloat16")
    want = _logits(model)
    params = dense(model, ["lm_head", "model.embed_tokens"])  # one tied tensor: trained once
    assert [t.name for t in params] == ["model.embed_tokens.weight"]
    assert params.items[0].tensor.dtype == torch.float32
    assert model.model.embed_tokens(IDS).dtype == torch.bfloat16
    torch.testing.assert_close(_logits(model), want, rtol=2e-2, atol=2e-2)


def test_dense_spsa_lowers_loss_and_round_trips(tiny_tokenizer, tiny_batch, tmp_path):
    model = _load("nf4", vocab=len(tiny_tokenizer))
    params = dense(model, ["model.layers.0.self_attn.q_proj", "model.norm"])
    start, end = _zo_run(model, params, tiny_batch, qzo.SPSA(), qzo.SGD(lr=1.0))
    assert end < start - 0.02, (start, end)
    want = _logits(model)
    fresh = _load("nf4", vocab=len(tiny_tokenizer))
    load_dense(fresh, params.save(tmp_path / "dense.safetensors"))
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=0)


# ---------------------------------------------------------------- combine


def test_lora_scales_and_dense_in_one_zo_step(tiny_batch, tiny_tokenizer):
    model = _load("nf4", vocab=len(tiny_tokenizer))
    lora = qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"])
    want = _logits(model)
    # layers LoRA wraps, reached through the PeftModel: names drop base_model.model. and base_layer
    sc = scales(lora.peft_model, ["v_proj"], clip=100.0)
    dn = dense(model, ["model.layers.0.self_attn.q_proj", "model.norm"])
    assert [t.name for t in sc] == [f"model.layers.{i}.self_attn.v_proj.weight.absmax" for i in range(2)]
    assert [t.name for t in dn] == ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    assert type(model.model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    everything = combine(lora, sc, dn)
    assert len(everything) == len(lora) + 4 and everything.clip == 100.0 and everything.parts == [lora, sc, dn]
    assert len(qzo.ParamSet([*lora, *sc, *dn])) == len(everything)  # plain ParamSet works as well
    before = everything.state_dict()
    opt = qzo.ZO(everything, strategy=qzo.SPSA(), rule=qzo.SGD(lr=0.1), eps=1e-3)
    opt.step(lambda: model(**tiny_batch).loss)
    after = everything.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert {"model.norm.weight", "model.layers.0.self_attn.v_proj.weight.absmax"} <= moved
    assert any("lora_B" in n for n in moved)


def test_combine_rejects_duplicates():
    model = _load("nf4")
    a = scales(model, ["model.layers.0.self_attn.q_proj"])
    b = scales(model, ["q_proj"])
    with pytest.raises(TargetError, match=r"'model.layers.0.self_attn.q_proj.weight.absmax' is in both part 0"):
        combine(a, b)
    tied = dense(model, ["lm_head"])
    emb = dense(model, ["model.embed_tokens"])
    with pytest.raises(TargetError, match="shares memory with 'lm_head.weight'"):
        combine(tied, emb)
    with pytest.raises(TargetError, match="already trained"):
        dense(model, ["model.layers.0.self_attn.q_proj"])


# ---------------------------------------------------------------- bad input


def test_patterns_matching_nothing_name_what_exists():
    model = _load("int8")
    listing = r"here: model\.layers\.\*\.self_attn\.q_proj, .*model\.layers\.\*\.mlp\.down_proj$"
    with pytest.raises(TargetError, match=r"\['qkv_proj'\] match no quantized linear.*" + listing):
        scales(model, ["q_proj", "qkv_proj"])
    listing = r"here: model\.embed_tokens, .*model\.layers\.\*\.input_layernorm, .*model\.norm, lm_head$"
    with pytest.raises(TargetError, match=r"\['model.final_norm'\] match no parameter-holding.*" + listing):
        dense(model, ["model.norm", "model.final_norm"])
    with pytest.raises(TargetError, match="needs modules="):
        dense(model, None)
    with pytest.raises(TargetError, match="modules is empty"):
        scales(model, [])
    with pytest.raises(qzo.QzoError, match="clip must be > 0"):
        scales(model, clip=-1)


def test_scales_need_a_quantized_model(tmp_path):
    model = _load("none")
    with pytest.raises(TargetError, match="no quantized linear.*quant='nf4'"):
        scales(model)
    with pytest.raises(TargetError, match="not scale names"):
        load_scales(_load("nf4"), {"model.norm.weight": torch.ones(64)})
    with pytest.raises(TargetError, match="does not exist"):
        load_scales(model, tmp_path / "missing.safetensors")
    int8 = scales(_load("int8"), ["model.layers.0.self_attn.q_proj"])
    with pytest.raises(TargetError, match="quantization it was trained on"):
        load_scales(_load("nf4"), int8.state_dict())
