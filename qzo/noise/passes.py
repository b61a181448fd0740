"""The one in-place primitive every strategy and rule is built from (torch reference).

    x <- scale * x + sum_j a_j * z(s_j, k) [+ b * mu]

in one pass over ``x`` (chunk by chunk). The order of float operations is part of the
contract (kernels follow it): ``delta = sum_j a_j z_j`` accumulated in float32 in the order
given, then ``mu``'s term, then ``x = round(scale * float(x) + delta)``, rounded to
``x.dtype`` once. SPSA is one seed; a guiding vector is several seeds with +-1/|group|; a fused
restore-and-update is the undo coefficients plus the update coefficients of the same seeds
summed per seed, so it costs the same single pass as a perturbation. ``scale`` carries
decoupled weight decay into that same pass. The noise is regenerated per chunk; on CPU the
chunks of the current step are kept in a bounded cache (:class:`NoiseCache`), never across
steps, and the GPU kernels keep none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from . import contract as noise
from .dispatch import perturb_kernels, use_triton

__all__ = ["Candidate", "perturb_", "perturb_params_", "run_pass", "split_by_backend", "combine", "noise_combo", "chunks",
           "NoiseCache", "noise_cache"]


@dataclass(frozen=True)
class Candidate:
    """One perturbation to evaluate, relative to the trainables' current values.

    The candidate's values are ``x + sum coef * z(seed, stream) + mu_coef * mu`` for each
    trainable ``x`` (``mu`` the strategy's dense mean, LDSD only).
    """

    terms: tuple[tuple[int, float], ...]
    mu_coef: float = 0.0


class NoiseCache:
    """A byte-bounded LRU of generated noise chunks, for the CPU path only.

    A step touches the same seeds several times (SPSA: +eps, -2 eps, then restore+update:
    three passes). On CPU, generating the noise costs about 5 ns a value even compiled
    (:mod:`qzo.noise.native`; 50-150 ns in pure torch), against well under 1 ns to read it
    back, so keeping the step's noise (the size of the trainables, which the memory
    contract already budgets for) cuts the step overhead: measured on the demo with the
    pure-torch generator, the step/forwards time ratio went from 1.12 to about 1.04.
    The GPU path never uses it: kernels regenerate noise in registers, which is cheaper
    than a memory round trip. Values are identical with or without the cache.
    """

    def __init__(self, max_bytes: int = 256 * 2**20):
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self._store: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._bytes = 0

    def get(self, seed: int, stream: int, count: int, offset: int, device: torch.device) -> torch.Tensor:
        if device.type != "cpu" or self.max_bytes <= 0:
            return noise.randn(seed, stream, count, offset=offset, device=device)
        key = (seed, stream, count, offset)
        hit = self._store.get(key)
        if hit is not None:
            self._store.move_to_end(key)
            return hit
        z = noise.randn(seed, stream, count, offset=offset, device=device)
        size = z.numel() * z.element_size()
        if size <= self.max_bytes:
            self._store[key] = z
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._store.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return z

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0


#: the process-wide cache used by :func:`perturb_`; set ``noise_cache.max_bytes = 0`` to disable.
noise_cache = NoiseCache()


def combine(*terms: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """Merge lists of ``(seed, coefficient)`` into one, summing coefficients of equal seeds.

    Seeds keep first-seen order so the float summation order is fixed (bit-exact replay);
    zero coefficients are dropped (they would cost a noise pass for nothing).
    """
    order: list[int] = []
    total: dict[int, float] = {}
    for term in terms:
        for seed, coef in term:
            if seed not in total:
                order.append(seed)
                total[seed] = 0.0
            total[seed] += float(coef)
    seeds = [s for s in order if total[s] != 0.0]
    return seeds, [total[s] for s in seeds]


def chunks(numel: int):
    """``(start, end)`` of the chunks every pass walks (bounded temporaries, any tensor size)."""
    for start in range(0, numel, noise.CHUNK):
        yield start, min(start + noise.CHUNK, numel)


def noise_combo(
    stream: int,
    seeds: Sequence[int],
    coefs: Sequence[float],
    start: int,
    count: int,
    device,
    mu_chunk: torch.Tensor | None = None,
    mu_coef: float = 0.0,
) -> torch.Tensor:
    """``sum_j coefs[j] * z(seeds[j], stream)[start:start+count] + mu_coef * mu_chunk`` in float32.

    Accumulated in the order given, then the mean's term: the summation order of the contract.
    """
    delta = torch.zeros(count, dtype=torch.float32, device=device)
    for seed, coef in zip(seeds, coefs):
        delta.add_(noise_cache.get(seed, stream, count, start, torch.device(device)), alpha=float(coef))
    if mu_chunk is not None and mu_coef != 0.0:
        delta.add_(mu_chunk.to(torch.float32), alpha=float(mu_coef))
    return delta


@torch.no_grad()
def perturb_(
    x: torch.Tensor,
    stream: int,
    seeds: Sequence[int],
    coefs: Sequence[float],
    mu: torch.Tensor | None = None,
    mu_coef: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """In place: ``x = scale * x + sum_j coefs[j] * z(seeds[j], stream) + mu_coef * mu``.

    Args:
        x: contiguous floating-point tensor, updated in place.
        stream: the tensor's stream id.
        seeds, coefs: the noise terms (same length).
        mu: optional dense float32 tensor with ``x``'s shape (LDSD's learned mean).
        mu_coef: its coefficient.
        scale: multiplies ``x`` first (decoupled weight decay); 1.0 leaves it.

    Returns:
        ``x``.
    """
    if len(seeds) != len(coefs):
        raise ValueError(f"{len(seeds)} seeds but {len(coefs)} coefficients")
    if not x.is_contiguous():
        raise ValueError("perturb_ needs a contiguous tensor")
    if mu is not None and mu.shape != x.shape:
        raise ValueError(f"mu shape {tuple(mu.shape)} != x shape {tuple(x.shape)}")
    use_mu = mu is not None and mu_coef != 0.0
    if not seeds and not use_mu and scale == 1.0:
        return x
    if use_triton(x.device):
        keys = noise.derive_seeds(seeds, [stream])[0] if seeds else []
        return perturb_kernels().perturb_tensor(x, keys, coefs, mu=mu, mu_coef=mu_coef, scale=scale)
    flat = x.view(-1)
    mu_flat = mu.reshape(-1) if use_mu else None
    for start, end in chunks(flat.numel()):
        delta = noise_combo(stream, seeds, coefs, start, end - start, x.device,
                            mu_flat[start:end] if use_mu else None, mu_coef)
        base = flat[start:end].to(torch.float32)
        if scale != 1.0:
            base = base * scale
        flat[start:end] = (base + delta).to(x.dtype)
    return x


def split_by_backend(params, mean=None) -> tuple[dict[tuple, list], list]:
    """Trainables (each paired with its mean, or ``None``) split by where they run.

    Returns ``(groups, rest)``: ``groups`` maps ``(device, dtype, has_mean, noise scale)`` to
    the pairs that go through the Triton kernels, one multi-tensor launch per group (a launch
    takes one coefficient list, so tensors with their own noise scale launch apart); ``rest`` are the
    pairs for the torch reference. Shared by the perturbation and the dense rules' update.
    """
    groups: dict[tuple, list] = {}
    rest = []
    for t in params:
        mu = mean.get(t.name) if mean is not None else None
        if use_triton(t.tensor.device):
            groups.setdefault((t.tensor.device, t.tensor.dtype, mu is not None, t.noise), []).append((t, mu))
        else:
            rest.append((t, mu))
    return groups, rest


def run_pass(params, mean, reference, kernel) -> None:
    """The backend seam of the dense rules' fused update (the perturbation inlines the same split).

    ``kernel(members, has_mean)`` runs once per Triton group (:func:`split_by_backend`: device,
    dtype, mean, noise scale), ``reference(trainable, mean)`` for every other trainable. Each
    pass supplies both, side by side, so where a pass runs is decided by :func:`split_by_backend`
    alone and its two implementations are read together (tests compare them).
    """
    groups, rest = split_by_backend(params, mean)
    for t, mu in rest:
        reference(t, mu)
    for (_, _, has_mu, _), members in groups.items():
        kernel(members, has_mu)


def perturb_params_(
    params,
    seeds: Sequence[int],
    coefs: Sequence[float],
    mean: Mapping[str, torch.Tensor] | None = None,
    mu_coef: float = 0.0,
    scale: float = 1.0,
) -> None:
    """:func:`perturb_` on every trainable of a :class:`~qzo.zo.params.ParamSet` (same seeds and coefficients).

    ``mean`` maps a trainable's name to the strategy's dense mean for it (data the strategy
    hands down, never a call back up). This is the one entry point the optimizer and the rules
    use, so the backend is chosen in one place: with the Triton backend (``qzo.noise.dispatch``)
    the tensors are grouped by device, dtype and whether they have a mean, and each group is one
    multi-tensor launch, made from this frame (the step stays shallow: ``ZO.step -> strategy ->
    probe -> here -> kernel``).
    """
    groups, rest = split_by_backend(params, mean)
    with torch.no_grad():
        for t, mu in rest:
            perturb_(t.tensor, t.stream, seeds, t.coefs(coefs), mu=mu, mu_coef=mu_coef, scale=scale)
        for (_, _, has_mu, _), members in groups.items():
            keys = noise.derive_seeds(seeds, [t.stream for t, _ in members])
            perturb_kernels().perturb_many([t.tensor for t, _ in members], keys, members[0][0].coefs(coefs),
                                           mus=[m for _, m in members] if has_mu else None, mu_coef=mu_coef,
                                           scale=scale)
