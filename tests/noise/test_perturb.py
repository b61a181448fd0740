"""The in-place primitive against the formula written with materialized noise."""

import pytest
import torch

from qzo.noise import contract as noise
from qzo.noise.passes import combine, perturb_

TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (1e-3, 1e-3)}


def assert_close_where(got, want, rtol, atol):
    """assert_close that also prints the first indices where values differ."""
    bad = ~torch.isclose(got.float(), want.float(), rtol=rtol, atol=atol)
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        pairs = [(i, got.flatten()[i].item(), want.flatten()[i].item()) for i in idx]
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} values differ; first (index, got, want): {pairs}")


@pytest.mark.parametrize("numel", [1, 7, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool", [1, 2, 4])
@pytest.mark.parametrize("with_mu", [False, True])
def test_perturb_matches_formula(numel, dtype, pool, with_mu):
    g = torch.Generator().manual_seed(numel * 10 + pool)
    x0 = torch.randn(numel, generator=g).to(dtype)
    mu = torch.randn(numel, generator=g) if with_mu else None
    seeds = [int(s) for s in torch.randint(0, 2**62, (pool,), generator=g)]
    coefs = [float(c) for c in torch.randn(pool, generator=g)]
    stream, scale = 77, 0.999
    want = x0.float() * scale
    delta = sum(c * noise.randn(s, stream, numel) for s, c in zip(seeds, coefs))
    if with_mu:
        delta = delta + 0.3 * mu
    want = (want + delta).to(dtype)
    x = x0.clone()
    perturb_(x, stream, seeds, coefs, mu=mu, mu_coef=0.3, scale=scale)
    assert_close_where(x, want, *TOL[dtype])


def test_chunked_pass_equals_single_pass(monkeypatch):
    x1 = torch.randn(5000)
    x2 = x1.clone()
    perturb_(x1, 3, [11, 12], [0.5, -0.25])
    monkeypatch.setattr(noise, "CHUNK", 333)
    perturb_(x2, 3, [11, 12], [0.5, -0.25])
    assert torch.equal(x1, x2)


def test_shape_is_kept_and_noncontiguous_rejected():
    x = torch.zeros(3, 5)
    perturb_(x, 1, [4], [1.0])
    assert torch.equal(x.flatten(), noise.randn(4, 1, 15))
    with pytest.raises(ValueError, match="contiguous"):
        perturb_(torch.zeros(4, 6).t(), 1, [1], [1.0])
    with pytest.raises(ValueError, match="coefficients"):
        perturb_(x, 1, [1, 2], [1.0])


def test_combine_sums_per_seed_in_first_seen_order():
    seeds, coefs = combine([(5, 1.0), (7, 2.0)], [(7, -2.0), (5, 0.5), (9, 1.0)])
    assert seeds == [5, 9] and coefs == [1.5, 1.0]  # seed 7 cancels and is dropped


def test_noise_cache_gives_identical_values_and_respects_its_budget(monkeypatch):
    from qzo.noise import passes as perturb

    x0 = torch.randn(3000)
    monkeypatch.setattr(perturb, "noise_cache", perturb.NoiseCache(max_bytes=0))
    uncached = x0.clone()
    perturb_(uncached, 5, [1, 2], [0.3, -0.7])
    cache = perturb.NoiseCache(max_bytes=4 * 3000 + 1)  # room for one chunk of 3000 floats
    monkeypatch.setattr(perturb, "noise_cache", cache)
    cached = x0.clone()
    perturb_(cached, 5, [1, 2], [0.3, -0.7])
    assert torch.equal(cached, uncached)
    assert cache._bytes <= cache.max_bytes and len(cache._store) == 1
    again = x0.clone()
    perturb_(again, 5, [1, 2], [0.3, -0.7])  # one hit, one regenerated
    assert torch.equal(again, uncached)
