"""In-place seed-replayed perturbation: ``x = round(scale * x + sum_j a_j z(s_j, k) [+ b mu])``.

The Triton twin of :func:`qzo.noise.passes.perturb_` (its reference, same order of float
operations: the noise terms accumulated in float32 in the order given, then the mean's
term, then ``scale * x + delta`` rounded to ``x.dtype`` once). The noise is generated in
registers with ``tl.randn`` (the noise contract), never stored. The loop over seeds is
inside the kernel, so a whole pool (GV's guiding vector, a fused restore-and-update) costs
one read and one write of ``x``.

Two launch shapes share one body: :func:`perturb_tensor` for one (large) tensor, and
:func:`perturb_many` for many tensors of one dtype in one launch through a
:mod:`~qzo_kernels.table` (every LoRA A/B of a model at once).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("qzo_kernels needs triton: pip install 'qzo[triton]'") from exc

from .table import step_vectors, table_for

__all__ = ["perturb_tensor", "perturb_many", "BLOCK", "TL_DTYPES"]

BLOCK = 1024
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _perturb_body(x_ptr, mu_ptr, offs, mask, keys_ptr, coefs_ptr, n_seeds, scale, mu_coef,
                  HAS_MU: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    delta = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(n_seeds):
        key = tl.load(keys_ptr + j)
        a = tl.load(coefs_ptr + j)
        delta += a * tl.randn(key, offs)
    if HAS_MU:
        delta += mu_coef * tl.load(mu_ptr + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = x * scale
    tl.store(x_ptr + offs, (x + delta).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _perturb_one_kernel(x_ptr, mu_ptr, numel, keys_ptr, coefs_ptr, n_seeds, scale, mu_coef,
                        HAS_MU: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _perturb_body(x_ptr, mu_ptr, offs, offs < numel, keys_ptr, coefs_ptr, n_seeds, scale, mu_coef,
                  HAS_MU, HAS_SCALE, BLOCK)


@triton.jit
def _perturb_many_kernel(x_table, mu_table, numels, block_tensor, block_start, keys_ptr, coefs_ptr, n_seeds,
                         scale, mu_coef, DTYPE: tl.constexpr, HAS_MU: tl.constexpr, HAS_SCALE: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    x_ptr = tl.load(x_table + t).to(tl.pointer_type(DTYPE))
    mu_ptr = x_ptr  # unused unless HAS_MU
    if HAS_MU:
        mu_ptr = tl.load(mu_table + t).to(tl.pointer_type(tl.float32))
    _perturb_body(x_ptr, mu_ptr, offs, mask, keys_ptr + t * n_seeds, coefs_ptr, n_seeds, scale, mu_coef,
                  HAS_MU, HAS_SCALE, BLOCK)


def _check(x: torch.Tensor, mu: torch.Tensor | None) -> None:
    if x.dtype not in TL_DTYPES:
        raise TypeError(f"perturb kernel supports {list(TL_DTYPES)}, got {x.dtype}")
    if not x.is_contiguous() or (mu is not None and (not mu.is_contiguous() or mu.dtype != torch.float32)):
        raise ValueError("perturb kernel needs contiguous tensors and a contiguous float32 mu")


def perturb_tensor(x: torch.Tensor, keys, coefs, mu: torch.Tensor | None = None,
                   mu_coef: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """In place on one tensor: :func:`qzo.noise.passes.perturb_` with the tensor's Philox key per seed in ``keys``."""
    _check(x, mu)
    has_mu = mu is not None and mu_coef != 0.0
    if x.numel() == 0 or (not len(keys) and not has_mu and scale == 1.0):
        return x
    keys, a = step_vectors([list(keys)], coefs, device=x.device)
    grid = (triton.cdiv(x.numel(), BLOCK),)
    _perturb_one_kernel[grid](x, mu if has_mu else x, x.numel(), keys, a, len(coefs), float(scale), float(mu_coef),
                              HAS_MU=has_mu, HAS_SCALE=scale != 1.0, BLOCK=BLOCK)
    return x


def perturb_many(xs: list[torch.Tensor], keys, coefs, mus: list[torch.Tensor] | None = None,
                 mu_coef: float = 0.0, scale: float = 1.0) -> None:
    """In place on many tensors of one dtype and device, in one launch.

    Args:
        xs: the tensors (contiguous, one dtype).
        keys: ``[len(xs), seeds]`` Philox keys (``qzo.noise.derive_seeds(seeds, streams)``).
        coefs: the noise terms' coefficients, one per seed, shared by every tensor.
        mus: float32 means, one per tensor (LDSD), or ``None``.
        mu_coef, scale: as in :func:`perturb_tensor`.
    """
    if not xs:
        return
    dtype = xs[0].dtype
    for i, x in enumerate(xs):
        _check(x, mus[i] if mus is not None else None)
        if x.dtype != dtype or x.device != xs[0].device:
            raise ValueError("perturb_many needs tensors of one dtype and device; group them first")
    has_mu = mus is not None and mu_coef != 0.0
    if not len(coefs) and not has_mu and scale == 1.0:
        return
    roles = {"x": xs, "mu": mus} if has_mu else {"x": xs}
    table = table_for(roles, BLOCK)
    if table.n_blocks == 0:
        return
    keys, a = step_vectors(keys, coefs, device=xs[0].device)
    _perturb_many_kernel[(table.n_blocks,)](
        table.ptrs["x"], table.ptrs.get("mu", table.ptrs["x"]), table.numels, table.block_tensor, table.block_start,
        keys, a, len(coefs), float(scale), float(mu_coef),
        DTYPE=TL_DTYPES[dtype], HAS_MU=has_mu, HAS_SCALE=scale != 1.0, BLOCK=BLOCK)
