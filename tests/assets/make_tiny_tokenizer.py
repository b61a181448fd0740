"""Write ``tests/assets/tiny-tokenizer/``: a 512-token byte-level BPE with SmolLM2's ChatML chat template.

What the unit tests tokenize with instead of the demo model's 49,152-token tokenizer: the same
kind (GPT-2 style byte-level BPE, ``<|im_start|>`` / ``<|im_end|>`` / ``<|endoftext|>``
specials, the same chat template), so chat formatting, label masking and generation behave
alike, but a tiny Llama's embedding and LM head shrink 96x and no GGUF has to be converted.
Byte-level, so any text encodes (rare characters as bytes). Trained on the shipped demo
chats, rendered through the template, plus a few plain sentences; deterministic, and
checked in (a few KB) so the suite needs no training step. Regenerate with
``python tests/assets/make_tiny_tokenizer.py`` (the tests check what they rely on).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "tiny-tokenizer"
VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
         "Code 0? CODE", "ANSWER: 4\nWHY: 2 plus 2 is 4.\n#qzo", "What is the capital of France? Paris."]


def corpus() -> list[str]:
    """The demo chats as the template renders them, and a few plain sentences."""
    from jinja2 import Template

    template = Template(CHAT_TEMPLATE)
    root = HERE.parents[1] / "qzo" / "data" / "assets"
    chats = [json.loads(line)["messages"] for name in ("demo_train.jsonl", "demo_eval.jsonl")
             for line in (root / name).read_text().splitlines() if line.strip()]
    return [template.render(messages=c, add_generation_prompt=False) for c in chats] + TEXTS * 4


def build():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                                          show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


if __name__ == "__main__":
    tok = build()
    tok.save_pretrained(OUT)
    print(f"wrote {OUT} ({len(tok)} tokens): {sorted(p.name for p in OUT.iterdir())}")
