"""Checkpoints of a run: only what was trained, written atomically.

Layout of ``<run>/checkpoints/step-000120/``:

* ``trainables.safetensors``: the trained tensors by name (never base weights);
* ``optimizer.safetensors``: dense optimizer/strategy state tensors, when there are any;
* ``meta.json``: step, forwards, the optimizer's scalar state, and the qzo version.

A checkpoint is written into a hidden ``.tmp-*`` folder next to it and renamed into place,
so a crash mid-write leaves the previous checkpoint untouched and no half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "atomic_write_text"]

CHECKPOINT_FILES = ("trainables.safetensors", "meta.json")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temp file + rename: readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _split_state(state, prefix: str = "") -> tuple[dict, dict]:
    """Nested dict -> (flat tensors by 'a/b' key, the same tree with tensors replaced by markers)."""
    tensors, tree = {}, {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().to("cpu").contiguous()
            tree[k] = {"__tensor__": key}
        elif isinstance(v, dict):
            sub_t, sub_tree = _split_state(v, key + "/")
            tensors.update(sub_t)
            tree[k] = sub_tree
        else:
            tree[k] = v
    return tensors, tree


def _join_state(tree, tensors: dict):
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in tree.items()}
    return tree


def save_checkpoint(run_dir: Path, step: int, trainables: dict, optimizer_state: dict, extra: dict | None = None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and return its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    try:
        save_file(trainables, str(tmp / "trainables.safetensors"))
        tensors, tree = _split_state(optimizer_state)
        if tensors:
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        from . import __version__

        meta = {"step": step, "optimizer": tree, "qzo_version": __version__, **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():  # an identical step re-saved (e.g. after a resume): replace it whole
            old = root / f".old-step-{step:06d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """``(trainables, optimizer_state, meta)`` of a checkpoint folder."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    trainables = load_file(str(path / "trainables.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors")) if (path / "optimizer.safetensors").is_file() else {}
    return trainables, _join_state(meta["optimizer"], tensors), meta


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
