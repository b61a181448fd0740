"""The causal-LM loss every run uses (:class:`CausalLMLoss`), with logits computed only where a label is.

:class:`CausalLMLoss` is the ``opt.step`` closure of a batch; it also evaluates a pool of
LoRA candidates in one stacked forward (the candidate machinery is :mod:`qzo.targets.candidates`) and
one loss per row (per-example directions). Underneath it:

``model(**batch).loss`` runs the LM head on every position and keeps the whole
``[batch, seq, vocab]`` logits, plus their float32 upcast and log-softmax for the loss. For a
128k-vocabulary model at 8 x 512 that is 5.2 GiB, more than the 4-bit weights of an 8B model,
and most of it is spent on prompt and padding positions whose labels are ``-100``.

:func:`labelled_loss` runs the decoder, gathers the hidden states of the labelled positions
(position t predicts label t+1), and applies the head and the cross entropy to at most
:data:`CHUNK_BYTES` worth of logits at a time. The value is the same token-mean cross
entropy (summed per chunk in float32, so equal to float rounding), the peak holds one chunk
of logits instead of all of them, and the head's matmul is skipped where nothing is learned
(on the CPU demo a third of the positions carry a label).

Only architectures whose head output *is* the logits are handled (``SUPPORTED``: no final
soft-capping or logit scaling between head and loss); for anything else, or a model whose
decoder and head cannot be found, ``labelled_loss`` returns ``None``;
:func:`batch_loss`, what callers use, then falls back to ``model(**batch).loss``.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch

from ..errors import QzoError
from ..targets.candidates import Candidate, lora_candidates
from ..zo.params import ParamSet

__all__ = ["CausalLMLoss", "BatchedLoss", "causal_lm_loss", "stack_batch", "batch_loss", "labelled_loss", "head_loss",
           "row_losses", "decoder_and_head", "chunk_tokens", "CHUNK_BYTES", "SUPPORTED"]

IGNORE = -100
#: logits (and their float32 copies) materialized at once: 256 MiB, ~210 tokens of a 128k vocabulary
CHUNK_BYTES = 256 * 2**20
#: model types whose ``lm_head(hidden)`` is the logits the loss sees
SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "smollm3")


def decoder_and_head(model):
    """``(decoder, head)`` of a supported causal LM (peft wrapper or not), else ``None``."""
    from ..targets import unwrap_peft

    model = unwrap_peft(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    decoder = get_decoder() if get_decoder else None
    head = get_head() if get_head else None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def chunk_tokens(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: logits in 2 bytes plus two float32 copies (upcast, log-softmax) per entry."""
    return max(1, chunk_bytes // (vocab * 10))


def head_loss(hidden: torch.Tensor, labels: torch.Tensor, head, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Token-mean next-token cross entropy from the decoder's ``hidden`` states ``[B, T, H]``.

    Labels are shifted left by one (position t predicts label t+1) and ``-100`` is ignored,
    as transformers' ``ForCausalLMLoss`` does; the mean runs over every labelled token of
    the batch, in float32. NaN when no position carries a label (as the model's own loss).
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:].to(hidden.device)
    keep = shifted != IGNORE
    states, targets = hidden[keep], shifted[keep]  # [N, H], [N]
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # sizes the chunks
    n, step = states.shape[0], chunk_tokens(vocab, chunk_bytes)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, step):
        logits = head(states[start:start + step]).float()
        part = torch.nn.functional.cross_entropy(logits, targets[start:start + step].to(logits.device),
                                                 reduction="sum")
        total = total + part.to(total.device)
    return total / n if n else torch.full((), float("nan"), device=hidden.device)


def row_losses(hidden: torch.Tensor, labels: torch.Tensor, head, chunk_bytes: int = CHUNK_BYTES
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: the next-token cross entropy *summed* over its labelled tokens, and their count.

    ``(sums, counts)``, float32 ``[B]`` each, from the decoder's ``hidden`` ``[B, T, H]``, the
    same shift and ``-100`` masking as :func:`head_loss`; ``sums.sum() / counts.sum()`` is the
    batch's token-mean loss, and ``sums / counts`` each row's own. What per-example strategies
    (a perturbation per row inside one forward) weight their rows by.
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:].to(hidden.device)
    keep = shifted != IGNORE
    row_of = torch.arange(labels.shape[0], device=hidden.device).unsqueeze(1).expand_as(keep)[keep]  # [N]
    states, targets = hidden[keep], shifted[keep]  # [N, H], [N]
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    step = chunk_tokens(vocab, chunk_bytes)
    for start in range(0, states.shape[0], step):
        logits = head(states[start:start + step]).float()
        part = torch.nn.functional.cross_entropy(logits, targets[start:start + step].to(logits.device),
                                                 reduction="none")
        sums.index_add_(0, row_of[start:start + step].to(sums.device), part.to(sums.device))
    return sums, keep.sum(dim=1).to(torch.float32)


def labelled_loss(model, batch: dict, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor | None:
    """The model's loss on ``batch`` from logits at labelled positions only; ``None`` if unsupported."""
    parts = decoder_and_head(model)
    if parts is None:
        return None
    decoder, head = parts
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs.setdefault("use_cache", False)
    hidden = decoder(**inputs).last_hidden_state
    return head_loss(hidden, batch["labels"], head, chunk_bytes)


def batch_loss(model, batch: dict) -> torch.Tensor:
    """The value of ``model(**batch).loss``: from labelled positions (:func:`labelled_loss`) where supported."""
    loss = labelled_loss(model, batch)
    if loss is not None:
        return loss
    # no KV cache: a packed batch's position ids only become a block-diagonal mask without one (qzo.data.dataset)
    return model(**{"use_cache": False, **batch}).loss


class BatchedLoss(Protocol):
    """A closure that can also evaluate several candidates in one forward (what ``batched=True`` needs).

    Calling it returns the loss at the trainables' current values, as any ``opt.step``
    closure does. :meth:`evaluate_candidates` returns one loss per candidate, each equal (to
    float rounding) to what calling it would return with that candidate applied.
    """

    def __call__(self): ...

    def evaluate_candidates(self, params: ParamSet, candidates: Sequence[Candidate],
                            mean: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor: ...


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
    positions' logits only, a chunk at a time, see ``qzo.data.loss``), so it replaces ``lambda:
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
        return batch_loss(self.model, self.batch)  # logits only where a label is (qzo.data.loss)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.model, "loss_function", None)
        if fn is None:
            return causal_lm_loss(logits, labels)
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None) or logits.shape[-1]
        return fn(logits=logits, labels=labels, vocab_size=vocab)

    @torch.no_grad()
    def evaluate_candidates(self, params: ParamSet, candidates: Sequence[Candidate],
                            mean: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The loss with each candidate applied, from one forward over the batch stacked ``len(candidates)`` times.

        Args:
            params: the trainables; each must be a ``lora_A``/``lora_B`` weight of ``model``.
            candidates: perturbations relative to the trainables' current values.
            mean: name -> the strategy's dense mean (for candidates with a ``mu_coef``).

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
            with lora_candidates(self.model, params, candidates, mean):
                hidden = decoder(**stacked).last_hidden_state
            return torch.stack([head_loss(hidden[j * rows:(j + 1) * rows], labels, head).reshape(())
                                for j in range(k)])
        with lora_candidates(self.model, params, candidates, mean):
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
                      mean: Mapping[str, torch.Tensor] | None = None
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
            raise QzoError("per-example perturbations need a supported causal LM (qzo.data.loss.SUPPORTED) whose LM head "
                           "carries no LoRA; use a pool strategy instead")
        decoder, head = parts
        inputs = {key: v for key, v in self.batch.items() if key != "labels"}
        inputs.setdefault("use_cache", False)
        with lora_candidates(self.model, params, candidates, mean):
            hidden = decoder(**inputs).last_hidden_state
        sums, counts = row_losses(hidden, self.batch["labels"], head)
        return sums / counts.clamp_min(1), counts
