"""Chat data: JSONL ``messages`` files -> token ids with loss only on assistant tokens -> batches.

Masking works on the rendered text, not on template internals: for each assistant turn the
chat template is rendered up to the turn (with the generation prompt) and through it; the
characters in between are the assistant's (content and end-of-turn marker), and a token
is trained on when its first character falls in such a span (fast-tokenizer offsets).
This works for any template in which earlier turns render the same whatever follows,
which is checked per example.

Batches are a pure function of ``(seed, step)``: the epoch permutation comes from a
generator seeded by ``(seed, epoch)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .noise import _mix64

__all__ = ["read_chat_jsonl", "encode_chat", "ChatDataset", "Batcher", "collate", "demo_data_path", "eval_loss"]

IGNORE = -100
_ROLES = ("system", "user", "assistant")


def demo_data_path(split: str) -> Path:
    """Path of the built-in demo chat data (``train`` or ``eval``), shipped inside qzo."""
    return Path(__file__).parent / "assets" / f"demo_{split}.jsonl"


def resolve_data_path(value: str) -> Path:
    """``builtin:demo_train`` style names map to the shipped files; anything else is a path."""
    if value.startswith("builtin:"):
        name = value.split(":", 1)[1]
        split = name.removeprefix("demo_")
        path = demo_data_path(split)
        if not name.startswith("demo_") or not path.is_file():
            raise DataError(f"unknown built-in dataset {value!r}; choose builtin:demo_train or builtin:demo_eval")
        return path
    return Path(value).expanduser()


def read_chat_jsonl(path) -> list[list[dict]]:
    """Read a JSONL file of ``{"messages": [{"role", "content"}, ...]}`` lines.

    Raises :class:`DataError` naming the file and line for a missing or empty file, a
    malformed line, a bad message, or a chat without an assistant turn.
    """
    path = resolve_data_path(str(path))
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    chats = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise DataError(f'{where}: expected an object with a non-empty "messages" list')
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                    raise DataError(f'{where}: message {i} needs "role" (one of {", ".join(_ROLES)}) and a string "content"')
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: the chat has no assistant turn, so there is nothing to train on")
            chats.append(messages)
    if not chats:
        raise DataError(f"data file {str(path)!r} is empty; it needs one JSON chat per line")
    return chats


def _render(tok, messages, generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tok, messages: list[dict], max_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (``-100`` outside assistant turns), truncated to ``max_len``.

    Returns ``None`` when truncation leaves no assistant token.
    """
    if not getattr(tok, "is_fast", False):
        raise DataError("qzo needs a fast (Rust) tokenizer for assistant-token masking")
    if not getattr(tok, "chat_template", None):
        raise DataError("the tokenizer has no chat template; pass a chat model or set tokenizer.chat_template")
    full = _render(tok, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], generation_prompt=True) if i else ""
        through = _render(tok, messages[: i + 1], generation_prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise DataError("this chat template renders earlier turns differently depending on later ones; "
                            "qzo cannot locate the assistant tokens")
        spans.append((len(before), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    ids = enc["input_ids"][:max_len]
    labels = []
    for tid, (start, _) in zip(ids, enc["offset_mapping"][:max_len]):
        inside = any(a <= start < b for a, b in spans)
        labels.append(tid if inside else IGNORE)
    if all(label == IGNORE for label in labels):
        return None
    return ids, labels


@dataclass
class ChatDataset:
    """Encoded examples: parallel lists of token ids and labels."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    source: str = ""
    dropped: int = 0  # examples left out because truncation removed every assistant token

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def from_chats(cls, tok, chats: list[list[dict]], max_len: int, source: str = "") -> "ChatDataset":
        if max_len < 2:
            raise DataError(f"train.max_len must be at least 2, got {max_len}")
        ids, labels, dropped = [], [], 0
        for messages in chats:
            encoded = encode_chat(tok, messages, max_len)
            if encoded is None:
                dropped += 1
                continue
            ids.append(encoded[0])
            labels.append(encoded[1])
        if not ids:
            raise DataError(f"{source or 'the data'}: every example lost all assistant tokens to truncation at "
                            f"max_len={max_len}; raise train.max_len")
        return cls(ids, labels, source, dropped)

    @classmethod
    def from_jsonl(cls, tok, path, max_len: int) -> "ChatDataset":
        return cls.from_chats(tok, read_chat_jsonl(path), max_len, source=str(path))

    def split(self, fraction: float, seed: int) -> tuple["ChatDataset", "ChatDataset"]:
        """A deterministic held-out split: ``(train, held_out)`` with ``fraction`` held out."""
        if not 0 < fraction < 1:
            raise DataError(f"data.eval_fraction must be in (0, 1), got {fraction}")
        n = len(self)
        n_eval = max(1, int(round(n * fraction)))
        if n_eval >= n:
            raise DataError(f"{self.source}: {n} examples are too few to hold out {fraction:.0%} for evaluation")
        g = torch.Generator().manual_seed(_mix64(seed ^ 0x5EED) & 0x7FFFFFFFFFFFFFFF)
        order = torch.randperm(n, generator=g).tolist()
        pick = lambda idx: ChatDataset([self.input_ids[i] for i in idx], [self.labels[i] for i in idx], self.source)
        return pick(sorted(order[n_eval:])), pick(sorted(order[:n_eval]))


def collate(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example; padding is masked out of attention and loss."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(input_ids, labels)):
        ids[row, : len(x)] = torch.tensor(x)
        lab[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class Batcher:
    """Training batches as a pure function of ``(seed, step)``: shuffled epochs, no state to save."""

    def __init__(self, dataset: ChatDataset, batch_size: int, seed: int, pad_id: int):
        if batch_size < 1:
            raise DataError(f"train.batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.pad_id = dataset, batch_size, seed, pad_id
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(_mix64(self.seed * 1_000_003 + epoch) & 0x7FFFFFFFFFFFFFFF)
            self._perm_cache = {epoch: torch.randperm(len(self.dataset), generator=g).tolist()}
        return self._perm_cache[epoch]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of 1-based training step ``step``."""
        n = len(self.dataset)
        first = (step - 1) * self.batch_size
        idx = [self._perm((first + j) // n)[(first + j) % n] for j in range(self.batch_size)]
        return collate([self.dataset.input_ids[i] for i in idx], [self.dataset.labels[i] for i in idx], self.pad_id)

    def epoch(self, step: int) -> float:
        return step * self.batch_size / len(self.dataset)


def eval_batches(dataset: ChatDataset, batch_size: int, pad_id: int):
    """The held-out set in fixed order, as padded batches."""
    for start in range(0, len(dataset), batch_size):
        yield collate(dataset.input_ids[start : start + batch_size], dataset.labels[start : start + batch_size], pad_id)


@torch.no_grad()
def eval_loss(model, dataset: ChatDataset, batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per assistant token over the whole held-out set."""
    device = model_input_device(model)
    total, count = 0.0, 0
    for batch in eval_batches(dataset, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1)


def model_input_device(model) -> torch.device:
    """Where input ids must live: the embedding's device (accelerate may spread the rest)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
