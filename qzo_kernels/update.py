"""Fused restore + update for the rules with dense state (Momentum, ZO-Adam, sign-SGD, sign of a momentum).

The Triton twin of :meth:`qzo.zo.rules.dense_grad.DenseRule.apply` (its reference). After a
strategy's last evaluation the trainables sit at ``theta + leftover``; one pass per element
regenerates each seed's noise once (in registers), forms the leftover and the direction
``d`` from it, and writes

    theta  = (x - leftover) * decay          decay = 1 - lr * weight_decay
    g      = grad * d                        the projected gradient
    state, theta' = rule(theta, g, state)    momentum / Adam moments / sign / sign of a momentum

so undoing the perturbation, updating the moments and moving theta cost one read and one
write of ``x`` and of each state tensor. Many tensors go in one launch through a
:mod:`~qzo_kernels.table`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("qzo_kernels needs triton: pip install 'qzo[triton]'") from exc

from .perturb import BLOCK, TL_DTYPES
from .table import step_vectors, table_for

__all__ = ["dense_update_many", "RULES"]

#: rule name -> the kernel's RULE constant, and the state tensors it reads and writes
RULES = {"momentum": (0, ("m",)), "adam": (1, ("m", "v")), "sign": (2, ()), "sign_momentum": (3, ("m",))}


@triton.jit
def _dense_update_kernel(x_table, mu_table, m_table, v_table, numels, block_tensor, block_start,
                         keys_ptr, undo_ptr, dir_ptr, n_seeds, undo_mu, dir_mu,
                         grad, lr, decay, beta1, beta2, step_size, bias2, adam_eps,
                         DTYPE: tl.constexpr, RULE: tl.constexpr, HAS_MU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    x_ptr = tl.load(x_table + t).to(tl.pointer_type(DTYPE))
    keys_ptr = keys_ptr + t * n_seeds

    leftover = tl.zeros([BLOCK], dtype=tl.float32)
    d = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(n_seeds):
        z = tl.randn(tl.load(keys_ptr + j), offs)
        leftover += tl.load(undo_ptr + j) * z
        d += tl.load(dir_ptr + j) * z
    if HAS_MU:
        mu_ptr = tl.load(mu_table + t).to(tl.pointer_type(tl.float32))
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0)
        leftover += undo_mu * mu
        d += dir_mu * mu

    theta = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - leftover) * decay
    g = d * grad
    if RULE == 0:  # momentum: m = beta m + g; theta -= lr m
        m_ptr = tl.load(m_table + t).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + g
        tl.store(m_ptr + offs, m, mask=mask)
        theta = theta - lr * m
    elif RULE == 1:  # Adam on the projected gradient
        m_ptr = tl.load(m_table + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(v_table + t).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + (1.0 - beta1) * g
        v = tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2 + (1.0 - beta2) * (g * g)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        theta = theta - step_size * m / (tl.sqrt(v / bias2) + adam_eps)
    elif RULE == 2:  # sign-SGD
        theta = theta - lr * tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    else:  # sign of a momentum (LDSD's code): m = beta m + (1 - beta) g; theta -= lr sign(m)
        m_ptr = tl.load(m_table + t).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + (1.0 - beta1) * g
        tl.store(m_ptr + offs, m, mask=mask)
        theta = theta - lr * tl.where(m > 0, 1.0, tl.where(m < 0, -1.0, 0.0))
    tl.store(x_ptr + offs, theta.to(DTYPE), mask=mask)


def dense_update_many(rule: str, xs: list[torch.Tensor], keys, undo, direction,
                      state: dict[str, list[torch.Tensor]], grad: float, lr: float, decay: float = 1.0,
                      mus: list[torch.Tensor] | None = None, undo_mu: float = 0.0, dir_mu: float = 0.0,
                      beta1: float = 0.0, beta2: float = 0.0, step_size: float = 0.0, bias2: float = 1.0,
                      adam_eps: float = 1e-8) -> None:
    """One fused restore+update launch over tensors ``xs`` (one dtype and device).

    Args:
        rule: ``"momentum"``, ``"adam"``, ``"sign"`` or ``"sign_momentum"``.
        xs: the trainables.
        keys: ``[len(xs), seeds]`` Philox keys (``qzo.noise.derive_seeds``) of the union of the
            leftover's and the direction's seeds; ``undo`` and ``direction`` their coefficients
            (0 where a seed is absent from one of them).
        state: role (``"m"``, ``"v"``) -> float32 state tensors, one per trainable.
        grad, lr, decay: projected gradient, learning rate, ``1 - lr * weight_decay``.
        mus, undo_mu, dir_mu: the strategy's mean (LDSD) and its coefficients.
        beta1, beta2, step_size, bias2, adam_eps: the rule's constants (momentum's beta is
            ``beta1``, and sign_momentum's; Adam's ``step_size = lr / (1 - beta1**t)`` and ``bias2 = 1 - beta2**t``).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; kernels exist for {list(RULES)}")
    if not xs:
        return
    code, roles_needed = RULES[rule]
    has_mu = mus is not None and (undo_mu != 0.0 or dir_mu != 0.0)
    roles = {"x": xs, **{r: state[r] for r in roles_needed}}
    if has_mu:
        roles["mu"] = mus
    for ts in roles.values():
        if any(not t.is_contiguous() for t in ts):
            raise ValueError("dense update kernel needs contiguous tensors")
    if xs[0].dtype not in TL_DTYPES or any(x.dtype != xs[0].dtype for x in xs):
        raise ValueError("dense update kernel needs trainables of one supported dtype; group them first")
    table = table_for(roles, BLOCK)
    if table.n_blocks == 0:
        return
    keys, a_undo, a_dir = step_vectors(keys, undo, direction, device=xs[0].device)
    x_ptrs = table.ptrs["x"]
    _dense_update_kernel[(table.n_blocks,)](
        x_ptrs, table.ptrs.get("mu", x_ptrs), table.ptrs.get("m", x_ptrs), table.ptrs.get("v", x_ptrs),
        table.numels, table.block_tensor, table.block_start, keys, a_undo, a_dir, len(undo),
        float(undo_mu), float(dir_mu), float(grad), float(lr), float(decay), float(beta1), float(beta2),
        float(step_size), float(bias2), float(adam_eps),
        DTYPE=TL_DTYPES[xs[0].dtype], RULE=code, HAS_MU=has_mu, BLOCK=BLOCK)
