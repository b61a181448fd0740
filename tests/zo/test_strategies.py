"""Strategies (SPSA, GV, Greedy, LDSD, FZOO, ConMeZO, PerExample), rules and scale-free steps vs plain references."""

import pytest
import torch

import qzo
from qzo.noise import contract as noise
from qzo.zo.strategies.ldsd import leave_one_out

from helpers import tiny_config
from zo_reference import PlainZO

STRATEGIES = {
    "spsa": lambda: qzo.SPSA(),
    "gv": lambda: qzo.GV(pool=4, split=0.5),
    "greedy": lambda: qzo.Greedy(pool=3),
    "ldsd": lambda: qzo.LDSD(candidates=4, sigma=1.0, lr_mu=0.5),
    "fzoo": lambda: qzo.FZOO(probes=4),
    "fzoo_mean": lambda: qzo.FZOO(probes=3, baseline="mean"),
    "conmezo": lambda: qzo.ConMeZO(theta=1.2, beta=0.8),
}
RULES = {
    "sgd": lambda: qzo.SGD(lr=1e-2, weight_decay=0.1),
    "momentum": lambda: qzo.Momentum(lr=5e-3, beta=0.9, weight_decay=0.1),
    "adam": lambda: qzo.Adam(lr=1e-2, weight_decay=0.1),
    "sign": lambda: qzo.Sign(lr=1e-2, weight_decay=0.1),
    "sign_momentum": lambda: qzo.SignMomentum(lr=1e-2, beta=0.9, weight_decay=0.1),
}
PLAIN_KW = {"gv": dict(pool=4, split=0.5), "greedy": dict(pool=3), "ldsd": dict(candidates=4, sigma=1.0, lr_mu=0.5),
            "spsa": {}, "fzoo": dict(probes=4), "fzoo_mean": dict(probes=3, baseline="mean"),
            "conmezo": dict(theta=1.2, cone_beta=0.8)}
PLAIN_NAME = {"fzoo_mean": "fzoo"}
PLAIN_LR = {"sgd": 1e-2, "momentum": 5e-3, "adam": 1e-2, "sign": 1e-2, "sign_momentum": 1e-2}


def _assert_close_up_to_rare_flips(got, want, atol, flip, lr, steps=5):
    """allclose, except that Sign and Adam may flip a few elements whose slope rounds to either side of 0.

    Sign's step is lr * sign(g d) and Adam's first steps are about that too, so where g d is
    ~1e-7 the float rounding of two correct implementations picks opposite signs: such an
    element then differs by up to 2 lr a step. At most 5% of the elements may do that: a
    direction that mixes several seeds by loss-derived weights (FZOO) carries the losses'
    rounding into its shape, so more of its elements sit near 0 in one implementation and
    across it in the other (measured: 4 of 256 after 5 steps).
    """
    if not flip:
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
        return
    off = (got - want).abs() > atol
    assert off.float().mean().item() <= 0.05, f"{int(off.sum())} of {off.numel()} elements differ"
    assert (got - want).abs().max().item() <= 2 * lr * steps + atol


def _assert_moved_alike_and_reset(params_a, params_b, init, rel):
    """Both sets moved from ``init`` and agree to ``rel`` of the move; then both go back to ``init``."""
    for ta, tb in zip(params_a, params_b):
        moved = (tb.tensor - init[tb.name]).abs().max().item()
        assert moved > 1e-4
        torch.testing.assert_close(ta.tensor, tb.tensor, rtol=0, atol=moved * rel)
    params_a.load_state_dict(init)
    params_b.load_state_dict(init)


@pytest.fixture(scope="module")
def tiny_llama_pair(tiny_tokenizer):
    def build():
        model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant="nf4", seed=0)
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
    # Sign on FZOO: the loss-weighted direction's rounding flips a few elements' signs (see
    # _assert_close_up_to_rare_flips), and from step 3 the flipped elements move the losses
    # themselves apart by more than float rounding: two steps compare, five would compound
    # SignMomentum on Greedy: an element whose momentum rounds across 0 moves 2 lr apart, and Greedy's
    # ranking of its pool then follows the losses that moved: the same two steps compare
    steps = 2 if (rule.startswith("sign") and strategy.startswith("fzoo")
                  or (rule, strategy) == ("sign_momentum", "greedy")) else 5
    records = []
    for _ in range(steps):
        opt.step(lambda: model_a(**tiny_batch).loss)
        records.append(opt.last_record)
    named_b = [(t.name, t.tensor) for t in params_b]
    plain = PlainZO(named_b, PLAIN_NAME.get(strategy, strategy), rule, lr=PLAIN_LR[rule], eps=1e-2, seed=5, wd=0.1,
                    **PLAIN_KW[strategy])
    for step in range(1, steps + 1):
        plain.step(lambda: model_b(**tiny_batch).loss, step)
    assert [r.seeds for r in records] == [seeds for seeds, _ in plain.log]
    for r, (_, losses) in zip(records, plain.log):
        assert r.losses == pytest.approx(losses, rel=1e-4, abs=1e-5)
    assert opt.forwards == steps * opt.strategy.forwards_per_step
    for ta, tb in zip(params_a, params_b):
        moved = (tb.tensor - init[tb.name]).abs().max().item()
        assert moved > 1e-3
        # in-place round trips vs fresh copies: float rounding amplified by 1/(2 eps)
        _assert_close_up_to_rare_flips(ta.tensor, tb.tensor, atol=moved * 3e-2,
                                       flip=rule in ("sign", "sign_momentum", "adam"), lr=PLAIN_LR[rule], steps=steps)
    if strategy == "conmezo":
        for name, m in opt.strategy.m.items():
            size = plain.mu[name].abs().max().item()
            assert size > 1e-4
            # Sign and Adam may flip near-zero elements (see above), which moves later slopes a little
            flips = rule in ("sign", "sign_momentum", "adam")
            torch.testing.assert_close(m, plain.mu[name], rtol=0, atol=size * (6e-2 if flips else 3e-2))
    if strategy == "ldsd":
        for name, mu in opt.strategy.mu.items():
            size = plain.mu[name].abs().max().item()
            assert size > 1e-3
            torch.testing.assert_close(mu, plain.mu[name], rtol=0, atol=size * 2e-2)
    # restore params for the next parametrization
    params_a.load_state_dict(init)
    params_b.load_state_dict(init)


@pytest.mark.parametrize("normalize", ["spread", "rms"])
@pytest.mark.parametrize("strategy", ["spsa", "gv", "fzoo", "fzoo_mean", "conmezo"])
def test_scale_free_steps_equal_plain_reference(strategy, normalize, tiny_llama_pair, tiny_batch):
    (model_a, params_a), (model_b, params_b) = tiny_llama_pair
    init = params_a.state_dict()
    params_b.load_state_dict(init)
    lr, clip = 2e-3, (0.5 if normalize == "rms" else None)  # rms steps are ~1: the clip bites too
    opt = qzo.ZO(params_a, strategy=STRATEGIES[strategy](), rule=qzo.SGD(lr=lr), eps=1e-2, seed=3,
                 normalize=normalize, clip=clip)
    plain = PlainZO([(t.name, t.tensor) for t in params_b], PLAIN_NAME.get(strategy, strategy), "sgd", lr=lr,
                    eps=1e-2, seed=3, normalize=normalize, clip=clip, **PLAIN_KW[strategy])
    grads = []
    for step in range(1, 6):
        opt.step(lambda: model_a(**tiny_batch).loss)
        grads.append(opt.last_record.grad)
        plain.step(lambda: model_b(**tiny_batch).loss, step)
    if normalize == "spread":  # a unit-free slope: |g| eps / sigma is O(1), whatever the loss scale
        assert all(0 < abs(g) < 10 for g in grads)
    _assert_moved_alike_and_reset(params_a, params_b, init, rel=2e-2)


def test_fzoo_on_a_hand_worked_example():
    """Two probes against f(theta), forced losses: the update is sum_i (f_i - f0) / (N eps) z_i."""
    w = torch.zeros(4)
    losses = iter([2.0, 2.5, 1.0])  # f(theta), then the probes
    opt = qzo.ZO([("w", w)], strategy=qzo.FZOO(probes=2), rule=qzo.SGD(lr=0.1), eps=0.5, seed=7)
    assert opt.step(lambda: next(losses)) == 2.0  # the reported loss is f(theta)
    z = [noise.randn(s, noise.stream_id("w"), 4) for s in opt.last_record.seeds]
    want = -0.1 * ((2.5 - 2.0) / (2 * 0.5) * z[0] + (1.0 - 2.0) / (2 * 0.5) * z[1])
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)
    assert opt.forwards == 3 and opt.last_record.losses == [2.0, 2.5, 1.0]
    # the spread normalization divides by the probes' std (0.75 here), f(theta) left out: FZOO's update
    w.zero_()
    losses = iter([2.0, 2.5, 1.0])
    opt = qzo.ZO([("w", w)], strategy=qzo.FZOO(probes=2), rule=qzo.SGD(lr=0.1), eps=0.5, seed=7,
                 normalize="spread")
    opt.step(lambda: next(losses))
    want = -0.1 * ((2.5 - 2.0) * z[0] + (1.0 - 2.0) * z[1]) / (2 * 0.75)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


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
    lr = {"spsa": 1e-2, "gv": 5e-3, "greedy": 1e-2, "ldsd": 1e-2, "fzoo": 1e-2, "fzoo_mean": 1e-2,
          "conmezo": 1e-2}[strategy]
    opt = qzo.ZO([("w", w)], strategy=STRATEGIES[strategy](), rule=qzo.SGD(lr=lr), eps=1e-3)
    for _ in range(150):
        opt.step(f)
    assert float(f()) < 0.1 * start


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_lowers_tiny_llama_loss(strategy, tiny_tokenizer, tiny_batch):
    model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant="nf4", seed=0)
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
    with pytest.raises(ValueError, match="probes >= 2"):
        qzo.FZOO(probes=1, baseline="mean")
    with pytest.raises(ValueError, match="baseline"):
        qzo.FZOO(baseline="median")
    with pytest.raises(ValueError, match="theta"):
        qzo.ConMeZO(theta=2.0)
    with pytest.raises(ValueError, match="normalize"):
        qzo.ZO([torch.zeros(2)], normalize="std")
    with pytest.raises(ValueError, match="beta"):
        qzo.Momentum(lr=1e-3, beta=1.0)


def test_b_only_lora_draws_no_noise_on_a_and_lowers_the_loss(tiny_tokenizer, tiny_batch):
    # LoRA-aware directions: only the B factors are perturbed and moved (A keeps its init)
    model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant="nf4", seed=0)
    params = qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=0)
    b_only = params.select("*lora_B*")
    assert len(b_only) == len(params) // 2 and all("lora_B" in t.name for t in b_only)
    assert all(bt.stream == t.stream for bt in b_only for t in params if t.name == bt.name)  # the same noise
    before = params.state_dict()
    f = lambda: model(**tiny_batch).loss  # noqa: E731
    with torch.no_grad():
        start = float(f())
    opt = qzo.ZO(b_only, strategy=qzo.SPSA(), rule=qzo.SGD(lr=2e-2), eps=1e-2, seed=0)
    for _ in range(15):
        opt.step(f)
    after = params.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before if "lora_A" in n)
    assert all(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n)
    with torch.no_grad():
        assert float(f()) < start - 0.05
    with pytest.raises(ValueError, match="no trainable matches"):
        params.select("*lora_C*")


def _per_row(model, batch):
    """(token-mean loss of each row, its labelled-token count) at the model's current values."""
    from qzo.data.loss import decoder_and_head, row_losses

    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        hidden = decoder(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
        sums, counts = row_losses(hidden, batch["labels"], head)
    return sums / counts, counts


def test_row_losses_weight_back_to_the_batch_loss(tiny_llama_pair, tiny_batch):
    (model, _), _ = tiny_llama_pair
    losses, counts = _per_row(model, tiny_batch)
    assert losses.shape == (2,) and counts.tolist() == [int(n) for n in counts.tolist()] and (counts > 0).all()
    with torch.no_grad():
        want = model(**tiny_batch).loss
    torch.testing.assert_close((losses * counts).sum() / counts.sum(), want, rtol=1e-5, atol=0)


def test_per_example_rows_equal_their_one_by_one_evaluation(tiny_llama_pair, tiny_batch):
    (model, params), _ = tiny_llama_pair
    from qzo.targets.candidates import Candidate
    from qzo.noise.passes import perturb_params_

    seeds, eps = [11, 12], 1e-2
    got, counts = qzo.CausalLMLoss(model, tiny_batch).evaluate_rows(params, [Candidate(((s, eps),)) for s in seeds])
    before = params.state_dict()
    for i, s in enumerate(seeds):  # row i alone, with row i's perturbation applied in place
        perturb_params_(params, [s], [eps])
        row, n = _per_row(model, tiny_batch)
        perturb_params_(params, [s], [-eps])
        assert float(n[i]) == float(counts[i])
        torch.testing.assert_close(got[i], row[i], rtol=1e-5, atol=1e-6)
    params.load_state_dict(before)
    unperturbed, _ = _per_row(model, tiny_batch)
    assert (got - unperturbed).abs().max() > 1e-5  # the rows really saw their perturbations


@pytest.mark.parametrize("normalize", [None, "spread"])
def test_per_example_equals_plain_reference(normalize, tiny_llama_pair, tiny_batch):
    (model_a, params_a), (model_b, params_b) = tiny_llama_pair
    init = params_a.state_dict()
    params_b.load_state_dict(init)
    lr = 1e-2 if normalize is None else 2e-3
    opt = qzo.ZO(params_a, strategy=qzo.PerExample(), rule=qzo.SGD(lr=lr), eps=1e-2, seed=4, normalize=normalize)
    plain = PlainZO([(t.name, t.tensor) for t in params_b], "per_example", "sgd", lr=lr, eps=1e-2, seed=4,
                    normalize=normalize)
    for step in range(1, 6):
        loss = opt.step(qzo.CausalLMLoss(model_a, tiny_batch))
        want = plain.step(lambda: _per_row(model_b, tiny_batch), step)
        assert loss == pytest.approx(want, rel=1e-4)
        assert len(opt.last_record.seeds) == 2 and opt.last_record.forwards == 2 * step
    _assert_moved_alike_and_reset(params_a, params_b, init, rel=3e-2)


def test_per_example_lowers_tiny_llama_loss_and_needs_a_row_closure(tiny_tokenizer, tiny_batch):
    model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant="nf4", seed=0)
    params = qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=0)
    loss = qzo.CausalLMLoss(model, tiny_batch)
    with torch.no_grad():
        start = float(loss())
    opt = qzo.ZO(params, strategy=qzo.PerExample(), rule=qzo.SGD(lr=2e-2), eps=1e-2, seed=0)
    for _ in range(15):
        opt.step(loss)
    with torch.no_grad():
        assert float(loss()) < start - 0.05
    with pytest.raises(qzo.QzoError, match="CausalLMLoss"):
        opt.step(lambda: model(**tiny_batch).loss)


@pytest.mark.parametrize("strategy,rule,scale,steps", [
    ("spsa", "sgd", {"*lora_A*": 0.5}, None),
    ("fzoo", "adam", {"*lora_A*": 0.5, "*v_proj*": 2.0}, None),
    ("conmezo", "sgd", {"*lora_A*": 0.0}, 3),  # B only for 3 steps, then both
    ("ldsd", "momentum", {"*lora_A*": 0.25}, 2),
    ("gv", "sgd", {"*lora_A*": 0.0}, None),
])
def test_noise_scales_equal_plain_reference(strategy, rule, scale, steps, tiny_llama_pair, tiny_batch):
    """LoRA-aware directions: each tensor draws its scale times its plain noise, in every pass."""
    (model_a, params_a), (model_b, params_b) = tiny_llama_pair
    init = params_a.state_dict()
    params_b.load_state_dict(init)
    rules = {"sgd": qzo.SGD(lr=1e-2), "adam": qzo.Adam(lr=1e-2), "momentum": qzo.Momentum(lr=5e-3)}
    opt = qzo.ZO(params_a, strategy=STRATEGIES[strategy](), rule=rules[rule], eps=1e-2, seed=5, noise_scale=scale,
                 noise_scale_steps=steps)
    plain = PlainZO([(t.name, t.tensor) for t in params_b], strategy, rule, lr=PLAIN_LR[rule], eps=1e-2, seed=5,
                    noise_scale=scale, noise_scale_steps=steps, **PLAIN_KW[strategy])
    frozen_until = steps if steps is not None else 5
    for step in range(1, 6):
        opt.step(lambda: model_a(**tiny_batch).loss)
        plain.step(lambda: model_b(**tiny_batch).loss, step)
        if step == frozen_until and scale.get("*lora_A*") == 0.0:
            assert all(torch.equal(t.tensor, init[t.name]) for t in params_a if "lora_A" in t.name)
    if steps is not None and scale.get("*lora_A*") == 0.0:  # A draws noise again after the first steps
        assert all(not torch.equal(t.tensor, init[t.name]) for t in params_a if "lora_A" in t.name)
    for ta, tb in zip(params_a, params_b):
        moved = (tb.tensor - init[tb.name]).abs().max().item()
        if moved == 0:
            assert torch.equal(ta.tensor, tb.tensor)
            continue
        _assert_close_up_to_rare_flips(ta.tensor, tb.tensor, atol=moved * 3e-2, flip=rule == "adam",
                                       lr=PLAIN_LR[rule])
    params_a.load_state_dict(init)
    params_b.load_state_dict(init)


def test_zero_noise_on_a_is_b_only_bit_exactly(tiny_llama_pair, tiny_batch):
    (model_a, params_a), (model_b, params_b) = tiny_llama_pair
    init = params_a.state_dict()
    params_b.load_state_dict(init)
    scaled = qzo.ZO(params_a, rule=qzo.SGD(lr=1e-2), eps=1e-2, seed=2, noise_scale={"*lora_A*": 0})
    selected = qzo.ZO(params_b.select("*lora_B*"), rule=qzo.SGD(lr=1e-2), eps=1e-2, seed=2)
    for _ in range(3):
        scaled.step(lambda: model_a(**tiny_batch).loss)
        selected.step(lambda: model_b(**tiny_batch).loss)
    for ta, tb in zip(params_a, params_b):
        assert torch.equal(ta.tensor, tb.tensor)
    params_a.load_state_dict(init)
    params_b.load_state_dict(init)


def test_noise_scales_resume_bit_exactly_across_the_switch(tiny_llama_pair, tiny_batch):
    """A run that stops inside the B-only steps and resumes ends where the uninterrupted run does."""
    (model_a, params_a), _ = tiny_llama_pair
    init = params_a.state_dict()
    make = lambda: qzo.ZO(params_a, strategy=qzo.ConMeZO(theta=1.2, beta=0.8), rule=qzo.Adam(lr=1e-2), eps=1e-2,
                          seed=1, noise_scale={"*lora_A*": 0}, noise_scale_steps=3)
    f = lambda: model_a(**tiny_batch).loss
    whole = make()
    for _ in range(5):
        whole.step(f)
    want = params_a.state_dict()
    params_a.load_state_dict(init)
    first = make()
    for _ in range(2):
        first.step(f)
    saved, values = first.state_dict(), params_a.state_dict()
    params_a.load_state_dict(values)
    second = make()
    second.load_state_dict(saved)
    for _ in range(3):
        second.step(f)
    assert all(torch.equal(v, params_a.state_dict()[k]) for k, v in want.items())
    params_a.load_state_dict(init)


def test_noise_scale_errors_name_the_problem(tiny_llama_pair):
    (_, params), _ = tiny_llama_pair
    with pytest.raises(ValueError, match="matches no trainable"):
        qzo.ZO(params, noise_scale={"*lora_C*": 0})
    with pytest.raises(ValueError, match=">= 0"):
        qzo.ZO(params, noise_scale={"*lora_A*": -1})
    with pytest.raises(ValueError, match="nothing would train"):
        qzo.ZO(params, noise_scale={"*lora_*": 0})
    with pytest.raises(ValueError, match="no noise_scale was given"):
        qzo.ZO(params, noise_scale_steps=3)


@pytest.mark.parametrize("memory,unit", [(True, False), (False, True), (True, True)])
def test_gv_memory_and_unit_direction_equal_the_plain_reference(memory, unit, tiny_llama_pair, tiny_batch):
    """The authors' GV (pool 2 with the best seed kept and re-scored) and a unit-norm v, against dense z's."""
    (model_a, params_a), (model_b, params_b) = tiny_llama_pair
    init = params_a.state_dict()
    params_b.load_state_dict(init)
    opt = qzo.ZO(params_a, strategy=qzo.GV(pool=2, memory=memory, unit=unit), rule=qzo.SGD(lr=1e-2), eps=1e-2,
                 seed=5)
    plain = PlainZO([(t.name, t.tensor) for t in params_b], "gv", "sgd", lr=1e-2, eps=1e-2, seed=5, pool=2,
                    memory=memory, unit=unit)
    for step in range(1, 6):
        opt.step(lambda: model_a(**tiny_batch).loss)
        plain.step(lambda: model_b(**tiny_batch).loss, step)
        seeds, losses = plain.log[-1]
        assert opt.last_record.seeds == seeds and opt.last_record.losses == pytest.approx(losses, rel=1e-4, abs=1e-5)
        if memory and step > 1:  # the last step's best seed is scored again, one new seed beside it
            assert seeds[0] in plain.log[-2][0] and len(set(seeds)) == 2
    assert opt.forwards == 5 * 4  # the kept seed's score is an evaluation like the others
    _assert_moved_alike_and_reset(params_a, params_b, init, rel=3e-2)


def test_gv_memory_resumes_bit_exactly(tiny_llama_pair, tiny_batch):
    (model, params), _ = tiny_llama_pair
    init = params.state_dict()

    def run(steps, state=None):
        opt = qzo.ZO(params, strategy=qzo.GV(pool=2, memory=True), rule=qzo.SGD(lr=1e-2), eps=1e-2, seed=5)
        if state is not None:
            opt.load_state_dict(state)
        for _ in range(steps):
            opt.step(lambda: model(**tiny_batch).loss)
        return opt

    params.load_state_dict(init)
    full = run(4)
    want = {k: v.clone() for k, v in params.state_dict().items()}
    params.load_state_dict(init)
    half = run(2)
    state = half.state_dict()
    assert state["strategy"]["kept"] == half.strategy.kept is not None
    run(2, state)
    for k, v in params.state_dict().items():
        assert torch.equal(v, want[k])
    assert full.strategy.kept is not None
    params.load_state_dict(init)


@pytest.mark.parametrize("strategy", ["spsa", "gv"])
def test_subsampled_steps_equal_the_plain_reference(strategy, tiny_llama_pair, tiny_batch):
    """optim.subsample: each step perturbs and updates a seeded share of the tensors; the rest stay put."""
    (model_a, params_a), (model_b, params_b) = tiny_llama_pair
    init = params_a.state_dict()
    params_b.load_state_dict(init)
    opt = qzo.ZO(params_a, strategy=qzo.GV(pool=2) if strategy == "gv" else qzo.SPSA(),
                 rule=qzo.SGD(lr=1e-2), eps=1e-2, seed=5, subsample=0.3)
    plain = PlainZO([(t.name, t.tensor) for t in params_b], strategy, "sgd", lr=1e-2, eps=1e-2, seed=5, pool=2,
                    subsample=0.3)
    touched = set()
    for step in range(1, 6):
        before = params_a.state_dict()
        picked = {t.name for t in opt.params_at(step)}
        assert 0 < len(picked) < len(params_a)
        opt.step(lambda: model_a(**tiny_batch).loss)
        plain.step(lambda: model_b(**tiny_batch).loss, step)
        assert opt.last_record.losses == pytest.approx(plain.log[-1][1], rel=1e-4, abs=1e-5)
        after = params_a.state_dict()
        assert all(torch.equal(before[n], after[n]) for n in before if n not in picked)  # the others stay put
        touched |= picked
    assert len(touched) > len(picked)  # another share each step
    for ta, tb in zip(params_a, params_b):
        moved = (tb.tensor - init[tb.name]).abs().max().item()
        assert (moved > 1e-4) == (ta.name in touched)
        torch.testing.assert_close(ta.tensor, tb.tensor, rtol=0, atol=max(moved, 1e-6) * 3e-2)
    params_a.load_state_dict(init)
    params_b.load_state_dict(init)


def test_ldsd_with_a_unit_mean_and_a_small_sigma_equals_the_plain_reference(tiny_llama_pair, tiny_batch):
    """The authors' LDSD start: mu a random direction of norm 1, sigma 1e-3 (candidates mostly along mu)."""
    (model_a, params_a), (model_b, params_b) = tiny_llama_pair
    init = params_a.state_dict()
    params_b.load_state_dict(init)
    # a unit direction is sqrt(values) times shorter than a plain z: a larger lr moves the trainables as much
    opt = qzo.ZO(params_a, strategy=qzo.LDSD(candidates=4, sigma=1e-3, lr_mu=0.5, mu_init="unit"),
                 rule=qzo.SGD(lr=1.0), eps=1e-2, seed=5)
    norm = sum(float(m.double().pow(2).sum()) for m in opt.strategy.mu.values()) ** 0.5
    assert norm == pytest.approx(1.0, rel=1e-6)
    plain = PlainZO([(t.name, t.tensor) for t in params_b], "ldsd", "sgd", lr=1.0, eps=1e-2, seed=5, candidates=4,
                    sigma=1e-3, lr_mu=0.5, mu_init="unit")
    for step in range(1, 6):
        opt.step(lambda: model_a(**tiny_batch).loss)
        plain.step(lambda: model_b(**tiny_batch).loss, step)
        assert opt.last_record.losses == pytest.approx(plain.log[-1][1], rel=1e-4, abs=1e-5)
    # mu's REINFORCE step divides the losses' differences by sigma: their float rounding (1e-7 of a loss of 6)
    # moves mu by ~1e-3 x lr_mu / sigma per step in either implementation, so mu agrees to that, not to 1e-6
    for name, mu in opt.strategy.mu.items():
        torch.testing.assert_close(mu, plain.mu[name], rtol=0, atol=5 * 6e-7 * 0.5 / 1e-3)
    _assert_moved_alike_and_reset(params_a, params_b, init, rel=3e-2)
