"""qzo.data.loss: the loss from labelled positions only, in chunks, equals the model's own loss."""

import pytest
import torch

import qzo
from qzo.data.loss import chunk_tokens, decoder_and_head, labelled_loss


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir):
    full, _ = qzo.load(tiny_model_dir, "none")
    nf4, _ = qzo.load(tiny_model_dir, "nf4")
    return {"float32": full, "nf4": nf4}


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    labels[mask == 0] = -100
    labels[2, 10:14] = -100  # a gap inside a reply
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["float32", "nf4"])
@pytest.mark.parametrize("chunk_bytes", [1, 10 * 49152 * 7, 2**30])  # one token a chunk, 7 (a ragged end), all
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_models_own_loss(tiny_models, kind, chunk_bytes, seed):
    model = tiny_models[kind]
    batch = _batch(model.config.vocab_size, seed)
    with torch.no_grad():
        expected = model(**batch).loss
        got = labelled_loss(model, batch, chunk_bytes)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)


def test_head_runs_on_labelled_positions_only(tiny_models):
    model = tiny_models["float32"]
    batch = _batch(model.config.vocab_size)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            labelled_loss(model, batch, chunk_bytes=10 * model.config.vocab_size * 8)  # 8 tokens a chunk
    finally:
        handle.remove()
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    assert sum(seen) == int((shifted != -100).sum()) and max(seen) == 8
    assert chunk_tokens(128256) == 209  # 256 MiB of logits + float32 copies for Llama-3's vocabulary


def test_lora_model_and_peft_wrapper_are_supported(tiny_model_dir):
    model, _ = qzo.load(tiny_model_dir, "nf4")
    params = qzo.lora(model, r=4)
    with torch.no_grad():
        for t in params:
            t.tensor.normal_(0, 0.05)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(**batch).loss
        torch.testing.assert_close(labelled_loss(model, batch), expected, rtol=2e-6, atol=0)
        torch.testing.assert_close(labelled_loss(params.peft_model, batch), expected, rtol=2e-6, atol=0)
        torch.testing.assert_close(qzo.CausalLMLoss(model, batch)(), expected, rtol=2e-6, atol=0)


def test_unsupported_architectures_fall_back_to_the_models_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).eval()
    batch = _batch(100)
    assert decoder_and_head(model) is None and labelled_loss(model, batch) is None
    with torch.no_grad():
        torch.testing.assert_close(qzo.CausalLMLoss(model, batch)(), model(**batch).loss)
