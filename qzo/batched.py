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
:func:`qzo.perturb.perturb_` with candidate j's seeds, i.e. with exactly the arithmetic that
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
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from .errors import QzoError
from .loss import batch_loss, decoder_and_head, head_loss, row_losses
from .params import ParamSet, Trainable
from .perturb import perturb_

__all__ = ["Candidate", "BatchedLoss", "CausalLMLoss", "causal_lm_loss", "lora_candidates", "stack_batch"]


@dataclass(frozen=True)
class Candidate:
    """One perturbation to evaluate, relative to the trainables' current values.

    The candidate's values are ``x + sum coef * z(seed, stream) + mu_coef * mu`` for each
    trainable ``x`` (``mu`` the strategy's dense mean, LDSD only).
    """

    terms: tuple[tuple[int, float], ...]
    mu_coef: float = 0.0


class BatchedLoss(Protocol):
    """A closure that can also evaluate several candidates in one forward (what ``batched=True`` needs).

    Calling it returns the loss at the trainables' current values, as any ``opt.step``
    closure does. :meth:`evaluate_candidates` returns one loss per candidate, each equal (to
    float rounding) to what calling it would return with that candidate applied.
    """

    def __call__(self): ...

    def evaluate_candidates(self, params: ParamSet, candidates: Sequence[Candidate],
                            mu_for: Callable[[str], torch.Tensor | None] | None = None) -> torch.Tensor: ...


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Token-mean cross entropy of next-token prediction, as transformers' ``ForCausalLMLoss`` computes it.

    Labels are padded on the right with ``ignore_index`` and shifted left by one (position t
    predicts label t+1), logits are upcast to float32, and the mean runs over every label
    that is not ``ignore_index`` in the whole batch. The fallback for models without a
    ``loss_function`` attribute; models that have one use their own.
    """
    logits = logits.float()
    shift = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), shift.view(-1).to(logits.device),
                                             ignore_index=ignore_index, reduction="mean")


def stack_batch(batch: dict, k: int) -> dict:
    """Every tensor of ``batch`` repeated ``k`` times along dim 0 (copy j is rows ``j*B:(j+1)*B``).

    Non-tensor values pass through. Every tensor must have the batch size as its first dim:
    a tensor that does not cannot be split per candidate, so it is refused rather than guessed.
    """
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    scalars = [key for key, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
    if len(sizes) != 1 or scalars:
        raise QzoError(f"batched evaluation stacks the batch per candidate along dim 0, but the batch's tensors do "
                       f"not share one batch size (first dims {sorted(sizes)}, 0-dim {scalars}); pass a batch of "
                       "[B, ...] tensors or use batched=False")
    return {key: v.repeat(k, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v
            for key, v in batch.items()}


def _has_lora(module) -> bool:
    """Whether LoRA factors live inside ``module`` (a LoRA-adapted head must see whole candidate blocks)."""
    return any(isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) for m in module.modules())


class CausalLMLoss:
    """The loss of a causal LM on one batch: an ``opt.step`` closure that can also batch a pool.

    ``loss()`` returns the value of ``model(**batch).loss`` (computed from the labelled
    positions' logits only, a chunk at a time, see ``qzo.loss``), so it replaces ``lambda:
    model(**batch).loss`` anywhere and needs a fraction of its memory. With a strategy built
    with ``batched=True``, the optimizer calls :meth:`evaluate_candidates` instead, which
    evaluates the whole pool in one stacked forward (see the module docs).

    Args:
        model: the causal LM the LoRA trainables live in (the model ``qzo.lora`` was given,
            or its ``peft_model``).
        batch: the model's keyword inputs, with ``labels`` (``-100`` where not trained).

    Example::

        params = qzo.lora(model, r=8, target_modules=["q_proj", "v_proj"])
        opt = qzo.ZO(params, strategy=qzo.GV(pool=4, batched=True), rule=qzo.SGD(lr=1e-3), eps=1e-2)
        loss = opt.step(qzo.CausalLMLoss(model, batch))
    """

    def __init__(self, model, batch: dict):
        if not isinstance(batch.get("labels"), torch.Tensor):
            raise QzoError("CausalLMLoss needs a batch with a 'labels' tensor (-100 where no loss is taken)")
        self.model = model
        self.batch = batch

    def __call__(self) -> torch.Tensor:
        return batch_loss(self.model, self.batch)  # logits only where a label is (qzo.loss)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.model, "loss_function", None)
        if fn is None:
            return causal_lm_loss(logits, labels)
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None) or logits.shape[-1]
        return fn(logits=logits, labels=labels, vocab_size=vocab)

    @torch.no_grad()
    def evaluate_candidates(self, params: ParamSet, candidates: Sequence[Candidate],
                            mu_for: Callable[[str], torch.Tensor | None] | None = None) -> torch.Tensor:
        """The loss with each candidate applied, from one forward over the batch stacked ``len(candidates)`` times.

        Args:
            params: the trainables; each must be a ``lora_A``/``lora_B`` weight of ``model``.
            candidates: perturbations relative to the trainables' current values.
            mu_for: name -> the strategy's dense mean (for candidates with a ``mu_coef``).

        Returns:
            A float32 tensor of ``len(candidates)`` losses (each the model's own loss
            function on that candidate's row block: for Llama, the token mean over
            labels != -100 of the shifted cross entropy).
        """
        k = len(candidates)
        if k == 0:
            return torch.zeros(0)
        labels = self.batch["labels"]
        inputs = {key: v for key, v in self.batch.items() if key != "labels"}
        inputs.setdefault("use_cache", False)  # a K-times KV cache that nobody reads
        stacked = stack_batch(inputs, k)
        rows = labels.shape[0]
        parts = decoder_and_head(self.model)
        if parts is not None and not _has_lora(parts[1]):
            decoder, head = parts
            with lora_candidates(self.model, params, candidates, mu_for):
                hidden = decoder(**stacked).last_hidden_state
            return torch.stack([head_loss(hidden[j * rows:(j + 1) * rows], labels, head).reshape(())
                                for j in range(k)])
        with lora_candidates(self.model, params, candidates, mu_for):
            logits = self.model(**stacked).logits
        # one candidate at a time: the float32 upcast and log-softmax are one candidate's size
        return torch.stack([self._loss(logits[j * rows:(j + 1) * rows], labels).float().reshape(())
                            for j in range(k)])


    @property
    def tokens(self) -> int:
        """Labelled positions the loss averages over (next-token targets: ``labels[:, 1:] != -100``).

        A data-parallel step weights each rank's loss by this (``qzo.distributed``), so the
        reduced loss is the token mean over the whole batch.
        """
        return int((self.batch["labels"][:, 1:] != -100).sum())

    @property
    def rows(self) -> int:
        """The batch's rows: how many perturbations :meth:`evaluate_rows` takes."""
        return int(self.batch["labels"].shape[0])

    @torch.no_grad()
    def evaluate_rows(self, params: ParamSet, candidates: Sequence[Candidate],
                      mu_for: Callable[[str], torch.Tensor | None] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i's loss with candidate i applied to it, all rows in one ordinary forward.

        Per-example perturbations: the same machinery as :meth:`evaluate_candidates` with one
        row per block (the batch is not stacked), so it costs about one forward plus B
        small adapter matmuls per LoRA layer.

        Returns:
            ``(losses, counts)``: float32 ``[B]`` token-mean loss of each row under its own
            candidate, and each row's labelled-token count (the batch's token mean weights
            row i by ``counts[i] / counts.sum()``).
        """
        candidates = list(candidates)
        if len(candidates) != self.rows:
            raise ValueError(f"evaluate_rows takes one candidate per row: {len(candidates)} for {self.rows} rows")
        parts = decoder_and_head(self.model)
        if parts is None or _has_lora(parts[1]):
            raise QzoError("per-example perturbations need a supported causal LM (qzo.loss.SUPPORTED) whose LM head "
                           "carries no LoRA; use a pool strategy instead")
        decoder, head = parts
        inputs = {key: v for key, v in self.batch.items() if key != "labels"}
        inputs.setdefault("use_cache", False)
        with lora_candidates(self.model, params, candidates, mu_for):
            hidden = decoder(**inputs).last_hidden_state
        sums, counts = row_losses(hidden, self.batch["labels"], head)
        return sums / counts.clamp_min(1), counts


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
            perturb_(weights[j], t.stream, [s for s, _ in c.terms], [a for _, a in c.terms], mu=mu, mu_coef=c.mu_coef)
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
                    mu_for: Callable[[str], torch.Tensor | None] | None = None) -> Iterator[None]:
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
            mu = mu_for(t.name) if mu_for is not None else None
            patched.append((factor, factor.__dict__.get("forward", _NO_FORWARD)))
            factor.forward = _candidate_forward(factor, t, candidates, mu)
        yield
    finally:
        for factor, saved in reversed(patched):
            if saved is _NO_FORWARD:
                del factor.forward
            else:
                factor.forward = saved
