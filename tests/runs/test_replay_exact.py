"""Bit-exact replay from recorded evaluations (qzo.replay.RecordingLoss / ReplayedLoss), no forward needed.

A run recorded step by step, then replayed into fresh trainables and a fresh optimizer,
must end bit-identical: the trainables (their digest and every tensor), and every piece of
optimizer state (rule moments, normalizer RMS, ConMeZO momentum, LDSD mean).
"""

import json

import pytest
import torch

import qzo
from helpers import tiny_config
from qzo.runs.replay import RecordingLoss, ReplayedLoss, ReplayMismatch, state_digest

# every strategy family with a rule or normalizer that carries state across steps
CONFIGS = {
    "spsa_adam": (lambda: qzo.SPSA(), lambda: qzo.Adam(lr=1e-2), None),
    "spsa_rms": (lambda: qzo.SPSA(), lambda: qzo.SGD(lr=1e-2), "rms"),
    "fzoo_spread": (lambda: qzo.FZOO(probes=3), lambda: qzo.SGD(lr=1e-2), "spread"),
    "conmezo_momentum": (lambda: qzo.ConMeZO(theta=1.35, beta=0.9), lambda: qzo.Momentum(lr=1e-2), None),
    "ldsd": (lambda: qzo.LDSD(candidates=3, sigma=1.0, lr_mu=1e-1), lambda: qzo.SGD(lr=1e-2), None),
    "gv_sign": (lambda: qzo.GV(pool=4), lambda: qzo.Sign(lr=1e-3), None),
    "greedy": (lambda: qzo.Greedy(pool=3), lambda: qzo.SGD(lr=1e-2), None),
}


def _least_squares():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 7, generator=g), torch.randn(32, 3, generator=g)
    w, b = torch.zeros(7, 3), torch.full((3,), 0.5)
    return [("w", w), ("b", b)], lambda: ((X @ w + b - y) ** 2).mean()


def _optimizer(name, params, seed=3):
    strategy, rule, normalize = CONFIGS[name]
    return qzo.ZO(params, strategy=strategy(), rule=rule(), eps=1e-3, seed=seed, normalize=normalize)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    flat_a, flat_b = [], []
    torch.utils._pytree.tree_map(flat_a.append, sa)
    torch.utils._pytree.tree_map(flat_b.append, sb)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y or (x != x and y != y)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_replay_from_recorded_losses_is_bit_exact(name):
    params, loss = _least_squares()
    init = {n: t.clone() for n, t in params}
    opt = _optimizer(name, params)
    records = []
    for _ in range(12):
        closure = RecordingLoss(loss)
        opt.step(closure)
        records.append(json.loads(json.dumps(closure.record)))  # the values survive a text log exactly
    fresh = [(n, t.clone()) for n, t in init.items()]
    replay = _optimizer(name, fresh)
    for record in records:
        closure = ReplayedLoss(record)
        replay.step(closure)
        assert closure.exhausted
    assert state_digest(fresh) == state_digest(params)
    for (_, a), (_, b) in zip(fresh, params):
        assert torch.equal(a, b)
    _assert_same_state(replay, opt)
    assert replay.forwards == opt.forwards and replay.steps == opt.steps


def test_a_different_optimizer_is_refused():
    params, loss = _least_squares()
    opt = _optimizer("spsa_adam", params)
    closure = RecordingLoss(loss)
    opt.step(closure)
    other = _optimizer("fzoo_spread", [(n, t.clone()) for n, t in params])
    with pytest.raises(ReplayMismatch, match="past the 2 recorded"):
        other.step(ReplayedLoss(closure.record))


def test_digest_tells_one_ulp_apart():
    a = [("w", torch.ones(5))]
    b = [("w", torch.ones(5))]
    assert state_digest(a) == state_digest(b)
    b[0][1][3] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert state_digest(a) != state_digest(b)


@pytest.mark.parametrize("strategy", ["per_example", "gv_batched"])
def test_replay_of_row_and_pool_evaluations_on_a_lora_model(strategy, tiny_tokenizer, tiny_batch):
    """Per-example rows and pool-batched candidates come back as the tensors the probe reads."""
    def build():
        model, _ = qzo.load(tiny_config(len(tiny_tokenizer)), quant="nf4", seed=0)
        return model, qzo.lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=0)

    make = {"per_example": lambda: qzo.PerExample(), "gv_batched": lambda: qzo.GV(pool=4, batched=True)}[strategy]
    model, params = build()
    opt = qzo.ZO(params, strategy=make(), rule=qzo.SGD(lr=2e-2), eps=1e-2, seed=1, normalize="spread")
    records = []
    for _ in range(3):
        closure = RecordingLoss(qzo.CausalLMLoss(model, tiny_batch))
        opt.step(closure)
        records.append(json.loads(json.dumps(closure.record)))
    assert any(isinstance(v, list) for r in records for v in r["values"])  # rows / candidates, not single losses
    _, fresh = build()
    replay = qzo.ZO(fresh, strategy=make(), rule=qzo.SGD(lr=2e-2), eps=1e-2, seed=1, normalize="spread")
    for record in records:
        replay.step(ReplayedLoss(record))
    assert state_digest(fresh) == state_digest(params)
    _assert_same_state(replay, opt)
