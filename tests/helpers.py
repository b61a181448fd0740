"""Helpers the tests share (imported as ``from helpers import ...``; fixtures live in ``conftest.py``).

A tiny Llama config, the fused-CPU-kernel check and its skip mark, a chat file a few steps
learn, and the overrides of a short tiny-model run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: the checked-in tiny tokenizer (tests/assets/make_tiny_tokenizer.py): 512 tokens, SmolLM2's chat template
TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny-tokenizer"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def tiny_config(vocab_size: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, **TINY)


def fused_cpu_4bit() -> bool:
    """Whether this CPU (and ``QZO_CPU_4BIT``) runs bitsandbytes' fused AVX512-BF16 4-bit kernel."""
    from qzo.models.bnb import fused_cpu_4bit_available

    return fused_cpu_4bit_available()


needs_fused_cpu_4bit = pytest.mark.skipif(not fused_cpu_4bit(), reason="this CPU has no AVX512-BF16 (or "
                                          "QZO_CPU_4BIT=plain): bitsandbytes' fused 4-bit kernel cannot run")


def write_code_chats(folder) -> Path:
    """``folder/chats.jsonl``: 8 one-turn chats whose assistant always replies ``CODE`` (a task a few steps learn)."""
    import json

    rows = [{"messages": [{"role": "user", "content": f"Code {i}?"}, {"role": "assistant", "content": "CODE"}]}
            for i in range(8)]
    path = Path(folder) / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def numbered_code_chats(n: int = 8) -> list[dict]:
    """``n`` chats "Say the code i." -> "CODE i CODE": a task four steps of the tiny model learn a little of."""
    return [{"messages": [{"role": "user", "content": f"Say the code {i}."},
                          {"role": "assistant", "content": f"CODE {i} CODE"}]} for i in range(n)]


#: a short LoRA run of the tiny model whose held-out loss falls (lr 0.1: 5e-2 raised it by 0.01), checkpoints at 2, 4
SHORT_RUN = {"train.steps": 4, "train.eval_every": 2, "train.save_every": 2, "optim.lr": 0.1}


def run_overrides(model_dir, data, out_dir, **extra) -> list[str]:
    """``--set`` overrides of a short run of the tiny model on ``data``; ``extra`` (dotted keys) wins.

    Shared by the trainer, eval, plot and objective tests, which pass what they vary. It starts from the
    demo recipe (what ``train(None, ...)`` and ``qzo train --set ...`` start from), with plain MeZO noise
    on every trainable (the demo's B-only noise scale names LoRA tensors a scales or dense run lacks).
    """
    base = {
        "model.source": str(model_dir), "model.quant": "nf4", "lora.r": 4, "optim.noise_scale": "null",
        "data.train": str(data), "data.eval": str(data), "optim.lr": 5e-2, "optim.eps": 1e-2,
        "train.steps": 6, "train.batch_size": 4, "train.max_len": 48, "train.eval_every": 3,
        "train.save_every": 3, "train.seed": 1, "out_dir": str(out_dir),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
