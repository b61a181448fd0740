"""Packing without cross-talk: a packed row's per-token losses are each example's losses alone.

A tiny random-init Llama (``helpers.tiny_config``, float32) with the real SmolLM2
tokenizer. Packed batches carry per-example ``position_ids`` and no 2D attention mask;
transformers turns the position resets into a block-diagonal causal mask. Checked on the
raw model (sdpa and eager attention), through ``qzo.CausalLMLoss`` (the labelled-logits
loss), through a batched FZOO pool on LoRA (the batch stacked per candidate) and
through ``eval_loss``.

Tolerance: the packed and the alone forwards run the same float32 ops on different
sequence lengths (other GEMM and softmax blockings); measured differences are up to 1e-6 on
per-token losses of ~10.8 (rows of 3 and 2 examples). ``ATOL = 1e-5`` leaves headroom and is 1000x below the
difference cross-talk makes (> 1e-2, asserted too).
"""

import pytest
import torch
import torch.nn.functional as F

import qzo
from qzo.data.loss import CausalLMLoss
from qzo.data.dataset import IGNORE, Batcher, ChatDataset, Example, collate, eval_loss

from helpers import tiny_config

ATOL = 1e-5
CHATS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2 plus 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 plus 3?"},
     {"role": "assistant", "content": "6, as before"}],
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
    [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "c-a-t"}],
]
TEXT = Example(text="Zeroth-order steps need forwards only.", where="text")  # every token trained


def _token_losses(logits, labels):
    """Per-position next-token cross entropy (``-100`` where nothing is trained): ``[B, T]``."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    out = F.cross_entropy(logits.float().transpose(1, 2), shifted.clamp_min(0), reduction="none")
    return out.masked_fill(shifted == IGNORE, float("nan"))


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    flat = ChatDataset.from_chats(tiny_tokenizer, [*CHATS, TEXT], max_len=128)
    packed = flat.pack(128)
    assert [len(s) for s in packed.segments] == [3, 2]  # rows really hold several examples
    return flat, packed


def _alone_and_packed(model, flat, packed, pad_id):
    """For every example: (its per-token losses alone, those at its place in the packed batch)."""
    batch = Batcher(packed, len(packed), seed=0, pad_id=pad_id).batch(1)
    order = Batcher(packed, len(packed), seed=0, pad_id=pad_id).indices(1)
    with torch.no_grad():
        packed_losses = _token_losses(model(**batch, use_cache=False).logits, batch["labels"])
        pairs, k = [], 0
        starts = {}
        for row in range(len(packed)):  # example k sits in row `row` at offset `at`
            at = 0
            for n in packed.segments[row]:
                starts[k] = (row, at, n)
                at += n
                k += 1
        for k, (x, y) in enumerate(zip(flat.input_ids, flat.labels)):
            row, at, n = starts[k]
            alone = _token_losses(model(input_ids=torch.tensor([x])).logits, torch.tensor([y]))[0]
            j = order.index(row)
            pairs.append((alone[:-1], packed_losses[j, at : at + n - 1]))  # the last position predicts nothing alone
    return batch, pairs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_token_losses_equal_each_example_alone(tiny_tokenizer, examples, attn):
    flat, packed = examples
    torch.manual_seed(0)
    model = __import__("transformers").AutoModelForCausalLM.from_config(
        tiny_config(len(tiny_tokenizer)), attn_implementation=attn).eval()
    batch, pairs = _alone_and_packed(model, flat, packed, tiny_tokenizer.pad_token_id)
    for alone, in_row in pairs:
        assert torch.equal(alone.isnan(), in_row.isnan())  # the same positions are trained
        torch.testing.assert_close(in_row, alone, atol=ATOL, rtol=0, equal_nan=True)
    # without position resets, a 2D mask lets later examples see earlier ones: a real difference
    leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"],
             "attention_mask": (batch["labels"] != -1).long()}
    with torch.no_grad():
        leak = _token_losses(model(**leaky, use_cache=False).logits, batch["labels"])
        clean = _token_losses(model(**batch, use_cache=False).logits, batch["labels"])
    assert (leak - clean).nan_to_num().abs().max() > 1e-2


@pytest.fixture(scope="module")
def tiny_lora(tiny_tokenizer):
    model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant="nf4", seed=0)
    params = qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=0)
    for t in params:  # B starts at 0 in LoRA; give both factors values
        t.tensor.add_(0.05 * qzo.noise.randn(99, t.stream, t.tensor.numel()).view_as(t.tensor))
    return model, params


def _weighted_alone(model, flat, pad_id):
    """The token-mean loss over all examples, each run alone in its own batch."""
    total, count = 0.0, 0
    for x, y in zip(flat.input_ids, flat.labels):
        one = collate([x], [y], pad_id)
        n = int((one["labels"][:, 1:] != IGNORE).sum())
        total += float(CausalLMLoss(model, one)()) * n
        count += n
    return total / count


def test_packed_batch_through_causal_lm_loss_pool_and_eval(tiny_tokenizer, examples, tiny_lora):
    flat, packed = examples
    model, params = tiny_lora
    pad = tiny_tokenizer.pad_token_id
    batch = Batcher(packed, len(packed), seed=0, pad_id=pad).batch(1)
    want = _weighted_alone(model, flat, pad)
    # CausalLMLoss (labelled logits only, LoRA on an NF4 base): the packed batch's loss is the examples' alone
    assert float(CausalLMLoss(model, batch)()) == pytest.approx(want, rel=ATOL)
    assert eval_loss(model, packed, 2, pad) == pytest.approx(want, rel=ATOL)
    assert eval_loss(model, flat, 2, pad) == pytest.approx(want, rel=ATOL)
    # a batched FZOO pool stacks the packed batch (position ids too) per candidate: the same losses as one by one
    theta = params.state_dict()
    records = {}
    for batched in (False, True):
        params.load_state_dict(theta)
        opt = qzo.ZO(params, strategy=qzo.FZOO(probes=2, batched=batched), rule=qzo.SGD(lr=1e-2), eps=1e-2, seed=3)
        opt.step(CausalLMLoss(model, batch))
        records[batched] = opt.last_record
    params.load_state_dict(theta)
    assert records[True].losses == pytest.approx(records[False].losses, rel=1e-5)
    assert max(records[False].losses) - min(records[False].losses) > 1e-4  # the probes really differ
    assert records[False].losses[0] == pytest.approx(want, rel=ATOL)  # FZOO's baseline f(theta) comes first


def test_a_packed_sharegpt_run_trains_end_to_end(tiny_model_dir, tmp_path):
    """The trainer's path: datasets_from_config -> Batcher -> CausalLMLoss (a batched FZOO pool) -> eval_loss."""
    import json

    from qzo.train.loop import train

    from helpers import run_overrides

    data = tmp_path / "sg.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Code {i}?"},
                                                          {"from": "gpt", "value": "CODE"}]}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    summary = train(None, run_overrides(tiny_model_dir, data, out, **{
        "data.format": "sharegpt", "data.packing": True, "data.chat_template": "chatml", "optim.strategy": "{name: fzoo, probes: 2}",
        "optim.batched": True, "train.steps": 2, "train.eval_every": 2, "train.save_every": 2,
        "train.batch_size": 2}), progress=False)
    assert summary["steps"] == 2 and 0 < summary["final_eval_loss"] < 20 and 0 < summary["initial_eval_loss"] < 20
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert all(len(s["losses"]) == 3 and all(v == v for v in s["losses"]) for s in steps)  # f(theta) + 2 probes
