"""What the tests of ``qzo.hf`` share (imported as ``from hf_setup import ...``; the fixtures are the suite's own).

The tiny Llama of ``tiny_model_dir`` with LoRA on q and v, the numbered-code chats tokenized for a plain
``Trainer`` (and the collator that pads them), and ``TrainingArguments`` for a CPU run that reports nowhere.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import qzo
from qzo.data.dataset import ChatDataset, collate

from helpers import numbered_code_chats

#: 16 chats "Say the code i." -> "CODE i CODE": the first 12 train, the last 4 are held out
CHATS = numbered_code_chats(16)


def lora_model(model_dir, quant: str | None = None):
    """A fresh ``qzo.lora`` (r 4 on q, v) on the tiny Llama: float32, or loaded 4-bit by ``qzo.load``."""
    if quant is None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    else:
        model, _ = qzo.load(str(model_dir), quant=quant)
    return qzo.lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def token_rows(tok, chats=CHATS[:12]) -> list[dict]:
    """Chats as ``{"input_ids", "labels"}`` rows (labels on the assistant turn only), what a plain Trainer reads."""
    data = ChatDataset.from_chats(tok, [c["messages"] for c in chats], max_len=48)
    return [{"input_ids": ids, "labels": labels} for ids, labels in zip(data.input_ids, data.labels)]


class Collate:
    """Right-pads a list of rows into a batch (``qzo.data.dataset.collate``)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate([r["input_ids"] for r in rows], [r["labels"] for r in rows], self.pad_id)


def train_args(out_dir, **overrides) -> TrainingArguments:
    """Arguments of a short CPU run: 4 steps of 4 rows, constant lr 0.05, a log line every step, no reporting."""
    settings = dict(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=0.05,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                    seed=1, remove_unused_columns=False, disable_tqdm=True)
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainingArguments(**settings)


def values(params) -> dict[str, torch.Tensor]:
    """The trained tensors by name, copied."""
    return params.state_dict()
