"""Training data: chat, Alpaca and prompt/completion records -> token ids with loss only on
assistant tokens -> (optionally packed) batches.

Input. ``data.train`` / ``data.eval`` name a JSONL file (one record a line), a built-in
set (``builtin:demo_train``), or, with the optional ``datasets`` library, a local file read
by Hugging Face ``datasets`` (``hf:json:PATH``, ``hf:parquet:PATH``, ``hf:csv:PATH``,
``hf:arrow:PATH``). Every record becomes a chat (a list of ``{"role", "content"}``
messages); its format is detected per record (``format="auto"``) or forced:

- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
- ``alpaca``: ``{"instruction", "input" (optional), "output"}`` -> a user turn (the
  instruction, plus ``"\n\n"`` and the input when the input is non-empty) and an
  assistant turn (the output);
- ``completion``: ``{"prompt", "completion"}`` -> a user turn and an assistant turn.

Auto-detection tries the formats in that order, so a record with ``messages`` is a chat
whatever else it holds; fields whose value is ``null`` count as absent (``datasets`` fills
a column missing from a row with ``None``). A ``system_prompt`` is prepended as a
``system`` message to every chat that has none. All formats go through the tokenizer's
chat template, so prompts are rendered exactly as at inference and only the
assistant/completion text (with its end-of-turn marker) is trained on.

Masking works on the rendered text, not on template internals: for each assistant turn the
chat template is rendered up to the turn (with the generation prompt) and through it; the
characters in between are the assistant's (content and end-of-turn marker), and a token
is trained on when its first character falls in such a span (fast-tokenizer offsets).
This works for any template in which earlier turns render the same whatever follows,
which is checked per example.

Packing (``data.packing``, :meth:`ChatDataset.pack`) concatenates whole encoded examples,
in order, into rows of ``max_len`` tokens; batches of packed rows are padded to exactly
``max_len``, the padding masked out of attention and loss. Labels keep their ``-100``
masks, and since every example starts with masked prompt tokens no target crosses from one
example into the next. The attention mask stays the plain causal one and position ids
run on across the row (common SFT packing without position resets or block-diagonal
masks): a token attends to the earlier examples in its row too, so the loss of a packed
example is not exactly its loss alone. :func:`datasets_from_config` packs the training set
only; the held-out set stays one example per row so its loss is comparable across runs.

Batches are a pure function of ``(seed, step)``: the epoch permutation comes from a
generator seeded by ``(seed, epoch)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .loss import batch_loss
from .noise import _mix64

__all__ = [
    "FORMATS", "read_chats", "read_chat_jsonl", "read_hf", "to_chat", "encode_chat", "ChatDataset",
    "datasets_from_config", "Batcher", "collate", "demo_data_path", "eval_loss",
]

IGNORE = -100
_ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "chat", "alpaca", "completion")
"""Record formats: ``auto`` detects each record's format; the others force one."""
_HF_KINDS = ("json", "parquet", "csv", "arrow")
_EXPECTED = {
    "chat": 'a non-empty "messages" list',
    "alpaca": '"instruction" and "output" strings (and an optional "input")',
    "completion": '"prompt" and "completion" strings',
}
_REQUIRED = {"chat": {"messages"}, "alpaca": {"instruction", "output"}, "completion": {"prompt", "completion"}}


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


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise DataError(f"data.format is {format!r}; choose one of {', '.join(FORMATS)}")


def _detect(record: dict) -> str | None:
    for fmt in ("chat", "alpaca", "completion"):
        if _REQUIRED[fmt] <= set(record):
            return fmt
    return None


def _str_field(record: dict, key: str, where: str, fmt: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string in the {fmt} format, got {type(value).__name__}')
    return value


def to_chat(record, format: str = "auto", system_prompt: str | None = None, where: str = "record") -> list[dict]:
    """One record (a JSON object or a ``datasets`` row) as a chat: a list of messages.

    ``format`` is ``auto`` (detect: ``messages``, then ``instruction``/``output``, then
    ``prompt``/``completion``) or one of ``chat``, ``alpaca``, ``completion``. Fields set
    to ``None`` count as absent. ``system_prompt``, when not ``None``, is prepended as a
    ``system`` message unless the chat already has one. Raises :class:`DataError`
    starting with ``where`` (e.g. ``file.jsonl:3``) that says which fields were expected.
    """
    _check_format(format)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record = {k: v for k, v in record.items() if v is not None}
    found = ", ".join(map(str, record)) or "none"
    if format == "auto":
        fmt = _detect(record)
        if fmt is None:
            raise DataError(f"{where}: expected an object with {_EXPECTED['chat']}, or {_EXPECTED['alpaca']}, "
                            f"or {_EXPECTED['completion']}; found fields: {found}")
    else:
        fmt = format
        if not _REQUIRED[fmt] <= set(record):
            raise DataError(f'{where}: data.format "{fmt}" expects {_EXPECTED[fmt]}; found fields: {found}')
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: expected an object with {_EXPECTED['chat']}")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DataError(f'{where}: message {i} needs "role" (one of {", ".join(_ROLES)}) '
                                'and a string "content"')
            chat.append({k: v for k, v in m.items() if v is not None})
        if not any(m["role"] == "assistant" for m in chat):
            raise DataError(f"{where}: the chat has no assistant turn, so there is nothing to train on")
    elif fmt == "alpaca":
        user = _str_field(record, "instruction", where, fmt)
        extra = _str_field(record, "input", where, fmt) if "input" in record else ""
        if extra:
            user = f"{user}\n\n{extra}"
        chat = [{"role": "user", "content": user},
                {"role": "assistant", "content": _str_field(record, "output", where, fmt)}]
    else:
        chat = [{"role": "user", "content": _str_field(record, "prompt", where, fmt)},
                {"role": "assistant", "content": _str_field(record, "completion", where, fmt)}]
    if system_prompt is not None and not any(m["role"] == "system" for m in chat):
        chat.insert(0, {"role": "system", "content": system_prompt})
    return chat


def read_chat_jsonl(path, format: str = "auto", system_prompt: str | None = None) -> list[list[dict]]:
    """Read a JSONL file (or ``builtin:`` set) of chat, Alpaca or prompt/completion records as chats.

    See :func:`to_chat` for ``format`` and ``system_prompt``. Raises :class:`DataError`
    naming the file and line for a missing or empty file, a malformed line, a record
    without the expected fields, a bad message, or a chat without an assistant turn.
    """
    _check_format(format)
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
            chats.append(to_chat(record, format, system_prompt, where))
    if not chats:
        raise DataError(f"data file {str(path)!r} is empty; it needs one JSON record per line")
    return chats


def read_hf(spec: str, format: str = "auto", system_prompt: str | None = None) -> list[list[dict]]:
    """Read a local file through Hugging Face ``datasets``: ``hf:KIND:PATH`` -> chats.

    ``KIND`` is one of json, parquet, csv, arrow; ``PATH`` a local file or glob, loaded with
    ``datasets.load_dataset(KIND, data_files=PATH, split="train")``. Rows then go through
    :func:`to_chat` like JSONL lines; errors name the spec and the (0-based) row. Needs the
    optional ``datasets`` package (``pip install datasets``).
    """
    _check_format(format)
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] != "hf" or not parts[2]:
        raise DataError(f"{spec!r}: expected hf:KIND:PATH, e.g. hf:json:data/train.jsonl "
                        "or hf:parquet:data/train.parquet")
    kind, path = parts[1], str(Path(parts[2]).expanduser())
    if kind not in _HF_KINDS:
        raise DataError(f"{spec!r}: unknown kind {kind!r}; choose one of {', '.join(_HF_KINDS)} "
                        "(local files only; hub datasets are not loaded)")
    if not any(Path(p).is_file() for p in glob.glob(path)):
        raise DataError(f"{spec!r}: no local file matches {path!r}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} needs the Hugging Face datasets library: pip install datasets") from None
    try:
        rows = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as exc:  # datasets raises many types (pyarrow, its own); the user needs the message
        raise DataError(f"{spec!r}: datasets could not load it as {kind}: {type(exc).__name__}: {exc}") from None
    chats = [to_chat(row, format, system_prompt, f"{spec} row {i}") for i, row in enumerate(rows)]
    if not chats:
        raise DataError(f"{spec!r} holds no rows")
    return chats


def read_chats(source, format: str = "auto", system_prompt: str | None = None) -> list[list[dict]]:
    """Chats from a ``data.train``/``data.eval`` value: ``hf:KIND:PATH``, ``builtin:NAME`` or a JSONL path."""
    if str(source).startswith("hf:"):
        return read_hf(str(source), format, system_prompt)
    return read_chat_jsonl(source, format, system_prompt)


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
    """Encoded examples: parallel lists of token ids and labels (``-100`` where no loss is taken).

    Unpacked, each row is one example. After :meth:`pack`, each row holds one or more
    whole examples (``segments`` gives their token counts, row by row) and ``row_len`` is
    the width batches of it are padded to. Built from chats (:meth:`from_chats`,
    :meth:`from_source`) and not packed, ``chats[i]`` is the chat row ``i`` was encoded from
    (what a reward objective generates replies to); ``None`` otherwise.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    source: str = ""
    dropped: int = 0  # examples left out because truncation removed every assistant token
    row_len: int = 0  # packed: every batch is padded to this width; 0: not packed
    segments: list[list[int]] | None = None  # packed: token counts of the examples in each row
    chats: list[list[dict]] | None = None  # unpacked, from chats: the chat of each row (objective.kind=reward)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_examples(self) -> int:
        """How many examples the rows hold (the row count unless packed)."""
        return len(self) if self.segments is None else sum(len(s) for s in self.segments)

    @classmethod
    def from_chats(cls, tok, chats: list[list[dict]], max_len: int, source: str = "") -> "ChatDataset":
        """Encode chats (see :func:`encode_chat`); examples left without an assistant token are dropped."""
        if max_len < 2:
            raise DataError(f"train.max_len must be at least 2, got {max_len}")
        ids, labels, kept, dropped = [], [], [], 0
        for messages in chats:
            encoded = encode_chat(tok, messages, max_len)
            if encoded is None:
                dropped += 1
                continue
            ids.append(encoded[0])
            labels.append(encoded[1])
            kept.append(messages)
        if not ids:
            raise DataError(f"{source or 'the data'}: every example lost all assistant tokens to truncation at "
                            f"max_len={max_len}; raise train.max_len")
        return cls(ids, labels, source, dropped, chats=kept)

    @classmethod
    def from_source(cls, tok, source, max_len: int, format: str = "auto",
                    system_prompt: str | None = None) -> "ChatDataset":
        """Read (:func:`read_chats`: JSONL path, ``builtin:`` or ``hf:KIND:PATH``) and encode."""
        return cls.from_chats(tok, read_chats(source, format, system_prompt), max_len, source=str(source))

    @classmethod
    def from_jsonl(cls, tok, path, max_len: int, format: str = "auto",
                   system_prompt: str | None = None) -> "ChatDataset":
        """The same as :meth:`from_source` (the older name)."""
        return cls.from_source(tok, path, max_len, format, system_prompt)

    def pack(self, max_len: int) -> "ChatDataset":
        """Concatenate whole examples, in order, into rows of at most ``max_len`` tokens.

        An example goes into the current row if it fits, else it starts a new one; none is
        ever split (examples are at most ``max_len`` long: :meth:`from_chats` truncates
        longer ones). Labels keep their masks. Batches of the result are padded to
        exactly ``max_len``. Tokens attend to earlier examples of their row: see the
        module docstring.
        """
        if self.segments is not None:
            raise DataError(f"{self.source or 'the data'} is already packed")
        if max_len < 2:
            raise DataError(f"train.max_len must be at least 2, got {max_len}")
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        segments: list[list[int]] = []
        for x, y in zip(self.input_ids, self.labels):
            if len(x) > max_len:
                raise DataError(f"{self.source or 'the data'}: an example of {len(x)} tokens is longer than "
                                f"max_len={max_len}; encode with the same max_len you pack to")
            if not ids or len(ids[-1]) + len(x) > max_len:
                ids.append([])
                labels.append([])
                segments.append([])
            ids[-1].extend(x)
            labels[-1].extend(y)
            segments[-1].append(len(x))
        return ChatDataset(ids, labels, self.source, self.dropped, row_len=max_len, segments=segments)

    def split(self, fraction: float, seed: int) -> tuple["ChatDataset", "ChatDataset"]:
        """A deterministic held-out split: ``(train, held_out)`` with ``fraction`` of the rows held out."""
        if not 0 < fraction < 1:
            raise DataError(f"data.eval_fraction must be in (0, 1), got {fraction}")
        n = len(self)
        n_eval = max(1, int(round(n * fraction)))
        if n_eval >= n:
            raise DataError(f"{self.source}: {n} examples are too few to hold out {fraction:.0%} for evaluation")
        g = torch.Generator().manual_seed(_mix64(seed ^ 0x5EED) & 0x7FFFFFFFFFFFFFFF)
        order = torch.randperm(n, generator=g).tolist()

        def pick(idx: list[int], dropped: int) -> ChatDataset:
            segments = None if self.segments is None else [self.segments[i] for i in idx]
            chats = None if self.chats is None else [self.chats[i] for i in idx]
            return ChatDataset([self.input_ids[i] for i in idx], [self.labels[i] for i in idx], self.source,
                               dropped, self.row_len, segments, chats)

        return pick(sorted(order[n_eval:]), self.dropped), pick(sorted(order[:n_eval]), 0)


def datasets_from_config(cfg: dict, tok) -> tuple[ChatDataset, ChatDataset]:
    """The ``(train, held_out)`` datasets a run's config asks for.

    Reads ``cfg["data"]`` (``train``, ``eval``, ``eval_fraction``, ``format``,
    ``system_prompt``, ``packing``) and ``cfg["train"]`` (``max_len``, ``seed``). The
    held-out set is the ``data.eval`` file, or, when that is null, ``data.eval_fraction``
    of the training examples (split before packing, so no row mixes the two). With
    ``data.packing`` the training set is packed into rows of ``max_len``; the held-out
    set never is. Keys missing from ``cfg["data"]`` (a config written before they
    existed) take their defaults.
    """
    d, max_len, seed = cfg["data"], cfg["train"]["max_len"], cfg["train"]["seed"]
    fmt, system_prompt = d.get("format", "auto"), d.get("system_prompt")
    train = ChatDataset.from_source(tok, d["train"], max_len, fmt, system_prompt)
    if d["eval"]:
        held = ChatDataset.from_source(tok, d["eval"], max_len, fmt, system_prompt)
    else:
        train, held = train.split(d["eval_fraction"], seed)
    if d.get("packing", False):
        train = train.pack(max_len)
    return train, held


def collate(input_ids: list[list[int]], labels: list[list[int]], pad_id: int,
            width: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example (or to ``width`` if wider); padding is masked
    out of attention and loss."""
    width = max(width, max(len(x) for x in input_ids))
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(input_ids, labels)):
        ids[row, : len(x)] = torch.tensor(x)
        lab[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class Batcher:
    """Training batches as a pure function of ``(seed, step)``: shuffled epochs, no state to save.

    Batches of a packed dataset are padded to its ``row_len``."""

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

    def indices(self, step: int) -> list[int]:
        """Dataset rows of 1-based training step ``step``'s batch, in batch order."""
        n = len(self.dataset)
        first = (step - 1) * self.batch_size
        return [self._perm((first + j) // n)[(first + j) % n] for j in range(self.batch_size)]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of 1-based training step ``step`` (the rows :meth:`indices` names)."""
        idx = self.indices(step)
        return collate([self.dataset.input_ids[i] for i in idx], [self.dataset.labels[i] for i in idx], self.pad_id,
                       self.dataset.row_len)

    def epoch(self, step: int) -> float:
        """Epochs (passes over the rows) completed after ``step`` steps."""
        return step * self.batch_size / len(self.dataset)


def eval_batches(dataset: ChatDataset, batch_size: int, pad_id: int):
    """The held-out set in fixed order, as padded batches."""
    for start in range(0, len(dataset), batch_size):
        yield collate(dataset.input_ids[start : start + batch_size], dataset.labels[start : start + batch_size], pad_id,
                      dataset.row_len)


@torch.no_grad()
def eval_loss(model, dataset: ChatDataset, batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per assistant token over the whole held-out set."""
    device = model_input_device(model)
    total, count = 0.0, 0
    for batch in eval_batches(dataset, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(batch_loss(model, batch)) * n  # logits at labelled positions only (qzo.loss)
        count += n
    return total / max(count, 1)


def model_input_device(model) -> torch.device:
    """Where input ids must live: the embedding's device (accelerate may spread the rest)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
