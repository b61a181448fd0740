"""Triton kernels against their torch references (on CPU through TRITON_INTERPRET=1).

Every kernel is compared with the reference over odd sizes (1, 7, 1000, 4097, and one past
a multiple of the block), float32/bfloat16/float16, pools of 1, 2 and 4 seeds, with and
without LDSD's mean, and several seeds; then whole optimizer steps on each backend.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import qzo
from qzo.noise import dispatch as backend, contract as noise
from qzo.noise.passes import perturb_, perturb_params_
from qzo.zo.types import Estimate

from kernel_check import assert_matches, where_differ

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [1, 7, 1000, 4097, 3 * 1024 + 1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def triton_backend():
    backend.set_backend("triton")
    yield
    backend.set_backend("auto")


def _keys(seeds, streams):
    """The kernels' key table for ``seeds`` x ``streams``: derived by qzo, never by the kernels."""
    return noise.derive_seeds(seeds, streams)


def test_kernels_import_nothing_of_qzo():
    """qzo_kernels receives keys and coefficients; qzo depends on it, never the other way round."""
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "qzo_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n == "qzo" or n.startswith("qzo.") for n in names), f"{path.name} imports {names}"


def _pool(n: int, seed: int) -> tuple[list[int], list[float]]:
    g = torch.Generator().manual_seed(seed)
    seeds = [int(s) for s in torch.randint(0, 2**62, (n,), generator=g)]
    coefs = [float(c) for c in torch.randn(n, generator=g)]
    return seeds, coefs


def test_derive_seeds_matches_scalar_derivation():
    seeds, streams = [0, 1, 2**62 + 5, 12345], [0, 7, 2**31 - 1]
    table = noise.derive_seeds(seeds, streams)
    assert table.dtype == np.int64 and table.shape == (3, 4)
    for i, k in enumerate(streams):
        for j, s in enumerate(seeds):
            assert int(table[i, j]) == noise.derive_seed(s, k)
    with pytest.raises(ValueError, match="non-negative"):
        noise.derive_seeds([-1], [0])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_mu", [False, True])
@pytest.mark.parametrize("pool", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES)
def test_perturb_kernel_matches_reference(numel, dtype, pool, with_mu, seed):
    from qzo_kernels.perturb import perturb_tensor

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g).to(dtype)
    mu = torch.randn(numel, generator=g) if with_mu else None
    seeds, coefs = _pool(pool, seed)
    scale = 0.97 if with_mu else 1.0  # weight decay's scale rides along with the mean's case
    want = perturb_(x.clone(), 11, seeds, coefs, mu=mu, mu_coef=0.3, scale=scale)
    got = x.clone().to(DEVICE)
    perturb_tensor(got, _keys(seeds, [11])[0], coefs, mu=mu.to(DEVICE) if with_mu else None, mu_coef=0.3,
                   scale=scale)
    assert_matches(got, want, dtype, f"numel={numel} dtype={dtype} pool={pool} mu={with_mu} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mu", [False, True])
def test_multi_tensor_launch_matches_per_tensor_reference(dtype, with_mu):
    from qzo_kernels.perturb import perturb_many

    g = torch.Generator().manual_seed(3)
    sizes = [1, 7, 1000, 4097, 1024, 33]
    xs = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    mus = [torch.randn(n, generator=g) for n in sizes] if with_mu else None
    streams = [noise.stream_id(f"t{i}") for i in range(len(sizes))]
    seeds, coefs = _pool(4, 9)
    want = [perturb_(x.clone(), k, seeds, coefs, mu=mus[i] if with_mu else None, mu_coef=-0.5, scale=0.9)
            for i, (x, k) in enumerate(zip(xs, streams))]
    got = [x.clone().to(DEVICE) for x in xs]
    perturb_many(got, _keys(seeds, streams), coefs, mus=[m.to(DEVICE) for m in mus] if with_mu else None,
                 mu_coef=-0.5, scale=0.9)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_matches(a, b, dtype, f"tensor {i} (numel {sizes[i]})")


def test_multi_tensor_table_is_reused_and_rejects_mixed_dtypes():
    from qzo_kernels.perturb import BLOCK, perturb_many
    from qzo_kernels.table import table_for

    xs = [torch.zeros(5, device=DEVICE), torch.zeros(2000, device=DEVICE)]
    t1 = table_for({"x": xs}, BLOCK)
    assert table_for({"x": xs}, BLOCK) is t1
    assert t1.n_blocks == 1 + 2 and t1.block_start.tolist() == [0, 0, 1024]
    with pytest.raises(ValueError, match="one dtype"):
        perturb_many([torch.zeros(3, device=DEVICE), torch.zeros(3, dtype=torch.float16, device=DEVICE)],
                     _keys([5], [1, 2]), [1.0])


def _estimate(with_mu: bool, names: list[str], shapes) -> Estimate:
    """A GV-like estimate (leftover and direction over the same seeds) or an LDSD one (plus the mean)."""
    seeds, _ = _pool(4, 21)
    v = [(s, c) for s, c in zip(seeds, [0.5, 0.5, -0.5, -0.5])]
    if not with_mu:
        return Estimate(direction=v, grad=1.7, applied=[(s, -1e-2 * c) for s, c in v], losses=[], loss=0.0,
                        seeds=seeds)
    g = torch.Generator().manual_seed(5)
    mu = {n: torch.randn(*shape, generator=g) for n, shape in zip(names, shapes)}
    return Estimate(direction=[(seeds[1], 1.0)], grad=-0.8, applied=[(seeds[1], -1e-2)], losses=[], loss=0.0,
                    seeds=seeds, direction_mu=1.0, applied_mu=-1e-2, mu=mu)


RULES = {
    "sgd": lambda: qzo.SGD(lr=1e-2, weight_decay=0.1),
    "momentum": lambda: qzo.Momentum(lr=1e-2, beta=0.9, weight_decay=0.1),
    "adam": lambda: qzo.Adam(lr=1e-2, weight_decay=0.1),
    "sign": lambda: qzo.Sign(lr=1e-2, weight_decay=0.1),
    "sign_momentum": lambda: qzo.SignMomentum(lr=1e-2, beta=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("with_mu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", list(RULES))
def test_fused_restore_update_matches_reference(rule, dtype, with_mu, triton_backend):
    shapes = [(7,), (33, 31), (4097,)]
    names = [f"w{i}" for i in range(len(shapes))]
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    results = {}
    for name in ("torch", "triton"):
        backend.set_backend(name)
        device = DEVICE if name == "triton" else "cpu"
        params = qzo.ParamSet([(n, x.clone().to(device)) for n, x in zip(names, init)])
        r = RULES[rule]()
        r.bind(params)
        est = _estimate(with_mu, names, shapes)
        if est.mu is not None:
            est.mu = {n: m.to(device) for n, m in est.mu.items()}
        # float32: three updates, so the moments and Adam's bias correction carry over; 16-bit:
        # one (each update may flip a last bit, and chained flips would compound)
        for _ in range(3 if dtype == torch.float32 else 1):
            r.apply(params, est, lr=1e-2)
        results[name] = (params, r)
    (p_ref, r_ref), (p_k, r_k) = results["torch"], results["triton"]
    for a, b in zip(p_k, p_ref):
        assert_matches(a.tensor, b.tensor, dtype, f"{rule} {a.name}")
    for key in getattr(r_ref, "state", {}):
        for n in names:  # float32 state computed from the same float32 terms
            assert_matches(r_k.state[key][n], r_ref.state[key][n], torch.float32, f"{rule} state {key} {n}")


STEP_CASES = [("spsa", "sgd"), ("gv", "adam"), ("greedy", "sign"), ("ldsd", "momentum"), ("ldsd", "sgd")]
STRATEGIES = {
    "spsa": lambda: qzo.SPSA(),
    "gv": lambda: qzo.GV(pool=4),
    "greedy": lambda: qzo.Greedy(pool=3),
    "ldsd": lambda: qzo.LDSD(candidates=3, lr_mu=0.5),
}


@pytest.mark.parametrize("strategy,rule", STEP_CASES)
def test_optimizer_steps_on_kernels_equal_reference_steps(strategy, rule):
    """Least squares through a linear model: 5 ZO steps on each backend, same seeds, same losses."""
    g = torch.Generator().manual_seed(0)
    a, y = torch.randn(64, 40, generator=g), torch.randn(64, generator=g)
    w0, b0 = torch.randn(40, generator=g) * 0.1, torch.zeros(1)
    runs = {}
    try:
        for name in ("torch", "triton"):
            backend.set_backend(name)
            device = DEVICE if name == "triton" else "cpu"
            w, b = w0.clone().to(device), b0.clone().to(device)
            aa, yy = a.to(device), y.to(device)
            opt = qzo.ZO([("w", w), ("b", b)], strategy=STRATEGIES[strategy](), rule=RULES[rule](), eps=1e-3, seed=4)
            records = []
            for _ in range(5):
                opt.step(lambda: ((aa @ w + b - yy) ** 2).mean())
                records.append(opt.last_record)
            runs[name] = (w.cpu(), b.cpu(), records, opt)
    finally:
        backend.set_backend("auto")
    (w_r, b_r, rec_r, opt_r), (w_k, b_k, rec_k, opt_k) = runs["torch"], runs["triton"]
    assert [r.seeds for r in rec_k] == [r.seeds for r in rec_r]
    for rk, rr in zip(rec_k, rec_r):
        assert rk.losses == pytest.approx(rr.losses, rel=1e-5, abs=1e-6)
    moved = (w_r - w0).abs().max().item()
    assert moved > 1e-4
    # float rounding differences are amplified by 1/(2 eps) in the slope estimate
    torch.testing.assert_close(w_k, w_r, rtol=0, atol=moved * 1e-3)
    torch.testing.assert_close(b_k, b_r, rtol=0, atol=moved * 1e-3)
    if strategy == "ldsd":
        for n, mu in opt_k.strategy.mu.items():
            torch.testing.assert_close(mu.cpu(), opt_r.strategy.mu[n], rtol=0, atol=1e-4)


def test_perturb_params_groups_mixed_dtypes_into_launches(triton_backend):
    g = torch.Generator().manual_seed(2)
    items = [("a", torch.randn(10, generator=g)), ("b", torch.randn(3, 4, generator=g).to(torch.bfloat16)),
             ("c", torch.randn(5000, generator=g))]
    ref = qzo.ParamSet([(n, t.clone()) for n, t in items])
    got = qzo.ParamSet([(n, t.clone().to(DEVICE)) for n, t in items])
    seeds, coefs = _pool(2, 8)
    backend.set_backend("torch")
    perturb_params_(ref, seeds, coefs)
    backend.set_backend("triton")
    perturb_params_(got, seeds, coefs)
    for a, b in zip(got, ref):
        assert_matches(a.tensor, b.tensor, b.tensor.dtype, a.name)


def test_where_differ_reports_positions():
    want = torch.zeros(10)
    got = want.clone()
    got[3], got[7] = 1.0, -2.0
    report = where_differ(got, want, rel=0.0, abs_floor=1e-6)
    assert "2 of 10" in report and "[3]" in report and "[7]" in report
    assert where_differ(want, want, 0.0, 0.0) == ""


def test_backend_switch_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        backend.set_backend("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend.set_backend("triton")
    try:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.use_triton(torch.device("cpu"))
    finally:
        backend.set_backend("auto")
    assert backend.use_triton(torch.device("cpu")) is False  # auto keeps CPU tensors on the reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares compiled kernels with the CPU reference")
def test_compiled_kernel_on_gpu_matches_cpu_reference():
    from qzo_kernels.perturb import perturb_tensor

    x = torch.randn(1 << 20)
    seeds, coefs = _pool(4, 1)
    want = perturb_(x.clone(), 3, seeds, coefs)
    got = perturb_tensor(x.cuda(), _keys(seeds, [3])[0], coefs).cpu()
    assert_matches(got, want, torch.float32, "compiled kernel vs CPU reference")


def test_mean_only_and_scale_only_passes_match_reference():
    """No noise terms at all: LDSD's mean alone, or weight decay's scale alone (an empty key table)."""
    from qzo_kernels.perturb import perturb_many, perturb_tensor

    g = torch.Generator().manual_seed(4)
    x, mu = torch.randn(1500, generator=g), torch.randn(1500, generator=g)
    for kwargs in (dict(mu=mu, mu_coef=0.5), dict(scale=0.9)):
        want = perturb_(x.clone(), 3, [], [], **kwargs)
        got = perturb_tensor(x.clone().to(DEVICE), [], [], **{k: v.to(DEVICE) if torch.is_tensor(v) else v
                                                            for k, v in kwargs.items()})
        assert_matches(got, want, torch.float32, str(list(kwargs)))
    many = [x.clone().to(DEVICE)]
    perturb_many(many, _keys([], [3]), [], mus=[mu.to(DEVICE)], mu_coef=0.5)
    assert_matches(many[0], perturb_(x.clone(), 3, [], [], mu=mu, mu_coef=0.5), torch.float32, "many, mean only")


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_noise_scales_on_kernels_equal_reference_steps(rule):
    """Per-tensor noise scales (qzo.ZO(noise_scale=)): each scale is its own launch, equal to the reference."""
    g = torch.Generator().manual_seed(1)
    a, y = torch.randn(64, 40, generator=g), torch.randn(64, generator=g)
    w0, b0, c0 = torch.randn(40, generator=g) * 0.1, torch.zeros(1), torch.ones(3)
    runs = {}
    try:
        for name in ("torch", "triton"):
            backend.set_backend(name)
            device = DEVICE if name == "triton" else "cpu"
            w, b, c = (t.clone().to(device) for t in (w0, b0, c0))
            aa, yy = a.to(device), y.to(device)
            opt = qzo.ZO([("w", w), ("b", b), ("c", c)], rule=RULES[rule](), eps=1e-3, seed=2,
                         noise_scale={"w": 0.5, "c": 0.0})
            for _ in range(5):
                opt.step(lambda: ((aa @ w + b - yy) ** 2).mean() + c.sum() * 0.0)
            runs[name] = (w.cpu(), b.cpu(), c.cpu())
    finally:
        backend.set_backend("auto")
    (w_r, b_r, c_r), (w_k, b_k, c_k) = runs["torch"], runs["triton"]
    moved = (w_r - w0).abs().max().item()
    assert moved > 1e-4 and torch.equal(c_r, c0) and torch.equal(c_k, c0)  # scale 0: left out on both backends
    torch.testing.assert_close(w_k, w_r, rtol=0, atol=moved * 1e-3)
    torch.testing.assert_close(b_k, b_r, rtol=0, atol=moved * 1e-3)
