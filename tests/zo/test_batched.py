"""Pool-batched candidate evaluation (qzo.targets.candidates): one stacked forward equals K one-by-one forwards."""

import pytest
import torch

import qzo
from qzo.noise import contract as noise
from qzo.targets.candidates import Candidate
from qzo.data.loss import CausalLMLoss
from qzo.errors import QzoError
from qzo.noise.passes import perturb_params_

from helpers import tiny_config

# Batched rows go through torch.bmm with per-candidate factors and the base layers see a
# K-times larger batch, so float32 GEMMs sum in another order than the one-by-one F.linear
# calls: measured differences are ~1e-7 relative. 1e-5 leaves headroom and is still far
# below the spread between candidates (~4e-3 relative), which the tests also assert.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def build_tiny(tiny_tokenizer):
    """quant -> a tiny Llama (float32, or NF4-quantized) with LoRA r 4 on q,v, built once per module."""
    built = {}

    def build(quant):
        if quant not in built:
            model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant=quant, seed=0)
            params = qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=0)
            for t in params:  # B starts at 0 in LoRA; give both factors values
                t.tensor.add_(0.05 * noise.randn(99, t.stream, t.tensor.numel()).view_as(t.tensor))
            built[quant] = model, params
        return built[quant]

    return build


@pytest.fixture(params=["none", "nf4"])
def any_lora(request, build_tiny):
    return build_tiny(request.param)


@pytest.fixture
def tiny_lora(build_tiny):
    """The NF4 model: the setting batched evaluation is for (the rest is covered by any_lora)."""
    return build_tiny("nf4")


def _lora_factor_modules(model):
    return [m for name, m in model.named_modules() if name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"])]


def test_batched_losses_equal_one_by_one(any_lora, tiny_batch):
    model, params = any_lora
    theta = params.state_dict()
    loss = CausalLMLoss(model, tiny_batch)
    mu = {t.name: noise.randn(7, t.stream, t.tensor.numel()).view_as(t.tensor) for t in params}
    # one seed; two seeds (a guiding vector); one seed plus the dense mean (LDSD)
    candidates = [Candidate(((101, 0.1),)), Candidate(((202, 0.05), (303, -0.05))), Candidate(((404, 0.1),), 0.1),
                  Candidate(((101, -0.1),))]
    batched = loss.evaluate_candidates(params, candidates, mean=mu)
    assert batched.shape == (4,) and batched.dtype == torch.float32
    for t in params:  # the trainables were never written
        assert torch.equal(t.tensor, theta[t.name])
    one_by_one = []
    with torch.no_grad():
        for c in candidates:
            params.load_state_dict(theta)
            perturb_params_(params, [s for s, _ in c.terms], [a for _, a in c.terms], mean=mu, mu_coef=c.mu_coef)
            one_by_one.append(float(model(**tiny_batch).loss))
        params.load_state_dict(theta)
        unperturbed = float(loss())
    want = torch.tensor(one_by_one)
    torch.testing.assert_close(batched, want, rtol=LOSS_RTOL, atol=0)
    # the candidates really differ (a wrapper that ignored them would fail here)
    assert (want - unperturbed).abs().min() > 100 * LOSS_RTOL * unperturbed
    assert want.max() - want.min() > 100 * LOSS_RTOL * unperturbed


def test_loss_object_is_an_ordinary_closure(tiny_lora, tiny_batch):
    model, _ = tiny_lora
    with torch.no_grad():
        # one token mean, summed per chunk (qzo.data.loss) vs in one reduction: equal to float32 rounding
        torch.testing.assert_close(CausalLMLoss(model, tiny_batch)(), model(**tiny_batch).loss, rtol=1e-6, atol=0)
    with pytest.raises(QzoError, match="labels"):
        CausalLMLoss(model, {k: v for k, v in tiny_batch.items() if k != "labels"})


STRATEGIES = {
    "gv": lambda batched: qzo.GV(pool=4, split=0.5, batched=batched),
    "greedy": lambda batched: qzo.Greedy(pool=3, batched=batched),
    "ldsd": lambda batched: qzo.LDSD(candidates=4, sigma=1.0, lr_mu=0.5, batched=batched),
    "fzoo": lambda batched: qzo.FZOO(probes=4, batched=batched),
    "fzoo_mean": lambda batched: qzo.FZOO(probes=3, baseline="mean", batched=batched),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_batched_run_equals_unbatched(strategy, tiny_lora, tiny_batch):
    model, params = tiny_lora
    theta = params.state_dict()
    runs = {}
    for batched in (False, True):
        params.load_state_dict(theta)
        opt = qzo.ZO(params, strategy=STRATEGIES[strategy](batched), rule=qzo.SGD(lr=1e-2), eps=1e-2, seed=3)
        records = []
        for _ in range(3):
            opt.step(CausalLMLoss(model, tiny_batch))
            records.append(opt.last_record)
        runs[batched] = (records, params.state_dict(), opt)
    params.load_state_dict(theta)
    (rec_a, values_a, opt_a), (rec_b, values_b, opt_b) = runs[False], runs[True]
    assert [r.seeds for r in rec_a] == [r.seeds for r in rec_b]
    assert [[s for s, _ in r.direction] for r in rec_a] == [[s for s, _ in r.direction] for r in rec_b]
    for ra, rb in zip(rec_a, rec_b):
        assert rb.losses == pytest.approx(ra.losses, rel=1e-4)
        # FZOO's coefficients are loss differences over eps: the losses' float rounding, amplified by 1/eps
        size = max(abs(c) for _, c in ra.direction)
        assert [c for _, c in rb.direction] == pytest.approx([c for _, c in ra.direction], rel=0, abs=1e-3 * size)
        assert rb.direction_mu == ra.direction_mu
    # K evaluations a pool either way; batched runs them in one forward
    k = opt_a.strategy.forwards_per_step
    pool = {"gv": k - 2, "fzoo_mean": k}.get(strategy, k - 1)  # evaluations besides the pool: GV 2, mean FZOO 0
    assert opt_a.forwards == opt_b.forwards == 3 * k
    assert opt_a.forward_calls == 3 * k
    assert opt_b.forward_calls == 3 * (k - pool + 1)
    assert opt_b.state_dict()["forward_calls"] == opt_b.forward_calls
    for name, value in values_a.items():
        moved = (value - theta[name]).abs().max().item()
        assert moved > 1e-4
        # the walks differ in float rounding (theta -> c1 -> ... vs theta -> v), amplified by 1/(2 eps)
        torch.testing.assert_close(values_b[name], value, rtol=0, atol=moved * 2e-2)
    if strategy == "ldsd":
        for name, mu in opt_a.strategy.mu.items():
            size = mu.abs().max().item()
            assert size > 1e-3
            torch.testing.assert_close(opt_b.strategy.mu[name], mu, rtol=0, atol=size * 1e-3)


class _PoolOnly(qzo.Strategy):
    """Evaluates one batched pool and checks, from inside the step, that nothing is applied."""

    def __init__(self, theta):
        self.theta, self.seen = theta, None

    def estimate(self, probe, draw_seeds):
        seeds = draw_seeds(3)
        losses = probe.evaluate_batch([([(s, probe.eps)], 0.0) for s in seeds])
        self.seen = (dict(probe.applied), probe.applied_mu, losses)
        self.untouched = all(torch.equal(t.tensor, self.theta[t.name]) for t in probe.params)
        return qzo.Estimate(direction=[], grad=0.0, applied=[], losses=losses, loss=min(losses), seeds=seeds)


def test_trainables_stay_at_theta_during_a_batched_pool(tiny_lora, tiny_batch):
    model, params = tiny_lora
    theta = params.state_dict()
    strat = _PoolOnly(theta)
    opt = qzo.ZO(params, strategy=strat, rule=qzo.SGD(lr=1e-2), eps=1e-2)
    opt.step(CausalLMLoss(model, tiny_batch))
    applied, applied_mu, losses = strat.seen
    assert applied == {} and applied_mu == 0.0 and len(losses) == 3
    assert strat.untouched
    assert opt.forwards == 3 and opt.forward_calls == 1
    for t in params:
        assert torch.equal(t.tensor, theta[t.name])


def test_lora_forwards_restored_after_an_exception(tiny_lora, tiny_batch):
    model, params = tiny_lora
    theta = params.state_dict()
    with torch.no_grad():
        before = float(model(**tiny_batch).loss)
    factors = _lora_factor_modules(model)
    assert len(factors) == len(list(params))  # one factor linear per trainable

    def boom(module, args, output):
        assert any("forward" in f.__dict__ for f in factors)  # the candidates' forwards are in place here
        raise RuntimeError("boom inside the stacked forward")

    layer = model.get_decoder().layers[-1]
    handle = layer.register_forward_hook(boom)
    candidates = [Candidate(((5, 0.1),)), Candidate(((6, 0.1),))]
    try:
        with pytest.raises(RuntimeError, match="boom"):
            CausalLMLoss(model, tiny_batch).evaluate_candidates(params, candidates)
    finally:
        handle.remove()
    assert not any("forward" in f.__dict__ for f in factors)
    for t in params:
        assert torch.equal(t.tensor, theta[t.name])
    with torch.no_grad():
        assert float(model(**tiny_batch).loss) == before


def test_batched_needs_a_batching_closure(tiny_lora, tiny_batch):
    model, params = tiny_lora
    theta = params.state_dict()
    opt = qzo.ZO(params, strategy=qzo.GV(pool=2, batched=True), rule=qzo.SGD(lr=1e-2), eps=1e-2)
    with pytest.raises(QzoError, match=r"batched=True.*qzo\.CausalLMLoss\(model, batch\)"):
        opt.step(lambda: model(**tiny_batch).loss)
    for t in params:
        assert torch.equal(t.tensor, theta[t.name])


def test_batched_refuses_non_lora_trainables(tiny_lora, tiny_batch):
    model, params = tiny_lora
    w = torch.zeros(4)
    opt = qzo.ZO([("w", w)], strategy=qzo.Greedy(pool=2, batched=True), rule=qzo.SGD(lr=1e-2), eps=1e-2)
    with pytest.raises(QzoError, match="'w' is not a lora_A/lora_B weight"):
        opt.step(CausalLMLoss(model, tiny_batch))
    assert torch.equal(w, torch.zeros(4))
    # a copy of a LoRA tensor has the right name and shape but is not the live weight
    copies = [(t.name, t.tensor.clone()) for t in params]
    with pytest.raises(QzoError, match="not a lora_A/lora_B weight"):
        CausalLMLoss(model, tiny_batch).evaluate_candidates(qzo.ParamSet(copies), [Candidate(((1, 0.1),))])


def test_batching_is_the_optimizers_option_and_the_strategys_flag_still_works(tiny_lora, tiny_batch):
    """ZO(batched=True) batches any pool strategy; GV(batched=True), the older spelling, runs the same step."""
    model, params = tiny_lora
    theta = params.state_dict()
    runs = []
    for opt_flag, strategy_flag in ((True, False), (False, True)):
        params.load_state_dict(theta)
        opt = qzo.ZO(params, strategy=qzo.GV(pool=3, batched=strategy_flag), rule=qzo.SGD(lr=1e-2), eps=1e-2,
                     seed=2, batched=opt_flag)
        opt.step(CausalLMLoss(model, tiny_batch))
        assert opt.batched and opt.forward_calls == 3 and opt.forwards == 5  # the pool in one forward, then +-v
        runs.append((opt.last_record.losses, params.state_dict()))
    params.load_state_dict(theta)
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in theta)
