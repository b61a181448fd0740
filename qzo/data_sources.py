"""Where records come from: ``data.train`` / ``data.eval`` values -> :class:`~qzo.data_formats.Example` lists.

The values:

- a JSONL file, one record a line (errors name ``file:line``);
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

Rows go through :func:`qzo.data_formats.to_example` like JSONL lines; errors name the
spec and the (0-based) row. The ``hf:`` sources need the optional ``datasets`` package.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from .data_formats import FORMATS, Example, to_example
from .errors import DataError

__all__ = ["read_examples", "read_jsonl", "read_hf", "parse_hf", "demo_data_path", "resolve_data_path", "HF_KINDS"]

HF_KINDS = ("json", "parquet", "csv", "arrow")


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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            examples.append(to_example(record, format, system_prompt, where, fields))
    if not examples:
        raise DataError(f"data file {str(path)!r} is empty; it needs one JSON record per line")
    return examples


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
    examples = [to_example(row, format, system_prompt, f"{spec} row {i}", fields) for i, row in enumerate(rows)]
    if not examples:
        raise DataError(f"{spec!r} holds no rows")
    return examples


def read_examples(source, format: str = "auto", system_prompt: str | None = None,
                  fields: dict | None = None) -> list[Example]:
    """Examples from a ``data.train``/``data.eval`` value: ``hf:...``, ``builtin:NAME`` or a JSONL path."""
    if str(source).startswith("hf:"):
        return read_hf(str(source), format, system_prompt, fields)
    return read_jsonl(source, format, system_prompt, fields)
