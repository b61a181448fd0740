"""Where qzo keeps what it builds once: ``$QZO_CACHE``, else ``$XDG_CACHE_HOME/qzo``, else ``~/.cache/qzo``.

* ``<cache>/gguf/<name>-<fingerprint>/``: a GGUF dequantized once into a plain Hugging Face
  folder (:mod:`qzo.models.load`), so later loads skip the conversion;
* ``<cache>/native/noise_philox-<key>.so``: the compiled CPU noise generator (:mod:`qzo.noise.native`).

Every entry qzo writes there has a record beside it, ``<entry>.qzo`` (JSON: the qzo version, and
for a file its SHA-256, which is checked before the file is loaded), and qzo's temp files and
folders are named ``.qzo-tmp-*``. ``qzo cache --clear`` (:func:`clear_cache`) removes exactly
those (and, in ``gguf/`` and ``native/``, the entries qzo wrote before it kept records: model
folders and ``noise_philox-*.so`` files), so a user's own files in the folder stay; whatever is
removed is rebuilt on the next use.

The cache holds code qzo loads (the generator is a shared library run in-process), so it is
trusted only when nobody else can change it: :func:`cache_folder` refuses a cache folder (the
root or the part's) that another user owns or that group or others may write, naming the
``chmod`` that fixes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from .errors import QzoError

__all__ = ["cache_dir", "cache_folder", "clear_cache", "record", "recorded", "file_sha256", "check_private",
           "CacheError", "PARTS", "TMP_PREFIX"]

#: the sub-folders qzo writes (``qzo cache --clear`` looks nowhere else)
PARTS = ("gguf", "native")
#: how qzo's temp files and folders in the cache are named (a killed write leaves one; --clear removes it)
TMP_PREFIX = ".qzo-tmp-"
_RECORD = ".qzo"


class CacheError(QzoError):
    """qzo's cache folder cannot be trusted (another user owns it, or others may write it)."""


def cache_dir() -> Path:
    """The root of qzo's cache (not created here)."""
    if os.environ.get("QZO_CACHE"):
        return Path(os.environ["QZO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qzo"


def check_private(path: Path) -> None:
    """Raise :class:`CacheError` unless ``path`` (a cache folder or a file qzo loads from it) is owned by this user
    and not writable by group or others: anyone who can write it could swap what qzo loads."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise CacheError(f"qzo's cache {str(path)!r} belongs to another user (uid {st.st_uid}); qzo loads code and "
                         "models from its cache only when they are yours: set QZO_CACHE to a folder of your own")
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("its group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        raise CacheError(f"qzo's cache {str(path)!r} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}), who "
                         f"could swap what qzo loads from it; run chmod go-w {path} (or set QZO_CACHE to a private "
                         "folder)")


def cache_folder(part: str) -> Path:
    """``<cache>/<part>`` (one of :data:`PARTS`), created if missing (mode 755), after checking that it and the
    cache root are private to this user (:func:`check_private`)."""
    root = cache_dir()
    folder = root / part
    for d in (root, folder):
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        check_private(d)
    return folder


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_path(entry: Path) -> Path:
    return entry.with_name(entry.name + _RECORD)


def record(entry: Path, **fields) -> None:
    """Write ``<entry>.qzo``: qzo wrote ``entry`` (and, in ``fields``, e.g. the SHA-256 it had); atomically."""
    from . import __version__

    entry = Path(entry)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=entry.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"written_by": "qzo", "qzo_version": __version__, **fields}, f)
        os.replace(tmp, _record_path(entry))
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def recorded(entry: Path) -> dict | None:
    """What ``entry``'s record says (:func:`record`), or ``None``: qzo has no record of writing it."""
    path = _record_path(Path(entry))
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.lstat(path).st_size > 4096:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "qzo" else None


def _size(path: Path) -> int:
    """Bytes under ``path`` (links counted as themselves, never followed)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(folder, f)).st_size for f in files)
    return total


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    import shutil

    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _ours(part: str, path: Path) -> bool:
    """Whether qzo wrote ``path`` in its part ``part``: it has a record (:func:`record`), is a temp file or folder of
    qzo's, or is what qzo wrote there before it kept records (a converted model folder, holding ``config.json``; a
    compiled ``noise_philox-*.so``)."""
    if recorded(path) is not None or path.name.startswith(TMP_PREFIX):
        return True
    if path.is_symlink():
        return False
    if part == "gguf":
        return path.is_dir() and (path / "config.json").is_file()
    return part == "native" and path.is_file() and path.name.startswith("noise_philox-") and path.suffix == ".so"


def _is_record(path: Path) -> bool:
    return len(path.name) > len(_RECORD) and path.name.endswith(_RECORD) and recorded(
        path.with_name(path.name[: -len(_RECORD)])) is not None


def clear_cache() -> tuple[int, list[Path]]:
    """Delete what qzo wrote in its cache (:func:`_ours`: the entries of :data:`PARTS` qzo recorded or made, their
    records, qzo's temp files); a folder left empty goes too. Returns ``(bytes freed, what was kept)``: every other
    path there (a user's own files), untouched."""
    root = cache_dir()
    if not root.is_dir() or root.is_symlink():
        return 0, [root] if os.path.lexists(root) else []
    freed, kept = 0, []
    for part in PARTS:
        folder = root / part
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in sorted(folder.iterdir()):
            if not os.path.lexists(path) or _is_record(path):  # a record goes with its entry
                continue
            if _ours(part, path):
                freed += _size(path)
                _remove(path)
                if os.path.lexists(_record_path(path)):
                    freed += _size(_record_path(path))
                    os.unlink(_record_path(path))
            else:
                kept.append(path)
        for path in folder.iterdir():  # records whose entry is gone
            if _is_record(path) and not os.path.lexists(path.with_name(path.name[: -len(_RECORD)])):
                freed += _size(path)
                os.unlink(path)
    for folder in [*(root / p for p in PARTS), root]:
        try:
            folder.rmdir()  # only an empty one
        except OSError:
            pass
    if root.is_dir():
        kept += [p for p in sorted(root.iterdir()) if p.name not in PARTS]
    return freed, kept
