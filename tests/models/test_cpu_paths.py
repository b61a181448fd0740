"""bitsandbytes' two CPU 4-bit paths, chosen once at load (qzo.models.bnb).

Every test states the path it checks. The plain path runs on every CPU; the fused
AVX512-BF16 path only where the CPU has the extension (its tests skip elsewhere, and under
``QZO_CPU_4BIT=plain``, which is how the suite runs the other kind of CPU here).
"""

import pytest
import torch
from transformers import LlamaConfig

import qzo
from qzo.models import bnb

from helpers import TINY, needs_fused_cpu_4bit, tiny_config

IDS = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
#: bf16 keeps 8 significant bits (unit roundoff 2**-9); the fused kernel rounds activations
#: and block scales to it, so logits move by a few units of it: measured 3.3e-3 (relative
#: norm) on this tiny Llama for nf4 and fp4. The bound is 4 bf16 ulps.
FUSED_RELATIVE_ERROR = 2**-6


def _layers(model):
    return [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]


def _two_forwards(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_fused_cpu_4bit)], ids=["plain", "fused"])
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_first_and_second_forward_are_identical(quant, fused):
    # bitsandbytes alone repacks a layer inside its first forward: the first forward then ran
    # another kernel than every later one (the bug this guards against)
    model, _ = qzo.load(tiny_config(1000), quant=quant, cpu_fused_4bit=fused)
    first, second = _two_forwards(model)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_plain_path_is_fixed_at_load():
    model, _ = qzo.load(tiny_config(1000), quant="nf4", cpu_fused_4bit=False)
    layers = _layers(model)
    assert layers and not any(m.support_avx512bf16_for_cpu or bnb.is_packed(m) for m in layers)
    _two_forwards(model)
    assert not any(bnb.is_packed(m) for m in layers)  # no forward repacks anything later


@needs_fused_cpu_4bit
def test_fused_path_repacks_every_layer_at_load():
    model, _ = qzo.load(tiny_config(1000), quant="nf4", cpu_fused_4bit=True)
    assert all(m.support_avx512bf16_for_cpu and bnb.is_packed(m) for m in _layers(model))


@needs_fused_cpu_4bit
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_fused_path_agrees_with_the_plain_one_to_bf16_precision(quant):
    logits = {}
    for fused in (True, False):
        model, _ = qzo.load(tiny_config(1000), quant=quant, cpu_fused_4bit=fused)
        logits[fused] = _two_forwards(model)[0]
    rel = ((logits[True] - logits[False]).norm() / logits[False].norm()).item()
    assert 0 < rel <= FUSED_RELATIVE_ERROR, rel  # 0 would mean the fused kernel never ran


@needs_fused_cpu_4bit
def test_layers_the_fused_kernel_cannot_take_stay_plain():
    # bitsandbytes' repacking needs outputs in 32-row tiles and inputs in whole 64-value
    # scale blocks: an intermediate size of 80 fails both for gate/up_proj (80 outputs) and
    # down_proj (80 inputs); the attention layers (64 and 32 outputs, 64 inputs) are repacked
    config = LlamaConfig(vocab_size=1000, **{**TINY, "intermediate_size": 80})
    model, _ = qzo.load(config, quant="nf4", cpu_fused_4bit=True)
    packed = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if bnb.is_packed(m)}
    plain = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if hasattr(m, "support_avx512bf16_for_cpu") and not m.support_avx512bf16_for_cpu}
    assert packed == {"q_proj", "k_proj", "v_proj", "o_proj"} and plain == {"gate_proj", "up_proj", "down_proj"}
    first, second = _two_forwards(model)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@needs_fused_cpu_4bit
def test_fused_path_in_float32_is_announced_once(capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["qzo.models.load"], "_announced_cpu_path", False)
    qzo.load(tiny_config(1000), quant="nf4", dtype="float32", cpu_fused_4bit=True)
    qzo.load(tiny_config(1000), quant="nf4", dtype="float32", cpu_fused_4bit=True)
    said = [line for line in capsys.readouterr().out.splitlines() if "fused AVX512-BF16" in line]
    assert len(said) == 1 and "bfloat16" in said[0] and "cpu_fused_4bit: false" in said[0]


def test_plain_environment_switch_turns_the_fused_path_off(monkeypatch):
    monkeypatch.setenv(bnb.PLAIN_ENV, "plain")
    assert not bnb.fused_cpu_4bit_available()
    model, _ = qzo.load(tiny_config(1000), quant="nf4", cpu_fused_4bit=True)
    assert not any(m.support_avx512bf16_for_cpu or bnb.is_packed(m) for m in _layers(model))


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_fused_cpu_4bit)], ids=["plain", "fused"])
def test_state_dict_leaves_the_live_quantized_model_unchanged(fused):
    # bitsandbytes 0.50 un-packs a repacked layer inside state_dict() and leaves its scales
    # transposed; qzo.models.bnb restores the packed state after each call
    model, _ = qzo.load(tiny_config(1000), quant="nf4", cpu_fused_4bit=fused)
    before, _ = _two_forwards(model)
    model.state_dict()
    after, _ = _two_forwards(model)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_hub_kernel_warning_is_kept_from_the_user():
    import logging

    record = logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 0,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s", ("x",), None)
    assert not logging.getLogger("bitsandbytes.backends.cpu.ops").filter(record)
