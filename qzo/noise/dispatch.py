"""Which implementation runs the in-place noise ops: the Triton kernels or the torch reference.

The one place in qzo that imports ``qzo_kernels`` (lazily: triton is optional), so the kernels
have one door and the import-graph test can hold it.

``auto`` (the default) uses the kernels for CUDA tensors when triton is installed and the
torch reference otherwise (CPU tensors, no triton). ``torch`` and ``triton`` force one; the
switch is ``qzo.set_backend(name)`` or the environment variable ``QZO_BACKEND``. Forcing
``triton`` on CPU tensors runs the kernels through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` set before triton is first imported (that is how the kernels are
tested on machines without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["set_backend", "get_backend", "use_triton", "BACKENDS", "perturb_kernels", "update_kernels"]

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("QZO_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Choose ``auto``, ``torch`` or ``triton`` for every later perturbation and update."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The current setting (``auto``, ``torch`` or ``triton``)."""
    if _backend not in BACKENDS:
        raise ValueError(f"QZO_BACKEND={_backend!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return _backend


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:  # asked per tensor on every pass: look it up once
    return importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the Triton kernels under the current setting."""
    name = get_backend()
    if name == "torch":
        return False
    if name == "auto":
        return device.type == "cuda" and _triton_installed()
    if not _triton_installed():
        raise RuntimeError("backend 'triton' was forced but triton is not installed: pip install 'qzo[triton]'")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before importing qzo (or use backend 'torch' on CPU)")
    return True


def perturb_kernels():
    """``qzo_kernels.perturb``: the fused noise passes (call only where :func:`use_triton` said yes)."""
    from qzo_kernels import perturb

    return perturb


def update_kernels():
    """``qzo_kernels.update``: the fused update rules (call only where :func:`use_triton` said yes)."""
    from qzo_kernels import update

    return update
