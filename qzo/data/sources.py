"""Where records come from: ``data.train`` / ``data.eval`` values -> :class:`~qzo.data.formats.Example` lists.

The values:

- a JSONL file, one record a line (errors name ``file:line``), read as UTF-8 (a BOM at the
  start is skipped; other bytes that are not UTF-8 are an error naming the line and byte),
  lines of at most :data:`MAX_LINE_BYTES` (16 MiB: a longer line is refused after reading
  that much of it, not read whole), JSON nested no deeper than Python's parser goes;
- ``builtin:demo_train`` / ``builtin:demo_eval``: the demo chats shipped inside qzo;
- ``hf:KIND:PATH`` with KIND one of json, parquet, csv, arrow: local files (PATH a file or
  glob) read by Hugging Face ``datasets`` (``load_dataset(KIND, data_files=PATH)``);
- ``hf:NAME``, ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``: ``datasets.load_dataset(NAME,
  CONFIG, split=SPLIT)``, NAME a hub id (``org/name``) or a local dataset folder (hub
  layout: ``data/train-*.parquet`` or ``.jsonl``, an optional README.md whose YAML header
  declares configs). SPLIT defaults to ``train`` and takes ``datasets``' slices
  (``train[:1000]``, ``train[:10%]``). A hub dataset comes from the user's ``datasets``
  cache when it was downloaded before (``HF_HUB_OFFLINE=1`` skips asking the hub), else
  from the hub. The KIND names above are reserved, so ``hf:json:x`` is always a local file.

Rows go through :func:`qzo.data.formats.to_example` like JSONL lines; errors name the
spec and the (0-based) row. The ``hf:`` sources need the optional ``datasets`` package.
"""

from __future__ import annotations

import codecs
import glob
import json
import sys
from pathlib import Path

from ..errors import DataError
from .formats import FORMATS, Example, to_example

__all__ = ["read_examples", "read_jsonl", "read_hf", "parse_hf", "demo_data_path", "resolve_data_path", "HF_KINDS",
           "MAX_LINE_BYTES"]

HF_KINDS = ("json", "parquet", "csv", "arrow")
# A chat record is used up to train.max_len tokens (a few KiB of text at 8k tokens); raw text is
# used whole, and tokenizing 7 MiB of it takes ~30 s and 1.3 GiB here: a longer line is
# almost always a file that is not JSONL, or a corpus in one record.
MAX_LINE_BYTES = 16 << 20


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


def read_jsonl(path, format: str = "auto", system_prompt: str | None = None,
               fields: dict | None = None) -> list[Example]:
    """Examples from a JSONL file (or ``builtin:`` set); errors name the file and line."""
    _check_format(format)
    path = resolve_data_path(str(path))
    if not path.is_file():
        hint = " (a dataset folder or hub id is read with hf:NAME)" if path.is_dir() else ""
        raise DataError(f"data file {str(path)!r} does not exist{hint}")
    examples = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested deeper than Python's parser reads (~{sys.getrecursionlimit()} "
                            "levels); a record is a few levels deep (record, messages, message): flatten the "
                            "line") from None
        examples.append(_example(record, format, system_prompt, where, fields))
    if not examples:
        raise DataError(f"data file {str(path)!r} is empty; it needs one JSON record per line")
    return examples


def _example(record, format, system_prompt, where, fields) -> Example:
    """:func:`to_example`, with a record nested too deep for its recursive checks named, not a traceback."""
    try:
        return to_example(record, format, system_prompt, where, fields)
    except RecursionError:
        raise DataError(f"{where}: nested deeper than qzo reads (~{sys.getrecursionlimit()} levels); a record is a "
                        "few levels deep (record, messages, message): flatten it") from None


def _lines(path: Path):
    """``(line number, text)`` of a file read as UTF-8; :class:`DataError` naming the line for bytes that are
    not UTF-8 and for a line over :data:`MAX_LINE_BYTES` (of which no more than that is read)."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: the line is longer than {MAX_LINE_BYTES >> 20} MiB; a JSONL line is "
                                "one record (qzo trains on train.max_len tokens of a chat): split a long text into "
                                "records of a document or a chunk each, or check that the file is JSONL")
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: byte {exc.start + 1} of the line (0x{raw[exc.start]:02x}) is not "
                                "UTF-8, which JSONL is read as; convert the file (from Latin-1, say: iconv -f latin1 "
                                f"-t utf-8 {path} > fixed.jsonl) or fix the line") from None


def _split_outside_brackets(text: str) -> list[str]:
    """``a:train[:10]`` -> ``["a", "train[:10]"]``: colons inside a split slice do not separate."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def parse_hf(spec: str) -> dict:
    """``hf:...`` -> ``{"kind", "path"}`` (local files) or ``{"name", "config", "split"}`` (load_dataset by name)."""
    usage = ("expected hf:KIND:PATH (KIND one of json, parquet, csv, arrow: local files), or hf:NAME, "
             "hf:NAME:SPLIT, hf:NAME:CONFIG:SPLIT (NAME a hub id such as org/name or a local dataset folder)")
    if not spec.startswith("hf:") or not spec[3:].strip():
        raise DataError(f"{spec!r}: {usage}")
    head, _, rest = spec[3:].partition(":")
    if head in HF_KINDS:
        if not rest:
            raise DataError(f"{spec!r}: {usage}, e.g. hf:json:data/train.jsonl or hf:parquet:data/train.parquet")
        return {"kind": head, "path": str(Path(rest).expanduser())}
    parts = [p.strip() for p in _split_outside_brackets(spec[3:])]
    if len(parts) > 3 or not all(parts):
        raise DataError(f"{spec!r}: {usage}; a split slice such as train[:100] may hold colons")
    name = parts[0]
    if Path(name).expanduser().is_dir():
        name = str(Path(name).expanduser())
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 else "train"
    return {"name": name, "config": config, "split": split}


def _load(spec: str, parsed: dict):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} needs the Hugging Face datasets library: pip install datasets") from None
    try:
        if "kind" in parsed:
            return datasets.load_dataset(parsed["kind"], data_files=parsed["path"], split="train")
        return datasets.load_dataset(parsed["name"], parsed["config"], split=parsed["split"])
    except Exception as exc:  # datasets raises many types (pyarrow, hub, its own); the user needs the message
        if "kind" in parsed:
            raise DataError(f"{spec!r}: datasets could not load it as {parsed['kind']}: "
                            f"{type(exc).__name__}: {exc}") from None
        where = ("the local folder" if Path(parsed["name"]).is_dir() else
                 "a hub dataset (it needs the network, or an earlier download in the datasets cache: "
                 "HF_DATASETS_CACHE, with HF_HUB_OFFLINE=1 to use it offline; a gated one needs `hf auth login`)")
        raise DataError(f"{spec!r}: datasets could not load {parsed['name']!r} (config {parsed['config']}, split "
                        f"{parsed['split']!r}) as {where}: {type(exc).__name__}: {exc}") from None


def read_hf(spec: str, format: str = "auto", system_prompt: str | None = None,
            fields: dict | None = None) -> list[Example]:
    """Examples from an ``hf:`` source (see the module docs); errors name the spec and row."""
    _check_format(format)
    parsed = parse_hf(spec)
    if "kind" in parsed and not any(Path(p).is_file() for p in glob.glob(parsed["path"])):
        raise DataError(f"{spec!r}: no local file matches {parsed['path']!r}")
    rows = _load(spec, parsed)
    examples = [_example(row, format, system_prompt, f"{spec} row {i}", fields) for i, row in enumerate(rows)]
    if not examples:
        raise DataError(f"{spec!r} holds no rows")
    return examples


def read_examples(source, format: str = "auto", system_prompt: str | None = None,
                  fields: dict | None = None) -> list[Example]:
    """Examples from a ``data.train``/``data.eval`` value: ``hf:...``, ``builtin:NAME`` or a JSONL path."""
    if str(source).startswith("hf:"):
        return read_hf(str(source), format, system_prompt, fields)
    return read_jsonl(source, format, system_prompt, fields)
