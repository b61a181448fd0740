"""Shared fixtures: a tiny Llama built from a config (random init) with the real SmolLM2 tokenizer.

Kernel tests run through the Triton interpreter on machines without a GPU; the variable
must be set before triton decorates any kernel, hence here.

Two kinds of CPU run the suite: with AVX512-BF16 (bitsandbytes' fused bf16 4-bit kernel)
and without. ``QZO_CPU_4BIT=plain pytest`` runs the second kind on a machine of the first:
qzo then loads every model on the plain path, and bitsandbytes' own capability check is
answered "no" for every layer made outside ``qzo.load`` too (transformers loading an
exported folder, say). Tests that are about the fused kernel skip on a CPU that lacks it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qzo.bnb import plain_path_forced  # noqa: E402

if plain_path_forced():
    import bitsandbytes.nn.modules

    bitsandbytes.nn.modules.has_avx512bf16 = lambda: False  # what a CPU without AVX512-BF16 answers

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def tiny_config(vocab_size: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, **TINY)


def fused_cpu_4bit() -> bool:
    """Whether this CPU (and ``QZO_CPU_4BIT``) runs bitsandbytes' fused AVX512-BF16 4-bit kernel."""
    from qzo.bnb import fused_cpu_4bit_available

    return fused_cpu_4bit_available()


needs_fused_cpu_4bit = pytest.mark.skipif(not fused_cpu_4bit(), reason="this CPU has no AVX512-BF16 (or "
                                          "QZO_CPU_4BIT=plain): bitsandbytes' fused 4-bit kernel cannot run")


@pytest.fixture(scope="session")
def smol_folder():
    """The demo model converted once into qzo's cache (a plain HF folder with tokenizer)."""
    from qzo.load import hf_model_path

    return Path(hf_model_path("smollm2-135m"))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random-init Llama folder (fixed seed) with the SmolLM2 tokenizer and chat template."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(len(smol_tokenizer)))
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_batch(smol_tokenizer):
    from qzo.data import ChatDataset, collate

    chats = [
        [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "ANSWER: 4\n#qzo"}],
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "ANSWER: Paris\n#qzo"}],
    ]
    ds = ChatDataset.from_chats(smol_tokenizer, chats, max_len=64)
    return collate(ds.input_ids, ds.labels, smol_tokenizer.pad_token_id)


def write_code_chats(folder) -> Path:
    """``folder/chats.jsonl``: 8 one-turn chats whose assistant always replies ``CODE`` (a task a few steps learn)."""
    import json

    rows = [{"messages": [{"role": "user", "content": f"Code {i}?"}, {"role": "assistant", "content": "CODE"}]}
            for i in range(8)]
    path = Path(folder) / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def code_chats(tmp_path) -> Path:
    """:func:`write_code_chats` in the test's temporary folder."""
    return write_code_chats(tmp_path)


def run_overrides(model_dir, data, out_dir, **extra) -> list[str]:
    """``--set`` overrides of a short run of the tiny model on ``data``; ``extra`` (dotted keys) wins.

    Shared by the trainer, eval, plot and objective tests, which pass what they vary.
    """
    base = {
        "model.source": str(model_dir), "model.quant": "nf4", "lora.r": 4,
        "data.train": str(data), "data.eval": str(data), "optim.lr": 5e-2, "optim.eps": 1e-2,
        "train.steps": 6, "train.batch_size": 4, "train.max_len": 48, "train.eval_every": 3,
        "train.save_every": 3, "train.seed": 1, "out_dir": str(out_dir),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
