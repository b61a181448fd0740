"""``qzo chat`` never hangs (issue 32): bad settings are refused before the model loads, and an error inside the
generation thread ends the stream and reaches the caller, instead of leaving it waiting on the streamer forever.

Real subprocesses with a timeout: a regression fails the test instead of hanging the suite.
"""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("tokens", ["0", "-1"])
def test_max_new_tokens_below_one_is_refused_before_the_model_loads(tiny_model_dir, tokens):
    done = subprocess.run([sys.executable, "-m", "qzo", "chat", str(tiny_model_dir), "--prompt", "hi",
                           "--max-new-tokens", tokens], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --max-new-tokens must be a whole number >= 1 (the longest reply, in " \
                                  f"tokens), got {tokens}"


def test_a_seed_torch_cannot_take_is_refused_before_the_model_loads(tiny_model_dir):
    done = subprocess.run([sys.executable, "-m", "qzo", "chat", str(tiny_model_dir), "--prompt", "hi", "--seed",
                           str(2**70)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --seed must be a whole number in [-2**63, 2**64) (torch's seed range), got " \
                                  "a 71-bit number"


# A model whose vocabulary is smaller than its tokenizer's (a wrong tokenizer folder): the embedding lookup fails
# inside generate, in the generation thread, after every setting was valid.
GENERATION_FAILS = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from qzo.cli.chat import reply
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
try:
    reply(model, tok, [{"role": "user", "content": "hi"}], 4)
except IndexError as exc:
    print("raised here:", type(exc).__name__, flush=True)
"""


def test_an_error_in_the_generation_thread_reaches_the_caller():
    from helpers import TINY_TOKENIZER

    done = subprocess.run([sys.executable, "-c", GENERATION_FAILS, str(TINY_TOKENIZER)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "raised here: IndexError" in done.stdout


def test_reply_refuses_bad_lengths_from_python_too(tiny_model_dir):
    import qzo
    from qzo.cli.chat import reply
    from qzo.errors import QzoError

    model, tok = qzo.load(tiny_model_dir, quant="none")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(QzoError, match="--max-new-tokens must be a whole number >= 1"):
            reply(model, tok, [{"role": "user", "content": "hi"}], bad)
    with pytest.raises(QzoError, match="--seed must be a whole number"):
        reply(model, tok, [{"role": "user", "content": "hi"}], 4, seed=-2**64)
