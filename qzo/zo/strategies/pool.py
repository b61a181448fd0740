"""Pool strategies from "Steering the Noise" (Jin, Cen, Tan; arXiv 2601.04710): MeZO-GV and MeZO-Greedy.

Both draw a pool of K seeds and evaluate f(theta + eps z_i) one-sidedly, as the authors'
code does. One by one, the trainables walk from one candidate to the next in a single pass
each (``-eps z_i + eps z_{i+1}`` merged), never back through theta. With ``batched=True``
(LoRA trainables, ``qzo.CausalLMLoss`` closure) the whole pool is one stacked forward and
the trainables stay at theta (``qzo.targets.candidates``). The strategies then move on with
``probe.move_to``, which starts from whatever the pool left applied, so one code path
serves both and gives the same seeds, losses and update (to float rounding).
"""

from __future__ import annotations

import math
from typing import Callable

from ..types import Estimate, Probe
from .base import Strategy

__all__ = ["GV", "Greedy"]


class GV(Strategy):
    """MeZO-GV: the guiding vector v = mean z of the best group - mean z of the rest.

    Per step: evaluate the pool one-sidedly, sort by loss, split the first
    ``max(1, round(pool * split))`` (capped at pool - 1) from the rest, and take the
    two-point estimate along v (not normalized, as in the paper's code):
    g = (f(theta + eps v) - f(theta - eps v)) / (2 eps), update along v. v is the pool's
    seeds with coefficients +-1/|group|, regenerated element by element.

    Cost: ``pool + 2`` forwards a step. v has variance ``1/|best| + 1/|rest|`` per element
    (2 for a pool of 2, twice that of one z), so GV wants a smaller lr than SPSA.

    v's coefficients are the signs of the pool's centred ranks, scaled by the group sizes:
    :class:`qzo.FZOO` is the generalization that keeps each loss's magnitude against a shared
    baseline and needs no re-probe along v.

    Two mechanics of the authors' code (``stan-anony/MeZO-GV``, its active ``trainer.py``)
    that the paper does not state are options:

    * ``memory``: the best seed of a step is carried into the next step's pool and scored
      again there (an evaluation like any other: the pool still costs ``pool`` forwards), so
      a direction that keeps winning is followed across steps. The authors run pool 2 this
      way: one new seed against the kept one, v = z_best - z_worst.
    * ``unit``: v is scaled to the per-element variance of one z (its coefficients divided by
      their root sum of squares), so GV's step has SPSA's size at equal lr; off, v is used as
      the authors do (pool 2: twice SPSA's variance).

    Args:
        pool: candidates per step (the paper uses 2 or 4).
        split: fraction of the pool in the low-loss group (the paper uses 0.5).
        memory: carry the step's best seed into the next step's pool (see above).
        unit: scale v to the variance of one z (see above).
        batched: evaluate the pool in one stacked forward (LoRA trainables and a
            ``qzo.CausalLMLoss`` closure); ``opt.forwards`` still counts ``pool`` evaluations.
    """

    name = "gv"
    pool_arg = "pool"

    def __init__(self, pool: int = 4, split: float = 0.5, memory: bool = False, unit: bool = False,
                 batched: bool = False):
        if pool < 2:
            raise ValueError(f"GV needs pool >= 2 (one low-loss and one high-loss candidate), got {pool}")
        if not 0 < split < 1:
            raise ValueError(f"split must be in (0, 1), got {split}")
        self.pool, self.split = int(pool), float(split)
        self.memory, self.unit = bool(memory), bool(unit)
        self.batched = bool(batched)
        self.forwards_per_step = self.pool + 2
        self.kept: int | None = None  # memory: the best seed of the last step, scored again in this one

    def groups(self, seeds: list[int], losses: list[float]) -> tuple[list[int], list[int]]:
        """(low-loss seeds, high-loss seeds); ties keep pool order (stable sort)."""
        order = sorted(range(len(seeds)), key=lambda i: losses[i])
        n_best = min(max(1, round(len(seeds) * self.split)), len(seeds) - 1)
        return [seeds[i] for i in order[:n_best]], [seeds[i] for i in order[n_best:]]

    def estimate(self, probe: Probe, draw_seeds: Callable[[int], list[int]]) -> Estimate:
        eps = probe.eps
        kept = [self.kept] if self.memory and self.kept is not None else []
        seeds = kept + draw_seeds(self.pool - len(kept))
        pool_losses = probe.evaluate_pool([([(seed, eps)], 0.0) for seed in seeds])
        best, rest = self.groups(seeds, pool_losses)
        v = [(s, 1.0 / len(best)) for s in best] + [(s, -1.0 / len(rest)) for s in rest]
        if self.unit:
            size = math.sqrt(math.fsum(c * c for _, c in v))
            v = [(s, c / size) for s, c in v]
        if self.memory:
            self.kept = best[0]
        # from what the pool left, in one pass each
        f_plus, f_minus = probe.evaluate_group([([(s, eps * c) for s, c in v], 0.0), ([(s, -eps * c) for s, c in v], 0.0)])
        return Estimate(direction=v, grad=(f_plus - f_minus) / (2.0 * eps), loss=0.5 * (f_plus + f_minus),
                        seeds=seeds)

    def state_dict(self) -> dict:
        return {"kept": self.kept} if self.memory else {}

    def load_state_dict(self, state: dict) -> None:
        kept = state.get("kept")
        self.kept = None if kept is None else int(kept)


class Greedy(Strategy):
    """MeZO-Greedy: the pool's single best perturbation is the direction.

    Per step: evaluate the pool one-sidedly, take z_best = argmin f(theta + eps z_i), and
    reuse that evaluation as f+: g = (f(theta + eps z_best) - f(theta - eps z_best)) / (2 eps).
    Cost: ``pool + 1`` forwards a step (the reuse saves one). The estimate is biased towards
    descent (the min of K evaluations), which is the point of steering.

    Args:
        pool: candidates per step.
        batched: evaluate the pool in one stacked forward (LoRA trainables and a
            ``qzo.CausalLMLoss`` closure); ``opt.forwards`` still counts ``pool`` evaluations.
    """

    name = "greedy"
    pool_arg = "pool"

    def __init__(self, pool: int = 4, batched: bool = False):
        if pool < 1:
            raise ValueError(f"Greedy needs pool >= 1, got {pool}")
        self.pool = int(pool)
        self.batched = bool(batched)
        self.forwards_per_step = self.pool + 1

    def estimate(self, probe: Probe, draw_seeds: Callable[[int], list[int]]) -> Estimate:
        eps = probe.eps
        seeds = draw_seeds(self.pool)
        pool_losses = probe.evaluate_pool([([(seed, eps)], 0.0) for seed in seeds])
        b = min(range(len(seeds)), key=lambda i: pool_losses[i])
        best = seeds[b]
        probe.move_to([(best, -eps)])
        f_minus = probe.evaluate()
        f_plus = pool_losses[b]
        return Estimate(direction=[(best, 1.0)], grad=(f_plus - f_minus) / (2.0 * eps), loss=0.5 * (f_plus + f_minus))
