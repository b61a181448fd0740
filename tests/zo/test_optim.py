"""qzo.ZO with SPSA + SGD against MeZO written plainly with materialized noise."""

import math

import pytest
import torch

import qzo
from qzo.noise import contract as noise
from qzo.noise.contract import step_seed

from helpers import tiny_config


def plain_spsa(named, closure, steps, lr, eps, seed, weight_decay=0.0):
    """MeZO as in the paper: materialize z for every tensor, two evaluations, SGD update."""
    log = []
    for step in range(1, steps + 1):
        s = step_seed(seed, step, 0)
        zs = {n: noise.randn(s, noise.stream_id(n), t.numel()).view_as(t) for n, t in named}
        theta = {n: t.detach().clone() for n, t in named}
        with torch.no_grad():
            for n, t in named:
                t.copy_(theta[n] + eps * zs[n])
            f_plus = float(closure())
            for n, t in named:
                t.copy_(theta[n] - eps * zs[n])
            f_minus = float(closure())
            g = (f_plus - f_minus) / (2 * eps)
            for n, t in named:
                t.copy_((1 - lr * weight_decay) * theta[n] - lr * g * zs[n])
        log.append((s, f_plus, f_minus))
    return log


def _least_squares(seed=0):
    g = torch.Generator().manual_seed(seed)
    X, w_true = torch.randn(64, 10, generator=g), torch.randn(10, 1, generator=g)
    y = X @ w_true
    w, b = torch.zeros(10, 1), torch.zeros(1)
    return X, y, w, b


def test_spsa_equals_plain_on_least_squares():
    X, y, w, b = _least_squares()
    closure = lambda: ((X @ w + b - y) ** 2).mean()
    opt = qzo.ZO([("w", w), ("b", b)], strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-2, weight_decay=0.1), eps=1e-2, seed=7)
    records = []
    for _ in range(5):
        opt.step(closure)
        records.append(opt.last_record)
    w2, b2 = torch.zeros(10, 1), torch.zeros(1)
    closure2 = lambda: ((X @ w2 + b2 - y) ** 2).mean()
    log = plain_spsa([("w", w2), ("b", b2)], closure2, 5, lr=1e-2, eps=1e-2, seed=7, weight_decay=0.1)
    assert [r.seeds[0] for r in records] == [s for s, _, _ in log]
    for r, (_, fp, fm) in zip(records, log):
        assert r.losses == pytest.approx([fp, fm], rel=1e-5)
    # in-place +eps/-2eps/restore vs fresh copies differ by float rounding, amplified by 1/eps
    torch.testing.assert_close(w, w2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, b2, rtol=1e-4, atol=1e-5)
    assert opt.forwards == 10 and opt.steps == 5


def test_spsa_lowers_least_squares_loss():
    X, y, w, b = _least_squares(1)
    closure = lambda: ((X @ w + b - y) ** 2).mean()
    start = float(closure())
    opt = qzo.ZO([w, b], rule=qzo.SGD(lr=2e-2), eps=1e-3)
    for _ in range(300):
        opt.step(closure)
    assert float(closure()) < 0.2 * start


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_spsa_equals_plain_on_tiny_quantized_llama(quant, tiny_tokenizer, tiny_batch):
    def build():
        model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant=quant, seed=0)
        return model, qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=0)

    model_a, params_a = build()
    # B starts at 0 in LoRA; give it values so both factors matter from step 1
    for t in params_a:
        t.tensor.add_(0.05 * noise.randn(99, t.stream, t.tensor.numel()).view_as(t.tensor))
    model_b, params_b = build()
    params_b.load_state_dict(params_a.state_dict())
    init = params_a.state_dict()

    opt = qzo.ZO(params_a, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-2), eps=1e-2, seed=3)
    losses = [opt.step(lambda: model_a(**tiny_batch).loss) for _ in range(5)]
    named_b = [(t.name, t.tensor) for t in params_b]
    log = plain_spsa(named_b, lambda: model_b(**tiny_batch).loss, 5, lr=1e-2, eps=1e-2, seed=3)
    assert losses == pytest.approx([(fp + fm) / 2 for _, fp, fm in log], rel=1e-4)
    # 1/(2 eps) = 50 amplifies loss rounding into the update, so compare against the size of
    # the change: 1% for nf4 (fp32 compute); 5% for int8, whose CPU matmul casts inputs to fp16
    share = {"nf4": 1e-2, "int8": 5e-2}[quant]
    for ta, tb in zip(params_a, params_b):
        moved = (ta.tensor - init[ta.name]).abs().max().item()
        assert moved > 1e-2
        torch.testing.assert_close(ta.tensor, tb.tensor, rtol=0, atol=moved * share)


def test_nonfinite_loss_restores_values_and_names_the_step():
    w = torch.ones(4)
    calls = iter([1.0, 2.0, 0.5, float("nan")])
    opt = qzo.ZO([("w", w)], rule=qzo.SGD(lr=0.1), eps=1e-2)
    opt.step(lambda: next(calls))
    before = w.clone()
    with pytest.raises(qzo.NonFiniteLossError, match="step 2") as info:
        opt.step(lambda: next(calls))
    assert info.value.step == 2
    torch.testing.assert_close(w, before, rtol=0, atol=1e-6)
    assert opt.steps == 1


def test_params_accept_tensors_pairs_and_reject_bad_input():
    a, b = torch.zeros(3), torch.zeros(2)
    assert [t.name for t in qzo.ZO([a, b]).params] == ["0", "1"]
    assert [t.stream for t in qzo.ZO([("x", a)]).params] == [noise.stream_id("x")]
    with pytest.raises(ValueError, match="empty"):
        qzo.ZO([])
    with pytest.raises(TypeError, match="floating-point"):
        qzo.ZO([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="duplicate"):
        qzo.ZO([("x", a), ("x", b)])
    with pytest.raises(ValueError, match="eps"):
        qzo.ZO([a], eps=0)


def test_closure_runs_without_grad():
    w = torch.zeros(3, requires_grad=True)
    seen = []
    opt = qzo.ZO([w], rule=qzo.SGD(lr=1e-3))
    opt.step(lambda: seen.append(torch.is_grad_enabled()) or (w**2).sum())
    assert seen == [False, False]
    assert math.isfinite(opt.last_record.grad)


def test_clip_limits_the_projected_gradient_and_the_log_records_it():
    """QZO's clipping: a loss jump of 10 over 2 eps = 0.02 is a slope of 500, clipped to 100."""
    w = torch.zeros(5)
    losses = iter([10.0, 0.0])
    opt = qzo.ZO([("w", w)], rule=qzo.SGD(lr=1e-3), eps=1e-2, clip=100.0)
    opt.step(lambda: next(losses))
    assert opt.last_record.grad == 100.0
    z = noise.randn(opt.last_record.seeds[0], noise.stream_id("w"), 5)
    torch.testing.assert_close(w, -1e-3 * 100.0 * z, rtol=0, atol=1e-6)
    unclipped = qzo.ZO([("w", torch.zeros(5))], rule=qzo.SGD(lr=1e-3), eps=1e-2)
    losses = iter([10.0, 0.0])
    unclipped.step(lambda: next(losses))
    assert unclipped.last_record.grad == pytest.approx(500.0)
    with pytest.raises(ValueError, match="clip must be > 0"):
        qzo.ZO([torch.zeros(2)], clip=0)


def test_component_repr_shows_settings_and_counts_state_tensors():
    w = torch.zeros(5, 3)
    opt = qzo.ZO([("w", w)], strategy=qzo.SPSA(), rule=qzo.Adam(lr=1e-2), eps=1e-3, seed=0)
    opt.step(lambda: (w - 1).square().sum())
    text = repr(opt.rule)
    assert text.startswith("Adam(") and "lr=0.01" in text and "<2 tensors>" in text and "tensor([" not in text


def test_the_probe_keeps_the_record_and_a_strategy_that_misstates_it_is_stopped():
    """A strategy returns what it decided; what was applied comes from the probe, and a wrong claim is refused
    with the trainables put back."""

    class Misstating(qzo.Strategy):
        forwards_per_step = 2

        def estimate(self, probe, draw_seeds):
            (seed,) = draw_seeds(1)
            f_plus, f_minus = probe.evaluate_group([([(seed, probe.eps)], 0.0), ([(seed, -probe.eps)], 0.0)])
            return qzo.Estimate(direction=[(seed, 1.0)], grad=(f_plus - f_minus) / (2 * probe.eps), loss=f_plus,
                                applied=[(seed, probe.eps)])  # it is -eps that is still on the trainables

    w = torch.ones(6)
    f = lambda: (w ** 2).sum()  # noqa: E731
    with pytest.raises(qzo.QzoError, match="says it left"):
        qzo.ZO([("w", w)], strategy=Misstating(), lr=1e-2, eps=1e-2).step(f)
    torch.testing.assert_close(w, torch.ones(6), rtol=0, atol=1e-6)  # restored in place: to float rounding
    opt = qzo.ZO([("w", w)], strategy=qzo.SPSA(), lr=1e-2, eps=1e-2, seed=4)
    opt.step(f)
    record = opt.last_record
    assert record.seeds == [step_seed(4, 1, 0)] and len(record.losses) == 2 and opt.forwards == 2


def test_evaluations_of_a_failed_step_are_counted():
    calls = []
    w = torch.ones(3)

    def f():
        calls.append(1)
        return float("nan") if len(calls) == 2 else float((w ** 2).sum())

    opt = qzo.ZO([("w", w)], lr=1e-2, eps=1e-2)
    with pytest.raises(qzo.NonFiniteLossError):
        opt.step(f)
    assert opt.forwards == opt.forward_calls == 2 and opt.steps == 0
    torch.testing.assert_close(w, torch.ones(3), rtol=0, atol=1e-6)
