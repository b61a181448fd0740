"""The compiled CPU noise generator: bit-identical to the pure-torch reference, and a clean fallback."""

import pytest
import torch

from qzo.noise import contract as noise, native as noise_native


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A generator that has not been tried yet, building into an empty cache."""
    monkeypatch.setenv("QZO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(noise_native, "_lib", None)
    monkeypatch.setattr(noise_native, "_error", None)
    monkeypatch.setattr(noise_native, "_tried", False)
    return tmp_path / "cache"


def test_compiled_generator_builds_here():
    # CI machines have a C compiler: the fast path must be the one in use, not a silent fallback.
    assert noise_native.available(), noise_native.load_error()


@pytest.mark.parametrize("numel,offset", [(1, 0), (7, 3), (31, 0), (1000, 5), (noise.CHUNK, 0),
                                          (noise.CHUNK + 17, 11), (3 * noise.CHUNK // 2, 2**32 - 9)])
@pytest.mark.parametrize("seed,stream", [(0, 0), (123, 456), (2**62 + 11, 2**31 - 1)])
def test_bit_identical_to_reference(numel, offset, seed, stream):
    fast = noise.randn(seed, stream, numel, offset=offset)
    ref = noise.randn_reference(seed, stream, numel, offset=offset)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_bit_identical_at_any_thread_count(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(noise.randn(5, 6, 300_001, offset=77), noise.randn_reference(5, 6, 300_001, offset=77))
    finally:
        torch.set_num_threads(before)


def test_uniforms_are_the_contracts_integers():
    """The compiled half alone: the clamped u1 and the 2 pi-scaled u2 of the reference's Philox words."""
    key, start, count = noise.derive_seed(3, 4), 2**32 - 2, 5
    u1, theta = torch.empty(count), torch.empty(count)
    noise_native.philox_uniforms(key, start, u1, theta)
    idx = torch.arange(start, start + count, dtype=torch.int64)
    w0, w1, _, _ = noise.philox4x32(key, idx & 0xFFFFFFFF, idx >> 32)
    assert torch.equal(u1, torch.clamp(noise._uniform(w0), min=1.0e-7))
    assert torch.equal(theta, noise._uniform(w1) * noise._TWO_PI)


def test_library_is_cached_per_machine(fresh_native):
    assert noise_native.available()
    built = list((fresh_native / "native").glob("noise_philox-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    noise_native._tried = False
    noise_native._lib = None
    assert noise_native.available()
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert not list((fresh_native / "native").glob("tmp*"))  # no half-built file left behind


def test_no_compiler_falls_back_to_the_reference_and_says_so(fresh_native, monkeypatch, capsys):
    monkeypatch.setattr(noise_native, "_compiler", lambda: None)
    assert not noise_native.available()
    assert "no C compiler" in capsys.readouterr().err
    assert "no C compiler" in noise_native.load_error()
    assert torch.equal(noise.randn(1, 2, 999), noise.randn_reference(1, 2, 999))


def test_failed_build_is_an_error_when_native_is_required(fresh_native, monkeypatch):
    monkeypatch.setenv("QZO_CPU_NOISE", "native")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(noise_native, "_compiler", lambda: "false")
    with pytest.raises(RuntimeError, match="QZO_CPU_NOISE=native.*could not be built"):
        noise_native.available()


def test_reference_mode_and_bad_mode(monkeypatch):
    monkeypatch.setenv("QZO_CPU_NOISE", "reference")
    assert not noise_native.available()
    monkeypatch.setenv("QZO_CPU_NOISE", "fastest")
    with pytest.raises(ValueError, match="QZO_CPU_NOISE='fastest' is not one of auto, native, reference"):
        noise_native.available()
