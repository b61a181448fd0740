"""LDSD: learnable direction sampling (Parfenov et al., arXiv 2602.13659).

Directions are drawn from N(mu, sigma^2 I) with a learned mean mu (a dense float32 tensor
per trainable, saved in checkpoints): z_i = mu + sigma * e_i with e_i = noise(seed_i).
Per step: evaluate f(theta + eps z_i) for k candidates, take the best, the two-point
estimate along it (its one-sided evaluation is reused as f+, so k + 1 forwards a step),
update theta along z_best = mu + sigma e_best, and then move mu by REINFORCE with a
leave-one-out baseline, over exactly the candidates that were evaluated:

    c_i = f_i - mean_{j != i} f_j
    mu <- mu - lr_mu * sum_i c_i (z_i - mu) / (k sigma^2)
        = mu - lr_mu / (k sigma) * sum_i c_i e_i          (z_i - mu = sigma e_i)

The authors' public code draws fresh noise for this update instead of reusing the
evaluated candidates, which makes the policy gradient pure noise; here the same seeds
are replayed (tested on a hand-worked example).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ...noise.contract import randn
from ...noise.passes import perturb_params_
from ..params import Trainable
from ..types import Estimate, Probe
from .base import Strategy

__all__ = ["LDSD", "leave_one_out", "MU_SEED"]

#: the seed of mu's random start (``mu_init="unit"``): fixed, so a run and its replay start alike
MU_SEED = 0x4C445344


def leave_one_out(losses: list[float]) -> list[float]:
    """c_i = f_i - mean of the other losses."""
    k = len(losses)
    total = sum(losses)
    return [f - (total - f) / (k - 1) for f in losses]


class LDSD(Strategy):
    """Learnable direction sampling: candidates from N(mu, sigma^2 I), mu learned by REINFORCE.

    Cost: ``candidates + 1`` forwards a step; state: mu, one float32 value per trainable value.

    Args:
        candidates: k, candidates per step (the paper uses 5-10).
        sigma: standard deviation of the candidates around mu.
        lr_mu: learning rate of mu's REINFORCE step (the paper uses 4e-2).
        mu_init: ``"zero"`` (mu starts at 0: the first steps are plain sampling), or ``"unit"``: mu
            starts as a random direction of norm 1 over all the trainables (seeded, :data:`MU_SEED`),
            as the authors' code (``zo_rl_jaguar``) starts it; with ``sigma`` small (their 1e-3) a
            candidate is then mostly mu itself, of norm about 1 instead of sqrt(values).
        batched: evaluate the candidates in one stacked forward (LoRA trainables and a
            ``qzo.CausalLMLoss`` closure); ``opt.forwards`` still counts ``candidates`` evaluations.
    """

    name = "ldsd"
    pool_arg = "candidates"

    dense_state_copies = 1  # mu

    def __init__(self, candidates: int = 8, sigma: float = 1.0, lr_mu: float = 4e-2, mu_init: str = "zero",
                 batched: bool = False):
        if candidates < 2:
            raise ValueError(f"LDSD needs candidates >= 2 (the baseline leaves one out), got {candidates}")
        if not sigma > 0 or lr_mu < 0:
            raise ValueError(f"need sigma > 0 and lr_mu >= 0, got sigma={sigma}, lr_mu={lr_mu}")
        if mu_init not in ("zero", "unit"):
            raise ValueError(f"mu_init must be 'zero' or 'unit', got {mu_init!r}")
        self.candidates, self.sigma, self.lr_mu, self.mu_init = int(candidates), float(sigma), float(lr_mu), mu_init
        self.batched = bool(batched)
        self.forwards_per_step = self.candidates + 1
        self.mu: dict[str, torch.Tensor] = {}
        self._pending: tuple[list[int], list[float]] | None = None

    def bind(self, params) -> None:
        new = [t for t in params if t.name not in self.mu]
        for t in new:
            self.mu[t.name] = torch.zeros(t.tensor.shape, dtype=torch.float32, device=t.tensor.device)
        if self.mu_init == "unit" and new:  # a direction of norm 1 over all the trainables
            for t in new:
                self.mu[t.name].copy_(randn(MU_SEED, t.stream, t.tensor.numel(), device=t.tensor.device).view(t.tensor.shape))
            norm = math.sqrt(math.fsum(float(self.mu[t.name].double().pow(2).sum()) for t in new))
            for t in new:
                self.mu[t.name].div_(norm)

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        return self.mu

    def estimate(self, probe: Probe, draw_seeds: Callable[[int], list[int]]) -> Estimate:
        eps, sigma = probe.eps, self.sigma
        seeds = draw_seeds(self.candidates)
        # theta + eps (mu + sigma e_i)
        losses = probe.evaluate_pool([([(seed, eps * sigma)], eps) for seed in seeds])
        b = min(range(len(seeds)), key=lambda i: losses[i])
        best = seeds[b]
        probe.move_to([(best, -eps * sigma)], mu_coef=-eps)  # theta - eps (mu + sigma e_best)
        f_minus = probe.evaluate()
        f_plus = losses[b]
        c = leave_one_out(losses)
        k = len(seeds)
        self._pending = (seeds, [-self.lr_mu * ci / (k * sigma) for ci in c])
        return Estimate(direction=[(best, sigma)], grad=(f_plus - f_minus) / (2.0 * eps), loss=0.5 * (f_plus + f_minus),
                        direction_mu=1.0)

    def after_update(self, params) -> None:
        if self._pending is None:
            return
        seeds, coefs = self._pending
        self._pending = None
        # the means as one set, so the Triton backend moves them all in one launch
        # (of the tensors this step moved, with their noise scales: qzo.ZO's noise_scale)
        perturb_params_([Trainable(t.name, self.mu[t.name], t.stream, t.noise) for t in params], seeds, coefs)

    def state_dict(self) -> dict:
        return {"mu": {name: mu.detach().clone() for name, mu in self.mu.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, saved in state.get("mu", {}).items():
            if name not in self.mu:
                raise ValueError(f"LDSD checkpoint has a mean for unknown trainable {name!r}")
            self.mu[name].copy_(saved)
