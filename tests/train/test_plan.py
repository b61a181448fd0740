"""``qzo plan``: weight bytes against a real quantized model, the offload advice, bad input."""

import pytest
import torch

import qzo
from qzo.cli.main import main
from qzo.errors import QzoError
from qzo.train.plan import GiB, parse_size, plan

from helpers import tiny_config


def _measured_weight_bytes(model) -> int:
    """Parameters and buffers as stored, plus the bitsandbytes scales that live outside them."""
    import bitsandbytes as bnb

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point() and b.dim() > 0
                 and "rotary" not in str(b.shape))
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            s = m.weight.quant_state
            total += s.absmax.numel() * s.absmax.element_size()
            if s.nested:
                total += s.state2.absmax.numel() * s.state2.absmax.element_size()
        elif isinstance(m, bnb.nn.Linear8bitLt):
            scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
            total += scb.numel() * scb.element_size()
    return total


@pytest.mark.parametrize("quant,double_quant", [("nf4", False), ("nf4", True), ("int8", False), ("none", False)])
def test_weight_estimate_matches_a_real_quantized_model(quant, double_quant):
    cfg = tiny_config(vocab_size=1000)
    cfg.hidden_size, cfg.intermediate_size = 256, 512  # blocks of 64 divide evenly, as in real models
    model, _ = qzo.load(cfg, quant=quant, double_quant=double_quant, seed=0)
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[model.get_input_embeddings().weight.dtype]
    estimate = plan(cfg, quant=quant, double_quant=double_quant, dtype=dtype, lora_r=0).weights
    measured = _measured_weight_bytes(model)
    assert estimate == pytest.approx(measured, rel=0.02), (estimate, measured)


@pytest.mark.parametrize("rule,strategy", [("sgd", "spsa"), ("adam", "spsa"), ("momentum", "ldsd"), ("sign", "conmezo")])
def test_planned_trainables_and_state_are_what_peft_and_the_rules_build(rule, strategy):
    """The plan's LoRA bytes against the adapter peft puts on a Llama-2-7B (meta device: no memory), and its
    optimizer-state bytes against the state the rule and strategy allocate for those trainables."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qzo.train.plan import PRESETS
    from qzo.zo.rules import RULES
    from qzo.zo.strategies import STRATEGIES

    h, i, layers, heads, kv, vocab, tied = PRESETS["llama-2-7b"]
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
    with init_empty_weights():
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    p = plan("llama-2-7b", rule=rule, strategy=strategy, batch=8, seq=512)
    assert p.trainables == 4 * sum(t.numel() for _, t in lora)  # float32 values

    # the state for a small stand-in of the same layout: copies per trained value
    params = [(n, torch.zeros(2, 3)) for n, _ in lora[:4]]
    built = [RULES[rule](lr=1e-3), STRATEGIES[strategy]()]
    copies = 0
    for part in built:
        part.bind(qzo.zo.params.ParamSet(params))
        tensors = []
        torch.utils._pytree.tree_map(lambda x: tensors.append(x) if isinstance(x, torch.Tensor) else None,
                                     part.state_dict())
        copies += sum(t.numel() for t in tensors) / sum(t.numel() for _, t in params)
    assert p.state == copies * p.trainables


def test_activations_grow_linearly_in_the_stacked_pool_and_the_rows():
    acts = {k: plan("llama-2-7b", batch=8, seq=512, pool=k).activations for k in (1, 2, 4)}
    assert acts[4] - acts[1] == 3 * (acts[2] - acts[1]) > 0
    rows = {b: plan("llama-2-7b", batch=b, seq=512).activations for b in (2, 4, 8)}
    assert rows[8] - rows[2] == 3 * (rows[4] - rows[2]) > 0
    assert plan("llama-2-7b", pool=4).weights == plan("llama-2-7b", rule="adam").weights  # neither moves the weights


def test_gpus_say_what_more_ranks_buy_and_leave_memory_per_gpu_alone():
    one, four = plan("llama-2-7b"), plan("llama-2-7b", gpus=4, strategy="fzoo")
    assert four.total == plan("llama-2-7b", strategy="fzoo").total  # every rank holds a full copy
    text = "\n".join(four.notes)
    assert "4 GPUs" in text and "each rank holds a full copy" in text
    assert "a step's 5 forwards take the time of 2 instead of 5" in text  # f(theta) and 4 probes over 4 slots
    assert "each rank runs 2 of the 8 rows" in text
    assert not any("GPUs" in n for n in one.notes)
    with pytest.raises(QzoError, match="--gpus must be >= 1"):
        plan("llama-2-7b", gpus=0)


def test_offload_advice_when_it_does_not_fit():
    p = plan("llama-2-70b", gpu="20GiB")
    assert p.fits is False and 0 < p.gpu_layers() < 80
    assert p.gpu_total() <= p.budget < p.gpu_total() + p.streamed_layer  # as many layers as fit, no more
    # 4-bit layers stream their packed codes (qzo.models.streaming): half a byte a weight, the scales stay on the GPU;
    # two are in flight (one computing, one read ahead)
    codes = (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672) // 2
    assert p.stream_packed and p.streamed_layer == codes
    assert p.offloaded_bytes() == (80 - p.gpu_layers()) * codes
    assert p.gpu_total() == p.total - (80 - p.gpu_layers()) * codes + 2 * codes
    assert p.streaming_s_per_step() == 2 * p.offloaded_bytes() / 25e9  # SPSA: 2 forwards at PCIe 4.0 x16
    # int8 layers that do not fit still go unquantized (accelerate's offload): the whole bf16 layer
    int8 = plan("llama-2-70b", quant="int8", gpu="40GiB")
    assert not int8.stream_packed
    assert int8.streamed_layer == 2 * (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672 + 2 * 8192)
    # max_memory's GPU figure leaves the activations and the rest out of what weights may take
    assert int8.weights_allowance() == int8.budget - int8.activations - int8.workspace - int8.trainables - int8.state
    # streaming: accelerate's map must keep exactly gpu_layers() whole, counted as it counts them (codes + norms)
    resident = p.weights - 80 * p.per_layer + p.gpu_layers() * (codes + 2 * 8192 * 2)
    assert p.weights_allowance() == resident
    assert "max_memory: {0: '" in p.table()
    assert plan("llama-2-7b", gpu="24GiB").fits is True


def test_cli_prints_the_table_and_bad_input_is_one_line(capsys):
    assert main(["plan", "llama-2-7b", "--gpu", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "fits" in out
    assert main(["plan", "llama-2-70b", "--gpu", "1GiB"]) == 2
    assert "below what even full offload needs" in capsys.readouterr().err
    assert main(["plan", "/no/such/model"]) == 2


def test_a_hub_id_not_in_the_local_cache_is_one_line_saying_how_to_get_its_config(capsys):
    # read from the local Hugging Face cache only (never downloaded); the cached case runs in
    # test_examples (examples/offload_7b.py --plan-only, with a cache holding one config.json)
    with pytest.raises(QzoError, match=r"local Hugging Face cache.*hf download qzo-tests/not-a-model config.json"):
        plan("qzo-tests/not-a-model")
    assert main(["plan", "qzo-tests/not-a-model"]) == 2
    assert "hf download" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("8GiB") == 8 * GiB and parse_size("512MiB") == 512 * 2**20 and parse_size(1024) == 1024
    with pytest.raises(QzoError, match="8GiB"):
        parse_size("eight gigs")
