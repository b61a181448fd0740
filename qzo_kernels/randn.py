"""Fill a buffer with qzo's seed-replayed noise on the device: ``out[i] = tl.randn(key, offset + i)``.

The noise contract (``qzo.noise``) is defined as ``tl.randn(derive_seed(seed, stream), i)``,
so this kernel *is* the definition; ``qzo.noise.randn_reference`` is its pure-torch reference.
The caller derives the key (``qzo.noise.derive_seed``): this package imports nothing of qzo. It is
used to check the contract and by code that needs the noise itself (not fused into an
update). Offsets are int64, so tensors past 2**31 elements keep distinct counters
(Triton splits a 64-bit offset into the first two Philox counter words).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("qzo_kernels needs triton: pip install 'qzo[triton]'") from exc

BLOCK = 1024


@triton.jit
def _randn_kernel(out_ptr, key, offset, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < numel
    z = tl.randn(key, local + offset)
    tl.store(out_ptr + local, z, mask=mask)


def randn(key: int, numel: int, offset: int = 0, device="cuda") -> torch.Tensor:
    """Triton twin of :func:`qzo.noise.randn` for the key ``qzo.noise.derive_seed(seed, stream)`` (same values)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    grid = (triton.cdiv(numel, BLOCK),)
    _randn_kernel[grid](out, key, offset, numel, BLOCK=BLOCK)
    return out
