"""``qzo.zo.auto_lr.find_lr``: the lr range test, on losses whose blow-up point is known."""

import math

import pytest
import torch

import qzo
from qzo.errors import QzoError
from qzo.zo.auto_lr import LrSearch, find_lr


def _quadratic(curvature: float, n: int = 64):
    """f(w) = curvature / 2 |w - 1|^2 from w = 0: gradient descent diverges past lr 2 / curvature."""
    w = torch.zeros(n)
    params = qzo.ParamSet([("w", w)])
    return w, params, lambda: 0.5 * curvature * float(((w - 1) ** 2).sum())


def _search(curvature: float) -> LrSearch:
    w, params, loss = _quadratic(curvature)
    search = find_lr(params, lambda lr: qzo.ZO(params, rule=qzo.SGD(lr=lr), eps=1e-3, seed=0), loss)
    assert torch.equal(w, torch.zeros_like(w))  # the test leaves no trace on the trainables
    assert search.forwards == 2 * len(search.lrs) and search.lrs[0] == 1e-6
    assert search.blowup_lr is not None and search.lr == search.blowup_lr / 64
    assert search.losses[-1] > 1.25 * search.losses[0] and all(x <= 1.25 * search.losses[0] for x in search.losses[:-1])
    return search


@pytest.mark.parametrize("curvature", [1.0, 100.0])
def test_the_blowup_lr_follows_the_curvature_and_the_trainables_are_restored(curvature):
    _search(curvature)


def test_a_100x_sharper_loss_gets_a_100x_smaller_lr_within_the_grid():
    flat, sharp = _search(1.0), _search(100.0)
    assert 100 / 4 <= flat.lr / sharp.lr <= 100 * 4  # one grid step (2x) each side, at most


def test_same_seeds_same_lr_and_a_non_finite_loss_is_a_blowup():
    runs = []
    for _ in range(2):
        w, params, loss = _quadratic(10.0)
        runs.append(find_lr(params, lambda lr: qzo.ZO(params, rule=qzo.SGD(lr=lr), eps=1e-3, seed=3), loss))
    assert runs[0] == runs[1]
    w, params, loss = _quadratic(10.0)
    blow = find_lr(params, lambda lr: qzo.ZO(params, rule=qzo.SGD(lr=lr), eps=1e-3, seed=3),
                   lambda: math.inf if w.abs().max() > 0.5 else loss())
    assert math.isinf(blow.losses[-1]) and torch.equal(w, torch.zeros_like(w))
    assert LrSearch.from_json(blow.to_json()) == blow


def test_bad_settings_are_refused():
    w, params, loss = _quadratic(1.0)
    with pytest.raises(QzoError, match="growth > 1"):
        find_lr(params, lambda lr: qzo.ZO(params, rule=qzo.SGD(lr=lr)), loss, growth=1.0)
