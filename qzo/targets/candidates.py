"""Pool-batched candidate evaluation: K LoRA candidates of a pool in one stacked forward.

A pool strategy (GV, Greedy, LDSD) evaluates K candidates ``theta + delta_j`` with
``delta_j = sum coef * z(seed) [+ mu_coef * mu]``. Run one by one, that is K forwards, each
reading and dequantizing every quantized base weight again. When the trainables are LoRA
adapters, the candidates differ only inside the small adapter matmuls, so all K fit in one
forward: the batch is stacked K times along the batch dimension (rows ``j*B:(j+1)*B`` belong
to candidate j), the quantized base layers run once on the stacked batch (weights read and
dequantized once for all candidates), and inside every peft LoRA layer the ``lora_A`` /
``lora_B`` linears multiply row block j by that candidate's own perturbed factor.

The perturbed factors are built per layer, inside that layer's forward, and dropped right
after it (never K copies of the adapters at once): ``W_j = copy of W`` perturbed by
:func:`qzo.noise.passes.perturb_` with candidate j's seeds, i.e. with exactly the arithmetic that
perturbing the trainables in place uses (the same noise, the same float32 summation order,
one rounding), and on the same backend. The trainables themselves are never written.

What the stacked forward costs: the activations (and logits) of a ``K*B``-row batch, the
memory of an inference forward at K times the batch; use ``batched=False`` when that does
not fit. The per-candidate losses are reduced one candidate at a time, so the float32
upcast of the logits and the log-softmax temporaries stay those of one candidate.

Semantics kept from peft: the LoRA scaling and the input cast are peft's own (only the two
factor linears are replaced); dropout runs on the stacked rows, which is the identity in
eval mode (qzo's default is dropout 0 and the model in eval mode). LoRA variants that read
the factor weights directly (DoRA) are refused, since the replaced forward would not see
them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from ..errors import QzoError
from ..noise.passes import Candidate, perturb_
from ..zo.params import ParamSet, Trainable

__all__ = ["Candidate", "lora_candidates"]

def _lora_factors(model) -> dict[int, tuple[torch.nn.Linear, bool, str]]:
    """data_ptr of each peft LoRA factor weight -> (the factor linear, uses a variant, its module path)."""
    found = {}
    for path, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        dora = getattr(module, "use_dora", {}) or {}
        for adapter, a in lora_a.items():
            variant = adapter in variants or bool(dora.get(adapter, False))
            for kind, factor in (("lora_A", a), ("lora_B", lora_b[adapter])):
                if isinstance(factor, torch.nn.Linear):
                    found[factor.weight.data_ptr()] = (factor, variant, f"{path}.{kind}.{adapter}")
    return found


def _match_trainables(model, params: ParamSet) -> list[tuple[torch.nn.Linear, Trainable]]:
    """Each trainable paired with the LoRA factor linear whose weight *is* it (same storage).

    Matched by storage, not by name: the trainable is the live tensor that in-place
    perturbation writes, so identity is what makes the batched and the one-by-one
    evaluations see the same values, whatever the names say.
    """
    factors = _lora_factors(model)
    pairs = []
    for t in params:
        hit = factors.get(t.tensor.data_ptr())
        factor = hit[0] if hit else None
        if factor is None or factor.weight.shape != t.tensor.shape or factor.weight.dtype != t.tensor.dtype:
            raise QzoError(
                f"batched pool evaluation perturbs LoRA factors inside the forward, but trainable {t.name!r} is not "
                "a lora_A/lora_B weight of the model given to qzo.CausalLMLoss. Train qzo.lora(model, ...)'s adapters "
                "of that same model, or build the strategy with batched=False.")
        if hit[1]:
            raise QzoError(f"batched pool evaluation does not support LoRA variants such as DoRA ({hit[2]}): they "
                           "read the factor weights outside the factor's forward. Use batched=False.")
        pairs.append((factor, t))
    return pairs


def _candidate_forward(factor: torch.nn.Linear, t: Trainable, candidates: Sequence[Candidate], mu):
    """A replacement ``forward`` for one factor: row block j times (W + candidate j's delta)^T."""
    k = len(candidates)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % k:
            raise QzoError(f"a LoRA layer saw {x.shape[0]} rows, not a multiple of the {k} stacked candidates; "
                           "batched evaluation needs the batch dimension first")
        w = factor.weight.detach()
        # K perturbed copies of this one factor, built here and freed on return; perturb_ is the
        # arithmetic (and backend) of the in-place path, so W_j is what perturbing x would give
        weights = w.unsqueeze(0).repeat(k, *([1] * w.dim()))
        for j, c in enumerate(candidates):
            perturb_(weights[j], t.stream, [s for s, _ in c.terms], t.coefs([a for _, a in c.terms]), mu=mu,
                     mu_coef=c.mu_coef)
        if weights.device != x.device:
            weights = weights.to(x.device)
        y = torch.bmm(x.reshape(k, -1, x.shape[-1]), weights.transpose(1, 2))
        if factor.bias is not None:
            y = y + factor.bias.to(y.device)
        return y.reshape(*x.shape[:-1], weights.shape[1])

    return forward


_NO_FORWARD = object()


@contextmanager
def lora_candidates(model, params: ParamSet, candidates: Sequence[Candidate],
                    mean: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Inside the block, row block j of every forward through ``model``'s LoRA layers uses candidate j.

    The batch fed to ``model`` must be ``len(candidates)`` copies stacked along dim 0 (see
    :func:`stack_batch`). The trained ``lora_A``/``lora_B`` linears get a replacement
    ``forward`` for the duration of the block; the original is put back on exit, also when
    the forward raises. Raises :class:`QzoError` if a trainable is not a LoRA factor of
    ``model``.
    """
    candidates = list(candidates)
    pairs = _match_trainables(model, params)
    patched = []
    try:
        for factor, t in pairs:
            mu = mean.get(t.name) if mean is not None else None
            patched.append((factor, factor.__dict__.get("forward", _NO_FORWARD)))
            factor.forward = _candidate_forward(factor, t, candidates, mu)
        yield
    finally:
        for factor, saved in reversed(patched):
            if saved is _NO_FORWARD:
                del factor.forward
            else:
                factor.forward = saved
