"""Where qzo keeps converted models: ``$QZO_CACHE``, else ``$XDG_CACHE_HOME/qzo``, else ``~/.cache/qzo``.

A GGUF file is dequantized once into ``<cache>/gguf/<name>-<fingerprint>/`` (a plain
Hugging Face folder) so later loads skip the conversion. Delete the folder, or run
``qzo cache --clear``, to free the space; it is rebuilt on the next load.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["cache_dir", "clear_cache"]


def cache_dir() -> Path:
    """The root of qzo's cache (not created here)."""
    if os.environ.get("QZO_CACHE"):
        return Path(os.environ["QZO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qzo"


def clear_cache() -> int:
    """Delete every cached conversion; returns the number of bytes freed."""
    root = cache_dir()
    if not root.exists():
        return 0
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    shutil.rmtree(root)
    return size
