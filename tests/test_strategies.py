"""Steered strategies (GV, Greedy, LDSD) and rules (SGD, Momentum, Adam, Sign) against plain references."""

import pytest
import torch

import qzo
from qzo import noise
from qzo.strategies.ldsd import leave_one_out

from conftest import tiny_config
from zo_reference import PlainZO

STRATEGIES = {
    "spsa": lambda: qzo.SPSA(),
    "gv": lambda: qzo.GV(pool=4, split=0.5),
    "greedy": lambda: qzo.Greedy(pool=3),
    "ldsd": lambda: qzo.LDSD(candidates=4, sigma=1.0, lr_mu=0.5),
}
RULES = {
    "sgd": lambda: qzo.SGD(lr=1e-2, weight_decay=0.1),
    "momentum": lambda: qzo.Momentum(lr=5e-3, beta=0.9, weight_decay=0.1),
    "adam": lambda: qzo.Adam(lr=1e-2, weight_decay=0.1),
    "sign": lambda: qzo.Sign(lr=1e-2, weight_decay=0.1),
}
PLAIN_KW = {"gv": dict(pool=4, split=0.5), "greedy": dict(pool=3), "ldsd": dict(candidates=4, sigma=1.0, lr_mu=0.5),
            "spsa": {}}
PLAIN_LR = {"sgd": 1e-2, "momentum": 5e-3, "adam": 1e-2, "sign": 1e-2}


@pytest.fixture(scope="module")
def tiny_llama_pair(smol_tokenizer):
    def build():
        model, _ = qzo.load(tiny_config(len(smol_tokenizer)), quant="nf4", seed=0)
        params = qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=0)
        for t in params:  # B starts at 0 in LoRA; give both factors values
            t.tensor.add_(0.05 * noise.randn(99, t.stream, t.tensor.numel()).view_as(t.tensor))
        return model, params

    return build(), build()


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_rule_equals_plain_reference(strategy, rule, tiny_llama_pair, tiny_batch):
    (model_a, params_a), (model_b, params_b) = tiny_llama_pair
    init = params_a.state_dict()
    params_b.load_state_dict(init)
    opt = qzo.ZO(params_a, strategy=STRATEGIES[strategy](), rule=RULES[rule](), eps=1e-2, seed=5)
    records = []
    for _ in range(5):
        opt.step(lambda: model_a(**tiny_batch).loss)
        records.append(opt.last_record)
    named_b = [(t.name, t.tensor) for t in params_b]
    plain = PlainZO(named_b, strategy, rule, lr=PLAIN_LR[rule], eps=1e-2, seed=5, wd=0.1, **PLAIN_KW[strategy])
    for step in range(1, 6):
        plain.step(lambda: model_b(**tiny_batch).loss, step)
    assert [r.seeds for r in records] == [seeds for seeds, _ in plain.log]
    for r, (_, losses) in zip(records, plain.log):
        assert r.losses == pytest.approx(losses, rel=1e-4, abs=1e-5)
    assert opt.forwards == 5 * opt.strategy.forwards_per_step
    for ta, tb in zip(params_a, params_b):
        moved = (tb.tensor - init[tb.name]).abs().max().item()
        assert moved > 1e-3
        # in-place round trips vs fresh copies: float rounding amplified by 1/(2 eps)
        torch.testing.assert_close(ta.tensor, tb.tensor, rtol=0, atol=moved * 2e-2)
    if strategy == "ldsd":
        for name, mu in opt.strategy.mu.items():
            size = plain.mu[name].abs().max().item()
            assert size > 1e-3
            torch.testing.assert_close(mu, plain.mu[name], rtol=0, atol=size * 2e-2)
    # restore params for the next parametrization
    params_a.load_state_dict(init)
    params_b.load_state_dict(init)


def test_ldsd_mean_update_on_a_hand_worked_example():
    """Three candidates, one scalar-per-element tensor, sigma 2, lr_mu 0.3, losses forced."""
    w = torch.zeros(3)
    losses = iter([1.0, 3.0, 2.0, 1.5])  # three candidates, then f(theta - eps z_best)
    strat = qzo.LDSD(candidates=3, sigma=2.0, lr_mu=0.3)
    opt = qzo.ZO([("w", w)], strategy=strat, rule=qzo.SGD(lr=1e-9), eps=1e-3, seed=11)
    strat.mu["w"].fill_(0.5)
    opt.step(lambda: next(losses))
    seeds = opt.last_record.seeds
    e = [noise.randn(s, noise.stream_id("w"), 3) for s in seeds]
    # c_i = f_i - mean of the others: 1 - 2.5, 3 - 1.5, 2 - 2
    c = [-1.5, 1.5, 0.0]
    assert leave_one_out([1.0, 3.0, 2.0]) == c
    z = [0.5 + 2.0 * ei for ei in e]  # the candidates that were evaluated
    want = 0.5 - 0.3 * sum(ci * (zi - 0.5) for ci, zi in zip(c, z)) / (3 * 2.0**2)
    torch.testing.assert_close(strat.mu["w"], want, rtol=1e-6, atol=1e-6)
    # the direction is the best candidate (loss 1.0 -> seed 0) including the mean
    rec = opt.last_record
    assert rec.direction == [(seeds[0], 2.0)]
    assert rec.grad == pytest.approx((1.0 - 1.5) / 2e-3)


def test_ldsd_noise_differs_from_fresh_draws():
    """The mean moves along the evaluated candidates, not along new noise (the authors' bug)."""
    w = torch.zeros(50)
    strat = qzo.LDSD(candidates=3, sigma=1.0, lr_mu=1.0)
    opt = qzo.ZO([("w", w)], strategy=strat, rule=qzo.SGD(lr=1e-9), eps=1e-3, seed=2)
    vals = iter([0.0, 1.0, 2.0, 0.5])
    opt.step(lambda: next(vals))
    e = [noise.randn(s, noise.stream_id("w"), 50) for s in opt.last_record.seeds]
    basis = torch.stack(e, 1).double()
    mu = strat.mu["w"].double().unsqueeze(1)
    coef = torch.linalg.lstsq(basis, mu).solution
    assert mu.norm() > 0.1
    assert (basis @ coef - mu).norm() < 1e-5 * mu.norm()  # mu lies in the span of the evaluated e_i


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_lowers_least_squares(strategy):
    g = torch.Generator().manual_seed(0)
    X, w_true = torch.randn(64, 10, generator=g), torch.randn(10, 1, generator=g)
    y = X @ w_true
    w = torch.zeros(10, 1)
    f = lambda: ((X @ w - y) ** 2).mean()
    start = float(f())
    lr = {"spsa": 1e-2, "gv": 5e-3, "greedy": 1e-2, "ldsd": 1e-2}[strategy]
    opt = qzo.ZO([("w", w)], strategy=STRATEGIES[strategy](), rule=qzo.SGD(lr=lr), eps=1e-3)
    for _ in range(150):
        opt.step(f)
    assert float(f()) < 0.1 * start


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_lowers_tiny_llama_loss(strategy, smol_tokenizer, tiny_batch):
    model, _ = qzo.load(tiny_config(len(smol_tokenizer)), quant="nf4", seed=0)
    params = qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=0)
    f = lambda: model(**tiny_batch).loss
    with torch.no_grad():
        start = float(f())
    opt = qzo.ZO(params, strategy=STRATEGIES[strategy](), rule=qzo.SGD(lr=2e-2), eps=1e-2, seed=0)
    for _ in range(15):
        opt.step(f)
    with torch.no_grad():
        assert float(f()) < start - 0.05


def test_schedules():
    s = qzo.Schedule("cosine", total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [round(s.factor(i), 4) for i in (1, 2)] == [0.5, 1.0]
    assert s.factor(10) == pytest.approx(0.1)
    lin = qzo.Schedule("linear", total_steps=4)
    assert [lin.factor(i) for i in (1, 2, 3, 4)] == [0.75, 0.5, 0.25, 0.0]
    opt = qzo.ZO([torch.zeros(2)], rule=qzo.SGD(lr=2.0), schedule=lin)
    opt.step(lambda: 0.0)
    assert opt.last_record.lr == 1.5
    with pytest.raises(ValueError, match="total_steps"):
        qzo.Schedule("cosine")


def test_strategy_argument_errors():
    with pytest.raises(ValueError, match="pool >= 2"):
        qzo.GV(pool=1)
    with pytest.raises(ValueError, match="split"):
        qzo.GV(split=1.0)
    with pytest.raises(ValueError, match="candidates >= 2"):
        qzo.LDSD(candidates=1)
    with pytest.raises(ValueError, match="beta"):
        qzo.Momentum(lr=1e-3, beta=1.0)
