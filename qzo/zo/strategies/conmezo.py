"""ConMeZO: two-point estimates along directions drawn in a cone around the momentum.

"ConMeZO" (AISTATS 2026, github LejsDeen/ConMeZO). A momentum m of past estimates (a dense
float32 tensor per trainable, saved in checkpoints) sets the cone's axis; each step's
direction is

    u = cos(theta) * sqrt(d) * m / ||m||  +  sin(theta) * z,      z = noise(seed)

(d: the number of trainable values, so both parts have the norm of a Gaussian z), then
MeZO's two-point estimate g = (f(x + eps u) - f(x - eps u)) / (2 eps), the update along u,
and m <- beta m + (1 - beta) g u. Two forwards a step, as MeZO. theta near pi/2 is MeZO;
smaller angles lean on the momentum. This is what LDSD's learned mean tries to be, with
the mean set by the estimates themselves instead of a REINFORCE step.

Differences from the authors' code, on purpose:

* ||m|| is computed exactly each step (one reduction over m); the authors track an
  estimate that assumes z is orthogonal to m.
* The first step is MeZO's (m = 0 has no direction). The authors start m at a random
  Gaussian, which makes u another random Gaussian direction: the same step in
  distribution.
* beta ramps linearly from 0.1 to ``beta`` over ``ramp_steps`` (0: constant); the authors
  hold 0.1 for 200 steps and then ramp with a cubic shape until step 2000.

m's update is one in-place pass per tensor (``x <- scale * x + coef * z``, the perturbation
primitive's weight-decay form), so no noise is materialized.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ...noise.passes import perturb_params_
from ..params import Trainable
from ..types import Estimate, Probe
from .base import Strategy

__all__ = ["ConMeZO"]


class ConMeZO(Strategy):
    """MeZO along directions in a cone of half-angle ``theta`` around the momentum of past estimates.

    Cost: 2 forwards a step; state: the momentum, one float32 value per trainable value.

    Args:
        theta: the cone's half-angle in radians (the authors use 1.3-1.35; pi/2 is MeZO).
        beta: the momentum's decay (the authors use 0.97-0.99).
        ramp_steps: beta rises linearly from 0.1 to ``beta`` over this many steps (0: constant).
    """

    name = "conmezo"

    forwards_per_step = 2
    dense_state_copies = 1  # the momentum

    def __init__(self, theta: float = 1.35, beta: float = 0.99, ramp_steps: int = 0):
        if not 0 < theta <= math.pi / 2:
            raise ValueError(f"theta must be in (0, pi/2], got {theta}")
        if not 0 <= beta < 1 or ramp_steps < 0:
            raise ValueError(f"need 0 <= beta < 1 and ramp_steps >= 0, got beta={beta}, ramp_steps={ramp_steps}")
        self.theta, self.beta, self.ramp_steps = float(theta), float(beta), int(ramp_steps)
        self.m: dict[str, torch.Tensor] = {}
        self.t = 0
        self._numel = 0
        self._pending: tuple[Estimate, float] | None = None

    def bind(self, params) -> None:
        for t in params:
            if t.name not in self.m:
                self.m[t.name] = torch.zeros(t.tensor.shape, dtype=torch.float32, device=t.tensor.device)
        self._numel = sum(t.tensor.numel() for t in params)

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        return self.m

    def beta_at(self, step: int) -> float:
        """The momentum's decay at 1-based ``step`` (the linear ramp from 0.1, if any)."""
        if self.ramp_steps == 0 or step >= self.ramp_steps:
            return self.beta
        return 0.1 + (self.beta - 0.1) * step / self.ramp_steps

    def estimate(self, probe: Probe, draw_seeds: Callable[[int], list[int]]) -> Estimate:
        (seed,) = draw_seeds(1)
        eps = probe.eps
        norm = math.sqrt(math.fsum(float(m.double().pow(2).sum()) for m in self.m.values()))
        if norm > 0:
            axis, noise = math.cos(self.theta) * math.sqrt(self._numel) / norm, math.sin(self.theta)
        else:
            axis, noise = 0.0, 1.0  # no momentum yet: MeZO's direction
        f_plus, f_minus = probe.evaluate_group([([(seed, eps * noise)], eps * axis),
                                                ([(seed, -eps * noise)], -eps * axis)])
        est = Estimate(direction=[(seed, noise)], grad=(f_plus - f_minus) / (2.0 * eps), loss=0.5 * (f_plus + f_minus),
                       direction_mu=axis)
        self._pending = (est, axis)
        return est

    def after_update(self, params) -> None:
        if self._pending is None:
            return
        est, axis = self._pending
        self._pending = None
        self.t += 1
        beta = self.beta_at(self.t)
        g = est.grad  # after the optimizer's normalization and clip: the slope the update used
        (seed, noise), = est.direction
        # m <- beta m + (1 - beta) g (axis m + noise z), one pass per tensor
        # the tensors this step moved, with their noise scales (qzo.ZO's noise_scale): m follows the direction taken
        perturb_params_([Trainable(t.name, self.m[t.name], t.stream, t.noise) for t in params],
                        [seed], [(1 - beta) * g * noise], scale=beta + (1 - beta) * g * axis)

    def state_dict(self) -> dict:
        return {"m": {name: m.detach().clone() for name, m in self.m.items()}, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        for name, saved in state.get("m", {}).items():
            if name not in self.m:
                raise ValueError(f"ConMeZO checkpoint has a momentum for unknown trainable {name!r}")
            self.m[name].copy_(saved)
        self.t = int(state.get("t", 0))
