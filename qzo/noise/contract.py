"""Seed-replayed Gaussian noise: the contract every perturbation in qzo is built on.

Definition (the contract). For a step seed ``s`` and a trainable tensor with stream id ``k``,
element ``i`` of the noise is::

    z(s, k, i) = tl.randn(derive_seed(s, k), i)

that is, exactly what Triton's ``tl.randn`` returns for the 64-bit key ``derive_seed(s, k)``
at offset ``i``: Philox4x32 with 10 rounds, counter ``(i mod 2**32, i >> 32, 0, 0)``, key
``(lo32(key), hi32(key))``, the first two output words mapped to uniforms and through the
first branch of Box-Muller. Because it is counter-based, any element can be produced on its
own: chunking, order and device do not change the values (up to float rounding of
``log``/``cos`` between libraries), and nothing has to be stored to replay a perturbation.

Why Triton's generator and not ``torch.Generator``: the GPU kernels generate the noise in
registers with ``tl.randn``; defining the contract as that function means the CPU path
below and the kernels agree by construction, and the agreement is tested through
``TRITON_INTERPRET=1``.

This module holds the pure-torch implementation, :func:`randn_reference`: the definition
and the reference for every kernel. Unsigned 32-bit Philox arithmetic is done in int64
lanes: a 32x32-bit product fits in 64 bits as a bit pattern (two's-complement wraparound),
so ``umulhi`` is one multiply and a shift. On the CPU, :func:`randn` runs the integer half
(Philox, uniforms, clamp, 2 pi) compiled (:mod:`qzo.noise.native`) and the transcendental
half with the reference's own torch operations in the reference's chunks, so its values are
the reference's bit for bit at about 1.5x ``torch.normal``'s time per value instead of 30x.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from . import native as noise_native

__all__ = ["randn", "randn_reference", "derive_seed", "derive_seeds", "stream_id", "philox4x32", "step_seed",
           "sampling_seed", "holdout_seed", "epoch_seed", "subsample_keys"]

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_ROUNDS = 10
# Triton's uint_to_uniform_float scale: the largest value with MAX_INT * scale < 1 in fp32.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586

# Chunk size for generation: bounds the int64 temporaries (about 10 tensors of 8 bytes per
# element) to a few MiB whatever the tensor size, which keeps the CPU path cache-friendly.
CHUNK = 1 << 18


def _mix64(x: int) -> int:
    """SplitMix64 finalizer: a bijective 64-bit mix with full avalanche."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def derive_seed(seed: int, stream: int) -> int:
    """The Philox key for (step seed, stream id), as a non-negative int below 2**63.

    Kept below 2**63 so it passes to a Triton kernel as a signed int64 scalar unchanged.
    """
    if seed < 0 or stream < 0:
        raise ValueError(f"seed and stream must be non-negative, got seed={seed}, stream={stream}")
    # The pi-digits constant keeps (0, 0) away from the all-zero key.
    return _mix64(_mix64(seed ^ 0x243F6A8885A308D3) ^ (stream * 0x9E3779B97F4A7C15)) & 0x7FFFFFFFFFFFFFFF


# Every seed qzo derives, in one place. Each is a pure function of the run's seed and a
# counter, so a resumed run, another rank or a replay derives the same value. The salts keep
# the families apart (a step seed never equals a sampling or shuffling seed of the same run);
# changing any of these changes every run's numbers, so they are frozen.
_LOW63 = 0x7FFFFFFFFFFFFFFF


def step_seed(base_seed: int, step: int, index: int) -> int:
    """The ``index``-th noise seed of step ``step`` for a run seeded with ``base_seed`` (< 2**63)."""
    return _mix64(_mix64(_mix64(base_seed) ^ step) ^ (index + 1)) & _LOW63


def subsample_keys(seed: int, step: int, streams: list[int]) -> list[float]:
    """A uniform number in [0, 1) per stream for step ``step``: which tensors a subsampled step perturbs
    (``qzo.ZO(subsample=p)`` keeps those below ``p``). A pure function of (seed, step, stream), like the noise."""
    key = _mix64(_mix64(seed ^ 0x5B5A4D50) ^ step)
    return [(derive_seed(key & _LOW63, s) >> 10) / float(1 << 53) for s in streams]


def sampling_seed(seed: int, step: int) -> int:
    """The torch seed of step ``step``'s sampled replies (a reward objective; every evaluation of the step)."""
    return _mix64(_mix64(seed ^ 0x5EEDC0DE) ^ step) & _LOW63


def holdout_seed(seed: int) -> int:
    """The torch seed of the shuffle that splits ``data.eval_fraction`` off the training chats."""
    return _mix64(seed ^ 0x5EED) & _LOW63


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed of epoch ``epoch``'s shuffle of the training rows."""
    return _mix64(seed * 1_000_003 + epoch) & _LOW63


def _mix64_np(x: np.ndarray) -> np.ndarray:
    """:func:`_mix64` on a uint64 array (numpy's uint64 arithmetic wraps like the masked int version)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_seeds(seeds, streams) -> np.ndarray:
    """:func:`derive_seed` for every (stream, seed) pair at once: int64 array ``[len(streams), len(seeds)]``.

    The kernels' per-launch key table. Vectorized because a launch over every LoRA tensor of
    a 7B model needs a few hundred keys per step, and a Python loop over them would cost more
    than the launch itself.
    """
    s = np.asarray(list(seeds), dtype=np.int64)
    k = np.asarray(list(streams), dtype=np.int64)
    if (s < 0).any() or (k < 0).any():
        raise ValueError("seeds and streams must be non-negative")
    s, k = s.astype(np.uint64)[None, :], k.astype(np.uint64)[:, None]
    with np.errstate(over="ignore"):
        x = _mix64_np(_mix64_np(s ^ np.uint64(0x243F6A8885A308D3)) ^ (k * np.uint64(0x9E3779B97F4A7C15)))
    return (x & np.uint64(0x7FFFFFFFFFFFFFFF)).astype(np.int64)


def stream_id(name: str) -> int:
    """A stable 31-bit stream id for a tensor name (the same in every process and version).

    Python's ``hash`` is salted per process, so a fixed hash of the UTF-8 name is used.
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prod = b * a  # wraps in int64 lanes; the 64-bit pattern is the exact unsigned product
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(key: int, c0: torch.Tensor, c1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on counters ``(c0, c1, 0, 0)`` with a 64-bit key; int64 lanes in/out."""
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words held in int64 lanes."""
    signed = torch.where(bits >= 0x80000000, bits - (1 << 32), bits)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def _randn_chunk(key: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    w0, w1, _, _ = philox4x32(key, idx & _MASK32, idx >> 32)
    u1 = torch.clamp(_uniform(w0), min=1.0e-7)
    u2 = _uniform(w1)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(u2 * _TWO_PI)


def _check(numel: int, offset: int) -> None:
    if numel < 0 or offset < 0:
        raise ValueError(f"numel and offset must be non-negative, got numel={numel}, offset={offset}")


def randn_reference(seed: int, stream: int, numel: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """The contract in pure torch: noise elements ``offset .. offset+numel-1`` (see :func:`randn`)."""
    _check(numel, offset)
    key = derive_seed(seed, stream)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        out[start : start + count] = _randn_chunk(key, offset + start, count, out.device)
    return out


def _randn_compiled(key: int, offset: int, numel: int) -> torch.Tensor:
    """The CPU fast path: compiled uniforms, then the reference's Box-Muller ops chunk by chunk.

    The chunks and the torch operations (log, the -2 product, sqrt, cos, the final product)
    are the reference's, applied to bit-identical inputs, so every element is identical
    (torch's vectorized and tail loops depend only on the chunk's length, which is the same).
    """
    out = torch.empty(numel, dtype=torch.float32)
    size = min(CHUNK, numel)
    u1_buf, theta_buf = torch.empty(size, dtype=torch.float32), torch.empty(size, dtype=torch.float32)
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        u1, theta = u1_buf[:count], theta_buf[:count]
        noise_native.philox_uniforms(key, offset + start, u1, theta)
        radius = torch.log(u1).mul_(-2.0).sqrt_()
        torch.mul(radius, theta.cos_(), out=out[start : start + count])
    return out


def randn(seed: int, stream: int, numel: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """Noise elements ``offset .. offset+numel-1`` of stream ``stream`` under step seed ``seed``.

    On the CPU this is the compiled generator when it could be built (bit-identical to
    :func:`randn_reference`; ``QZO_CPU_NOISE=reference`` forces the reference), elsewhere the
    reference itself.

    Args:
        seed: the step seed (non-negative int).
        stream: the tensor's stream id (see :func:`stream_id`).
        numel: how many elements to produce.
        offset: index of the first element (for chunked generation).
        device: where to compute; the values do not depend on it.

    Returns:
        A float32 tensor of shape ``(numel,)``, standard normal.
    """
    _check(numel, offset)
    if numel > 0 and torch.device(device).type == "cpu" and noise_native.available():
        return _randn_compiled(derive_seed(seed, stream), offset, numel)
    return randn_reference(seed, stream, numel, offset=offset, device=device)
