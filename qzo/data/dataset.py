"""Training data: records -> token ids with loss on the assistant tokens (or every token) -> batches.

Input (:mod:`qzo.data.sources`): ``data.train`` / ``data.eval`` name a JSONL file, a
built-in set (``builtin:demo_train``), local files read by Hugging Face ``datasets``
(``hf:json:PATH``, ``hf:parquet:PATH``, ...) or a dataset by name (``hf:org/name``,
``hf:org/name:split``, ``hf:org/name:config:split``, or a local dataset folder). Formats
(:mod:`qzo.data.formats`, ``data.format``, ``data.fields``): chat messages, ShareGPT,
Alpaca, prompt/completion (strings or TRL's message lists) and raw ``text``. Templates
(:mod:`qzo.data.templates`, ``data.chat_template``): the tokenizer's own, a built-in (chatml,
llama3, qwen2.5) or a jinja file. A ``system_prompt`` is prepended as a ``system`` message
to every chat that has none.

Masking works on the rendered text, not on template internals: for each trained assistant
turn the chat template is rendered up to the turn (with the generation prompt) and through
it; the characters in between are the assistant's (content and end-of-turn marker), and a
token is trained on when its first character falls in such a span (fast-tokenizer
offsets). This works for any template in which earlier turns render the same whatever
follows, which is checked per example. ``data.train_on_inputs: true`` trains on every
token of the rendered chat instead. Raw ``text`` is tokenized without a template (the
tokenizer's BOS if it adds one, EOS appended), trained on every token, and a text longer
than ``max_len`` is cut into consecutive ``max_len`` pieces (continued pre-training keeps
all of it); chats are truncated to ``max_len`` instead.

Packing (``data.packing``, :meth:`ChatDataset.pack`) concatenates whole encoded examples,
in order, into rows of ``max_len`` tokens, without cross-talk: a packed batch carries
``position_ids`` that restart at 0 with every example (and again for the padding at the
row's end) and no 2D ``attention_mask``. That is transformers' packed-sequence format
(its ``DataCollatorWithFlattening``): for eager, sdpa and flex attention its mask builder
(``masking_utils.find_packed_sequence_indices``) turns position resets into a
block-diagonal causal mask (flash-attention reads the same position ids as varlen
sequences; not tested here, CPU only); so a token attends only to its own example, at the
positions it has alone, and its loss is the loss of the example alone (tested per token,
sdpa and eager, in ``tests/data/test_data_packing.py``). The mask builder does this only for a forward without a
KV cache: qzo's loss paths pass ``use_cache=False``. The first label of every packed
example is ``-100`` (alone it is never a target either), so no target crosses from one
example into the next even where every token is trained. :func:`datasets_from_config`
packs the training set only; the held-out set stays one example per row.

Batches are a pure function of ``(seed, step)``: the epoch permutation comes from a
generator seeded by ``(seed, epoch)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..noise.contract import epoch_seed, holdout_seed
from .formats import FORMATS, Example, to_example
from .loss import batch_loss
from .sources import demo_data_path, read_examples, read_jsonl, resolve_data_path
from .sources import read_hf as _read_hf_examples
from .templates import BUILTIN, check_renders, render, set_chat_template

__all__ = [
    "FORMATS", "Example", "read_chats", "read_chat_jsonl", "read_hf", "read_examples", "to_chat", "encode_chat",
    "encode_example", "ChatDataset", "datasets_from_config", "Batcher", "collate", "collate_packed",
    "demo_data_path", "resolve_data_path", "eval_loss", "eval_batches", "data_record", "check_data_unchanged",
]

IGNORE = -100


def _chats(examples: list[Example]) -> list[list[dict]]:
    for e in examples:
        if e.messages is None:
            raise DataError(f"{e.where}: a raw text record is not a chat; read it with qzo.data.dataset.read_examples")
    return [e.messages for e in examples]


def to_chat(record, format: str = "auto", system_prompt: str | None = None, where: str = "record",
            fields: dict | None = None) -> list[dict]:
    """One chat-like record as a list of messages (see :func:`qzo.data.formats.to_example`)."""
    return _chats([to_example(record, format, system_prompt, where, fields)])[0]


def read_chat_jsonl(path, format: str = "auto", system_prompt: str | None = None,
                    fields: dict | None = None) -> list[list[dict]]:
    """The chats of a JSONL file (or ``builtin:`` set); errors name the file and line."""
    return _chats(read_jsonl(path, format, system_prompt, fields))


def read_hf(spec: str, format: str = "auto", system_prompt: str | None = None,
            fields: dict | None = None) -> list[list[dict]]:
    """The chats of an ``hf:`` source (:mod:`qzo.data.sources`); errors name the spec and row."""
    return _chats(_read_hf_examples(spec, format, system_prompt, fields))


def read_chats(source, format: str = "auto", system_prompt: str | None = None,
               fields: dict | None = None) -> list[list[dict]]:
    """Chats from a ``data.train``/``data.eval`` value: ``hf:...``, ``builtin:NAME`` or a JSONL path."""
    return _chats(read_examples(source, format, system_prompt, fields))


def _check_tokenizer(tok, chat: bool) -> None:
    if not getattr(tok, "is_fast", False):
        raise DataError("qzo needs a fast (Rust) tokenizer for assistant-token masking")
    if chat and not getattr(tok, "chat_template", None):
        raise DataError("the tokenizer has no chat template (a base model?): set data.chat_template to a built-in "
                        f"({', '.join(BUILTIN)}) or a jinja file, or use a chat model")


def encode_chat(tok, messages: list[dict], max_len: int, train_on_inputs: bool = False, first_trained: int = 0,
                tools: list[dict] | None = None, where: str = "chat") -> tuple[list[int], list[int]] | None:
    """Token ids and labels (``-100`` outside trained assistant turns), truncated to ``max_len``.

    Assistant turns from message ``first_trained`` on are trained; ``train_on_inputs``
    trains every token. ``tools`` go to the template. Returns ``None`` when truncation
    leaves no trained token. Raises :class:`DataError` naming ``where`` when the template
    cannot render the chat or drops its tool calls, tool messages or tools.
    """
    _check_tokenizer(tok, chat=True)
    full = render(tok, messages, False, tools, where)
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        check_renders(tok, messages, tools, full, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained or train_on_inputs:
            continue
        before = render(tok, messages[:i], True, tools, where) if i else ""
        through = render(tok, messages[: i + 1], False, tools, where)
        if not through.startswith(before) or not full.startswith(through):
            raise DataError(f"{where}: this chat template renders earlier turns differently depending on later "
                            "ones; qzo cannot locate the assistant tokens (data.train_on_inputs: true trains on "
                            "every token and needs no such spans)")
        spans.append((len(before), len(through)))
    ids, offsets = _first_tokens(tok, full, max_len)
    if train_on_inputs:
        return (ids, list(ids)) if len(ids) >= 2 else None
    labels = []
    for tid, (start, _) in zip(ids, offsets):
        inside = any(a <= start < b for a, b in spans)
        labels.append(tid if inside else IGNORE)
    if all(label == IGNORE for label in labels):
        return None
    return ids, labels


def _first_tokens(tok, text: str, max_len: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The first ``max_len`` token ids of ``text`` and their character offsets, without tokenizing all of a long text.

    A chat is cut to ``max_len`` tokens, so a message of megabytes needs only its start: the
    text is tokenized up to a cut (16 x max_len characters, then 4x more each time) and the
    first ``max_len`` tokens are kept when they end before the last two pre-tokens of the cut
    text, less the longest added token (BPE merges never cross a pre-token boundary, and the
    pre-tokenizer's split before them does not depend on what follows the cut), so they are
    the tokens of the whole text. Without a pre-tokenizer the whole text is tokenized. A 4 MiB
    message costs milliseconds, not the ~15 s (and 0.7 GiB) of tokenizing it all.
    """
    pre = getattr(getattr(tok, "backend_tokenizer", None), "pre_tokenizer", None)
    cut = max(4096, 16 * max_len)
    while pre is not None and cut < len(text):
        prefix = text[:cut]
        enc = tok(prefix, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        if len(enc["input_ids"]) > max_len:
            words = pre.pre_tokenize_str(prefix)
            added = max((len(t) for t in getattr(tok, "added_tokens_encoder", {})), default=0)
            stable = (words[-2][1][0] if len(words) >= 2 else 0) - added
            if enc["offset_mapping"][max_len - 1][1] <= stable:
                return enc["input_ids"][:max_len], enc["offset_mapping"][:max_len]
        cut *= 4
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    return enc["input_ids"][:max_len], enc["offset_mapping"][:max_len]


def encode_text(tok, text: str, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Raw text as ``max_len`` pieces, every token trained: the tokenizer's specials (BOS) plus EOS."""
    ids = tok(text, truncation=False)["input_ids"]
    eos = getattr(tok, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]  # documents end where they end: packed, the next one does not continue this one
    pieces = [ids[i : i + max_len] for i in range(0, len(ids), max_len)]
    return [(p, list(p)) for p in pieces if len(p) >= 2]  # a 1-token piece has no target


def encode_example(tok, example: Example, max_len: int,
                   train_on_inputs: bool = False) -> list[tuple[list[int], list[int]]]:
    """An example's ``(ids, labels)`` rows: one for a chat (none if truncation left no target), one or more for text."""
    if example.text is not None:
        return encode_text(tok, example.text, max_len)
    encoded = encode_chat(tok, example.messages, max_len, train_on_inputs, example.first_trained, example.tools,
                          example.where)
    return [] if encoded is None else [encoded]


@dataclass
class ChatDataset:
    """Encoded examples: parallel lists of token ids and labels (``-100`` where no loss is taken).

    Unpacked, each row is one example. After :meth:`pack`, each row holds one or more
    whole examples (``segments`` gives their token counts, row by row) and ``row_len`` is
    the width batches of it are padded to. Built from chats or examples (:meth:`from_chats`,
    :meth:`from_source`) and not packed, ``chats[i]`` is the chat row ``i`` was encoded from
    (what a reward objective generates replies to; ``None`` for a raw-text row); ``None``
    otherwise.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    source: str = ""
    dropped: int = 0  # examples left out because truncation removed every trained token
    row_len: int = 0  # packed: every batch is padded to this width; 0: not packed
    segments: list[list[int]] | None = None  # packed: token counts of the examples in each row
    chats: list[list[dict] | None] | None = None  # unpacked: the chat of each row (objective.kind=reward)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_examples(self) -> int:
        """How many examples the rows hold (the row count unless packed)."""
        return len(self) if self.segments is None else sum(len(s) for s in self.segments)

    @classmethod
    def from_chats(cls, tok, chats: list, max_len: int, source: str = "",
                   train_on_inputs: bool = False) -> "ChatDataset":
        """Encode chats (message lists) or :class:`~qzo.data.formats.Example` s (see :func:`encode_example`).

        A chat left without a trained token by truncation is dropped; a raw text longer than
        ``max_len`` becomes several rows.
        """
        if max_len < 2:
            raise DataError(f"train.max_len must be at least 2, got {max_len}")
        ids, labels, kept, dropped = [], [], [], 0
        for item in chats:
            example = item if isinstance(item, Example) else Example(messages=item, where=source or "chat")
            rows = encode_example(tok, example, max_len, train_on_inputs)
            if not rows:
                dropped += 1
            for x, y in rows:
                ids.append(x)
                labels.append(y)
                kept.append(example.messages)
        if not ids:
            raise DataError(f"{source or 'the data'}: every example lost all trained tokens to truncation at "
                            f"max_len={max_len}; raise train.max_len")
        return cls(ids, labels, source, dropped, chats=kept)

    @classmethod
    def from_source(cls, tok, source, max_len: int, format: str = "auto", system_prompt: str | None = None,
                    fields: dict | None = None, train_on_inputs: bool = False) -> "ChatDataset":
        """Read (:func:`qzo.data.sources.read_examples`: JSONL path, ``builtin:`` or ``hf:...``) and encode."""
        examples = read_examples(source, format, system_prompt, fields)
        return cls.from_chats(tok, examples, max_len, source=str(source), train_on_inputs=train_on_inputs)

    @classmethod
    def from_jsonl(cls, tok, path, max_len: int, format: str = "auto",
                   system_prompt: str | None = None) -> "ChatDataset":
        """The same as :meth:`from_source` (the older name)."""
        return cls.from_source(tok, path, max_len, format, system_prompt)

    def pack(self, max_len: int) -> "ChatDataset":
        """Concatenate whole examples, in order, into rows of at most ``max_len`` tokens.

        An example goes into the current row if it fits, else it starts a new one; none is
        ever split (examples are at most ``max_len`` long: :meth:`from_chats` truncates
        longer ones). Each example's first label becomes ``-100`` (the token before it is
        the previous example's); the rest keep theirs. Batches of the result are padded to
        exactly ``max_len`` and carry per-example ``position_ids`` (:func:`collate_packed`).
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
            labels[-1].extend([IGNORE, *y[1:]])
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
        g = torch.Generator().manual_seed(holdout_seed(seed))
        order = torch.randperm(n, generator=g).tolist()

        def pick(idx: list[int], dropped: int) -> ChatDataset:
            segments = None if self.segments is None else [self.segments[i] for i in idx]
            chats = None if self.chats is None else [self.chats[i] for i in idx]
            return ChatDataset([self.input_ids[i] for i in idx], [self.labels[i] for i in idx], self.source,
                               dropped, self.row_len, segments, chats)

        return pick(sorted(order[n_eval:]), self.dropped), pick(sorted(order[:n_eval]), 0)


def datasets_from_config(cfg: dict, tok) -> tuple[ChatDataset, ChatDataset]:
    """The ``(train, held_out)`` datasets a run's config asks for.

    Reads ``cfg["data"]`` (``train``, ``eval``, ``eval_fraction``, ``format``, ``fields``,
    ``system_prompt``, ``chat_template``, ``train_on_inputs``, ``packing``) and
    ``cfg["train"]`` (``max_len``, ``seed``). A ``data.chat_template`` is put on ``tok``
    (:func:`qzo.data.templates.set_chat_template`), so whatever renders with the run's tokenizer
    afterwards uses it too. The held-out set is the ``data.eval`` source, or, when that is
    null, ``data.eval_fraction`` of the training examples (split before packing, so no row
    mixes the two). With ``data.packing`` the training set is packed into rows of
    ``max_len``; the held-out set never is. Keys missing from ``cfg["data"]`` (a config
    written before they existed) take their defaults.
    """
    d, max_len, seed = cfg["data"], cfg["train"]["max_len"], cfg["train"]["seed"]
    set_chat_template(tok, d.get("chat_template"))
    read = dict(format=d.get("format", "auto"), system_prompt=d.get("system_prompt"), fields=d.get("fields"),
                train_on_inputs=d.get("train_on_inputs", False))
    train = ChatDataset.from_source(tok, d["train"], max_len, **read)
    if cfg.get("objective", {}).get("kind") == "reward" and any(c is None for c in train.chats):
        raise DataError(f"{d['train']}: holds raw text records; objective.kind=reward generates replies to chats, "
                        "so train on chat records or use objective.kind=cross_entropy")
    if d["eval"]:
        held = ChatDataset.from_source(tok, d["eval"], max_len, **read)
    else:
        train, held = train.split(d["eval_fraction"], seed)
    if d.get("packing", False):
        train = train.pack(max_len)
    return train, held


def _rows_sha256(ds: ChatDataset) -> str:
    """SHA-256 of a dataset's encoded rows (ids, labels, packing): what the batches of a run are cut from."""
    h = hashlib.sha256()
    for i, (x, y) in enumerate(zip(ds.input_ids, ds.labels)):
        h.update(array("q", [len(x), *x, *y, *(ds.segments[i] if ds.segments else ())]).tobytes())
    return h.hexdigest()


def _file_sha256(source: str) -> str | None:
    """SHA-256 of the local file a ``data.train``/``data.eval`` value names (``None``: not one file)."""
    if source.startswith("hf:"):
        return None
    path = resolve_data_path(source)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_record(cfg: dict, train: ChatDataset, held: ChatDataset) -> dict:
    """What ``RUN/data.json`` keeps of a run's data: per split its source, row count, SHA-256 of the encoded rows
    and of the file (a local file; ``None`` otherwise)."""
    d = cfg["data"]
    sources = {"train": str(d["train"]), "eval": str(d["eval"] or d["train"])}
    return {split: {"source": sources[split], "rows": len(ds), "rows_sha256": _rows_sha256(ds),
                    "file_sha256": _file_sha256(sources[split])}
            for split, ds in (("train", train), ("eval", held))}


def check_data_unchanged(run_dir: Path, now: dict) -> bool:
    """Refuse to resume on other data than the run started with (``RUN/data.json``); ``False``: nothing recorded.

    Batches are a pure function of ``(train.seed, step)`` over the encoded rows, so a data file
    edited between a run and its resume would silently give every later step other batches:
    the run that stopped and the one that goes on would not be one run. Refused, naming the
    file; runs written before ``data.json`` existed resume unchecked (and record it now).
    """
    path = Path(run_dir) / "data.json"
    if not path.is_file():
        return False
    then = json.loads(path.read_text())
    for split, was in then.items():
        cur = now.get(split)
        if cur is None or cur["rows_sha256"] == was["rows_sha256"]:
            continue
        what = ("its file changed" if was.get("file_sha256") and cur["file_sha256"] != was["file_sha256"] else
                "it encodes differently (a changed dataset, tokenizer or chat template)")
        raise DataError(f"data.{split} {cur['source']!r} is not the data this run started with: {what} "
                        f"({was['rows']} rows then, {cur['rows']} now; SHA-256 of the rows {was['rows_sha256'][:12]} "
                        f"then, {cur['rows_sha256'][:12]} now, recorded in {path}). A resume on other data would train "
                        "the steps after the checkpoint on other batches than the run that stopped. Put the original "
                        f"file back, or start a new run from this one's values: qzo train ... --set "
                        f"lora.init_from={run_dir}")
    return True


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


def collate_packed(input_ids: list[list[int]], labels: list[list[int]], segments: list[list[int]], pad_id: int,
                   width: int) -> dict[str, torch.Tensor]:
    """Packed rows right-padded to ``width``, with ``position_ids`` restarting at 0 for every example.

    No ``attention_mask``: transformers builds the block-diagonal causal mask from the
    position resets (the module docs); the padding at a row's end gets positions of its
    own (0, 1, ...), so it is one more block that no real token sees, and its labels are
    ``-100``.
    """
    batch = collate(input_ids, labels, pad_id, width)
    del batch["attention_mask"]
    pos = torch.zeros_like(batch["input_ids"])  # [B, T]
    for row, segs in enumerate(segments):
        at = 0
        for n in [*segs, width - sum(segs)]:
            pos[row, at : at + n] = torch.arange(n)
            at += n
    return {"input_ids": batch["input_ids"], "position_ids": pos, "labels": batch["labels"]}


def _rows(dataset: ChatDataset, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    ids, labels = [dataset.input_ids[i] for i in idx], [dataset.labels[i] for i in idx]
    if dataset.segments is None:
        return collate(ids, labels, pad_id, dataset.row_len)
    return collate_packed(ids, labels, [dataset.segments[i] for i in idx], pad_id, dataset.row_len)


class Batcher:
    """Training batches as a pure function of ``(seed, step)``: shuffled epochs, no state to save.

    Batches of a packed dataset are padded to its ``row_len`` and carry ``position_ids``
    (:func:`collate_packed`)."""

    def __init__(self, dataset: ChatDataset, batch_size: int, seed: int, pad_id: int):
        if batch_size < 1:
            raise DataError(f"train.batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.pad_id = dataset, batch_size, seed, pad_id
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm_cache = {epoch: torch.randperm(len(self.dataset), generator=g).tolist()}
        return self._perm_cache[epoch]

    def indices(self, step: int) -> list[int]:
        """Dataset rows of 1-based training step ``step``'s batch, in batch order."""
        n = len(self.dataset)
        first = (step - 1) * self.batch_size
        return [self._perm((first + j) // n)[(first + j) % n] for j in range(self.batch_size)]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of 1-based training step ``step`` (the rows :meth:`indices` names)."""
        return _rows(self.dataset, self.indices(step), self.pad_id)

    def epoch(self, step: int) -> float:
        """Epochs (passes over the rows) completed after ``step`` steps."""
        return step * self.batch_size / len(self.dataset)


def eval_batches(dataset: ChatDataset, batch_size: int, pad_id: int):
    """The held-out set in fixed order, as padded batches (packed ones with ``position_ids``)."""
    for start in range(0, len(dataset), batch_size):
        yield _rows(dataset, list(range(start, min(start + batch_size, len(dataset)))), pad_id)


@torch.no_grad()
def eval_loss(model, dataset: ChatDataset, batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per trained token over the whole held-out set."""
    device = model_input_device(model)
    total, count = 0.0, 0
    for batch in eval_batches(dataset, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(batch_loss(model, batch)) * n  # logits at labelled positions only (qzo.data.loss)
        count += n
    return total / max(count, 1)


def model_input_device(model) -> torch.device:
    """Where input ids must live: the embedding's device (accelerate may spread the rest), or the decoder's
    when the embedding is kept on the host (``model.embedding_on_cpu``, :mod:`qzo.models.host_embedding`)."""
    if getattr(model, "qzo_input_device", None) is not None:
        return model.qzo_input_device
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
