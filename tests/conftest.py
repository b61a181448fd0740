"""Shared fixtures: a tiny Llama built from a config (random init) with a tiny checked-in tokenizer.

Helpers that are not fixtures (tiny_config, run_overrides, ...) live in ``helpers.py``.

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

# The suite's thread count, set once here for this process and, through the environment, for every process a
# test starts (CLI runs, examples, benchmarks' smoke runs, torch.distributed ranks): one. Its models are tiny,
# where OpenMP's spinning threads cost more than they give on a shared 2-core machine (a tiny-model step took
# 0.5 s with two threads and 0.005 s with one, measured under load), and the README's `pytest -n 2` runs two
# test processes, one a core. A value set outside (OMP_NUM_THREADS=2 pytest ...) is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qzo.models.bnb import plain_path_forced  # noqa: E402

from helpers import TINY_TOKENIZER, tiny_config, write_code_chats  # noqa: E402

if plain_path_forced():
    import bitsandbytes.nn.modules

    bitsandbytes.nn.modules.has_avx512bf16 = lambda: False  # what a CPU without AVX512-BF16 answers


@pytest.fixture(scope="session")
def smol_folder():
    """The demo model converted once into qzo's cache (a plain HF folder with tokenizer)."""
    from qzo.models.load import hf_model_path

    return Path(hf_model_path("smollm2-135m"))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    """The demo model's own tokenizer (converting the GGUF once): for tests about the demo model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The checked-in 512-token byte-level BPE with SmolLM2's chat template (``tests/assets``): what unit tests
    tokenize with, so they need no converted model (``make_tiny_tokenizer.py`` says what it is)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random-init Llama folder (fixed seed) with the tiny tokenizer and its chat template."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tiny_tokenizer)))
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def untied_tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """``tiny_model_dir``'s Llama with an output head of its own. Tied to the input embedding, a random-init model's
    greedy reply repeats the prompt's last token (the chat template's newline: a reply with no letter in it), so
    tests that read replies (exported answers, reply-length rewards) use this one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from helpers import TINY

    folder = tmp_path_factory.mktemp("tiny-llama-untied")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), **{**TINY, "tie_word_embeddings": False})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lora_run(tiny_model_dir, tmp_path_factory):
    """One short LoRA run of the tiny Llama (:data:`helpers.SHORT_RUN` on :func:`helpers.numbered_code_chats`),
    shared by the tests that only read a finished run (eval, export): they evaluate or export it and write
    beside it (``eval.json``, ``export-*``), and none trains it further."""
    import json

    from qzo.train.loop import train

    from helpers import SHORT_RUN, numbered_code_chats, run_overrides

    root = tmp_path_factory.mktemp("tiny-lora-run")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in numbered_code_chats()))
    train(None, run_overrides(tiny_model_dir, data, root / "run", **SHORT_RUN), log=lambda *_: None, progress=False)
    return root / "run"


@pytest.fixture
def tiny_batch(tiny_tokenizer):
    from qzo.data.dataset import ChatDataset, collate

    chats = [
        [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "ANSWER: 4\n#qzo"}],
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "ANSWER: Paris\n#qzo"}],
    ]
    ds = ChatDataset.from_chats(tiny_tokenizer, chats, max_len=64)
    return collate(ds.input_ids, ds.labels, tiny_tokenizer.pad_token_id)


@pytest.fixture
def code_chats(tmp_path) -> Path:
    """:func:`write_code_chats` in the test's temporary folder."""
    return write_code_chats(tmp_path)
