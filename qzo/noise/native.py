"""The compiled CPU generator behind :func:`qzo.noise.randn`: built once per machine, loaded with ctypes.

The pure-torch Philox in :mod:`qzo.noise` spends about 50 int64 tensor operations per value
(around 150 ns a value on a 2-core Xeon, 30-50x ``torch.normal``). That cost hides behind a
forward for LoRA, but not for scales or dense slices, whose noise is millions of values per
pass. This module compiles ``philox.c`` (the integer half of the contract: Philox,
the uniform mapping, the clamp and the 2 pi scaling, all exact) with the machine's C
compiler and runs it into float32 buffers; :func:`qzo.noise.randn` then applies the
transcendental half (log, sqrt, cos) with the same torch operations, in the same chunks, as
the reference. So the values are **bit-identical** to the reference, not merely close
(``tests/noise/test_noise.py`` checks it over seeds, odd sizes and offsets), and a run resumed on a
machine without a compiler replays the same noise.

Why ctypes and a plain C file, not a torch C++ extension: the C file needs no torch headers,
so it compiles in well under a second with any ``cc``; a torch extension takes a minute and
needs ninja. Why compile at first use, not in the wheel: qzo ships as a pure-Python wheel, and
``-march=native`` (the vector width that makes it fast) is a property of the machine that
runs it, not of the one that built the wheel.

The library is cached under ``<qzo cache>/native/``, keyed by the source, the compiler's
version and this CPU's feature flags, so a shared home directory never loads a library built
for another CPU. A library is code run in-process, so it is loaded only after checks: the
cache folder must be private to this user (:func:`qzo.cache.cache_folder`: a folder others may
write is refused, naming the ``chmod``), and the file must have the SHA-256 recorded beside it
when it was built (``noise_philox-<key>.so.qzo``); one that does not (changed since, or built
before records existed) is rebuilt, never loaded. Where no compiler is found or the build fails,
qzo says so once and uses the reference. ``QZO_CPU_NOISE=reference`` forces the reference;
``QZO_CPU_NOISE=native`` makes a failed build an error instead of a fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["philox_uniforms", "available", "load_error"]

_SOURCE = Path(__file__).with_name("philox.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-std=c99", "-shared", "-fPIC"]
_MODES = ("auto", "native", "reference")

_lib = None
_error: str | None = None
_tried = False


def _mode() -> str:
    mode = os.environ.get("QZO_CPU_NOISE", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"QZO_CPU_NOISE={mode!r} is not one of {', '.join(_MODES)}; unset it for the default (auto)")
    return mode


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _library_path(cc: str) -> Path:
    from ..cache import cache_folder

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (_SOURCE.read_text(), " ".join(_FLAGS), version, _cpu_flags(), platform.machine()))
    ).hexdigest()[:16]
    return cache_folder("native") / f"noise_philox-{key}.so"  # refuses a cache folder others may write


def _build(cc: str, target: Path) -> None:
    """Compile into a temporary file beside ``target`` and rename it in (concurrent builds never see half a file),
    then record its SHA-256 beside it (``target.qzo``), which :func:`_verified` checks before every load."""
    from ..cache import TMP_PREFIX, file_sha256, record

    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[:500]}")
        os.chmod(tmp, 0o755)  # the linker's mode follows the umask: group-writable under umask 002
        digest = file_sha256(Path(tmp))
        os.replace(tmp, target)
        record(target, sha256=digest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _verified(path: Path) -> bool:
    """Whether ``path`` is a library this user's qzo built: a private regular file (no link) whose SHA-256 is the
    one recorded when it was built."""
    from ..cache import check_private, file_sha256, recorded

    want = recorded(path)
    if want is None or not path.is_file() or path.is_symlink():
        return False
    check_private(path)  # a file others may write is an error, not a rebuild: someone changed its mode
    return want.get("sha256") == file_sha256(path)


def _load():
    global _lib, _error, _tried
    _tried = True
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    path = _library_path(cc)
    if not _verified(path):  # missing, changed since it was built, or from before records: built again
        _build(cc, path)
        if not _verified(path):
            raise RuntimeError(f"{path} does not match the SHA-256 recorded when it was built (another process "
                               "changed it); not loading it")
    lib = ctypes.CDLL(str(path))
    fn = lib.qzo_philox_uniforms
    fn.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = None
    _lib = lib


def available() -> bool:
    """Whether the compiled generator is in use (builds it on first call; never raises in ``auto``)."""
    global _error
    mode = _mode()
    if mode == "reference":
        return False
    if not _tried:
        try:
            _load()
        except Exception as exc:  # any build or load failure means the reference, said once
            from ..cache import CacheError

            _error = f"{type(exc).__name__}: {exc}"
            refused = isinstance(exc, CacheError)  # a cache others may write: the message says how to fix it
            fix = "Make the cache private as it says" if refused else "Install a C compiler (e.g. apt install gcc)"
            if mode == "native":
                raise RuntimeError(
                    f"QZO_CPU_NOISE=native, but the compiled CPU noise generator "
                    f"{'cannot be loaded' if refused else 'could not be built'}: {_error}. {fix}, or unset "
                    "QZO_CPU_NOISE to fall back to the reference."
                ) from exc
            print(
                f"qzo: the compiled CPU noise generator is unavailable ({_error}); using the pure-torch reference "
                f"(same values, about 30x slower per value). {fix} to speed up scales/dense runs.",
                file=sys.stderr,
            )
    return _lib is not None


def load_error() -> str | None:
    """Why the compiled generator is not in use, if it was tried and failed."""
    return _error


def philox_uniforms(key: int, offset: int, u1: torch.Tensor, theta: torch.Tensor) -> None:
    """Fill contiguous float32 CPU tensors ``u1`` (clamped uniforms) and ``theta`` (2 pi uniforms) in place."""
    if not (u1.is_contiguous() and theta.is_contiguous() and u1.dtype == theta.dtype == torch.float32):
        raise ValueError("philox_uniforms needs contiguous float32 CPU buffers")
    if u1.numel() != theta.numel():
        raise ValueError(f"u1 has {u1.numel()} elements, theta {theta.numel()}")
    _lib.qzo_philox_uniforms(key, offset, u1.numel(), u1.data_ptr(), theta.data_ptr())
