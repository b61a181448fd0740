"""Rules that need the dense projected gradient: Momentum, Adam (ZO-Adam), Sign.

Each walks every tensor chunk by chunk: regenerate the leftover perturbation (to undo)
and the direction ``d``, form the projected gradient ``grad * d``, update the rule's
state and the trainables in the same pass. State tensors are float32, one value per
trainable value (Momentum: 1, Adam: 2, Sign: none), and are saved in checkpoints.

This chunk loop is the torch reference; with the Triton backend (``qzo.noise.dispatch``) the same
update is one fused multi-tensor launch per dtype (``qzo_kernels.update``).
"""

from __future__ import annotations

import torch

from ...noise.contract import derive_seeds
from ...noise.dispatch import update_kernels
from ...noise.passes import chunks, combine, noise_combo, run_pass
from ..params import ParamSet
from ..types import Estimate
from .base import Rule

__all__ = ["DenseRule", "Momentum", "Adam", "Sign"]


class DenseRule(Rule):
    """Base for rules with a per-chunk update ``theta' = f(theta, grad * d, state)``."""

    #: names of the float32 state tensors each trainable gets
    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.state: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self.state_names}
        self.t = 0  # completed updates (Adam's bias correction)

    def bind(self, params: ParamSet) -> None:
        for key in self.state_names:
            for t in params:
                if t.name not in self.state[key]:
                    self.state[key][t.name] = torch.zeros(t.tensor.shape, dtype=torch.float32, device=t.tensor.device)

    def chunk_update(self, theta: torch.Tensor, g: torch.Tensor, state: dict, lr: float) -> torch.Tensor:
        """New theta for one chunk; ``state`` maps state names to the chunk's views (update in place)."""
        raise NotImplementedError

    #: the kernel's name for this rule (``qzo_kernels.update.RULES``)
    kernel_rule: str = ""

    def kernel_constants(self, lr: float) -> dict:
        """The rule's constants for the fused kernel at this step (after ``self.t`` advanced)."""
        return {}

    @torch.no_grad()
    def apply(self, params: ParamSet, est: Estimate, lr: float) -> None:
        self.t += 1
        run_pass(params, est.mu, lambda t, mu: self._apply_reference(t, mu, est, lr),
                 lambda members, has_mu: self._apply_kernel(members, has_mu, est, lr))

    def _apply_reference(self, t, mu, est: Estimate, lr: float) -> None:
        """The torch reference of the fused update, one trainable chunk by chunk."""
        undo_seeds, undo_coefs = [s for s, _ in est.applied], [c for _, c in est.applied]
        dir_seeds, dir_coefs = [s for s, _ in est.direction], [c for _, c in est.direction]
        flat = t.tensor.view(-1)
        mu_flat = mu.reshape(-1) if mu is not None else None
        views = {k: self.state[k][t.name].view(-1) for k in self.state_names}
        for start, end in chunks(flat.numel()):
            mu_chunk = mu_flat[start:end] if mu_flat is not None else None
            leftover = noise_combo(t.stream, undo_seeds, t.coefs(undo_coefs), start, end - start,
                                   t.tensor.device, mu_chunk, est.applied_mu)
            d = noise_combo(t.stream, dir_seeds, t.coefs(dir_coefs), start, end - start, t.tensor.device,
                            mu_chunk, est.direction_mu)
            theta = flat[start:end].to(torch.float32) - leftover
            if self.weight_decay:
                theta = theta * (1.0 - lr * self.weight_decay)
            chunk_state = {k: v[start:end] for k, v in views.items()}
            flat[start:end] = self.chunk_update(theta, d.mul_(est.grad), chunk_state, lr).to(t.tensor.dtype)

    def _apply_kernel(self, members: list, has_mu: bool, est: Estimate, lr: float) -> None:
        """The fused Triton update of one group of trainables (one multi-tensor launch)."""
        kernels = update_kernels()
        RULES, dense_update_many = kernels.RULES, kernels.dense_update_many  # noqa: N806 - the kernel module's names
        roles = RULES[self.kernel_rule][1]  # the kernel's names for this rule's state tensors, in order

        # each seed's noise is generated once and feeds both the leftover and the direction
        seeds, _ = combine([(s, 1.0) for s, _ in est.applied], [(s, 1.0) for s, _ in est.direction])
        undo = dict(est.applied)
        direction = dict(est.direction)
        noisy = members[0][0]  # the group's noise scale
        dense_update_many(
            self.kernel_rule, [t.tensor for t, _ in members], derive_seeds(seeds, [t.stream for t, _ in members]),
            noisy.coefs([undo.get(s, 0.0) for s in seeds]), noisy.coefs([direction.get(s, 0.0) for s in seeds]),
            {role: [self.state[k][t.name] for t, _ in members] for role, k in zip(roles, self.state_names)},
            grad=est.grad, lr=lr, decay=1.0 - lr * self.weight_decay,
            mus=[m for _, m in members] if has_mu else None, undo_mu=est.applied_mu, dir_mu=est.direction_mu,
            **self.kernel_constants(lr))

    def state_dict(self) -> dict:
        return {"t": self.t, **{k: {n: v.detach().clone() for n, v in self.state[k].items()} for k in self.state_names}}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state.get("t", 0))
        for key in self.state_names:
            for name, saved in state.get(key, {}).items():
                if name not in self.state[key]:
                    raise ValueError(f"{type(self).__name__} checkpoint has {key} for unknown trainable {name!r}")
                self.state[key][name].copy_(saved)


class Momentum(DenseRule):
    """Heavy-ball momentum on the ZO estimate: m <- beta m + grad d; theta <- theta - lr m.

    Args:
        lr: learning rate.
        beta: momentum coefficient.
        weight_decay: decoupled weight decay.
    """

    name = "momentum"

    state_names = ("momentum",)
    kernel_rule = "momentum"

    def __init__(self, lr: float, beta: float = 0.9, weight_decay: float = 0.0):
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        super().__init__(lr, weight_decay)

    def kernel_constants(self, lr):
        return {"beta1": self.beta}

    def chunk_update(self, theta, g, state, lr):
        m = state["momentum"]
        m.mul_(self.beta).add_(g)
        return theta - lr * m


class Adam(DenseRule):
    """ZO-Adam (as benchmarked in ZO-Bench): Adam's moments of the projected estimate grad * d.

    Args:
        lr: learning rate.
        betas: (beta1, beta2).
        eps: Adam's denominator epsilon (not the perturbation scale).
        weight_decay: decoupled weight decay (AdamW).
    """

    name = "adam"

    state_names = ("exp_avg", "exp_avg_sq")
    kernel_rule = "adam"

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or not eps > 0:
            raise ValueError(f"need betas in [0, 1) and eps > 0, got betas={betas}, eps={eps}")
        self.betas, self.eps = (float(b1), float(b2)), float(eps)
        super().__init__(lr, weight_decay)

    def kernel_constants(self, lr):
        b1, b2 = self.betas
        return {"beta1": b1, "beta2": b2, "step_size": lr / (1 - b1**self.t), "bias2": 1 - b2**self.t,
                "adam_eps": self.eps}

    def chunk_update(self, theta, g, state, lr):
        b1, b2 = self.betas
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = lr / (1 - b1**self.t)
        denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
        return theta - step_size * m / denom


class Sign(DenseRule):
    """sign-SGD on the ZO estimate: theta <- theta - lr * sign(grad * d).

    Args:
        lr: learning rate (the step of every value is exactly lr).
        weight_decay: decoupled weight decay.
    """

    name = "sign"

    kernel_rule = "sign"

    def chunk_update(self, theta, g, state, lr):
        return theta - lr * torch.sign(g)


class SignMomentum(Momentum):
    """The sign of a momentum of the ZO estimate (LDSD's code, ``zo_rl_jaguar``):
    m <- beta m + (1 - beta) grad d; theta <- theta - lr sign(m).

    Every value moves by exactly lr a step, in the direction the recent estimates agree on:
    a large or noisy projected gradient cannot throw the trainables further than lr. ``beta``
    0 is :class:`Sign`. Its settings and state are :class:`Momentum`'s; only the step differs.

    Args:
        lr: learning rate (each value's step).
        beta: momentum coefficient.
        weight_decay: decoupled weight decay.
    """

    name = "sign_momentum"
    kernel_rule = "sign_momentum"

    def chunk_update(self, theta, g, state, lr):
        m = state["momentum"]
        m.mul_(self.beta).add_(g, alpha=1 - self.beta)
        return theta - lr * torch.sign(m)
