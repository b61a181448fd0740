"""The causal-LM loss, with logits computed only where a label is, a chunk at a time.

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

import torch

__all__ = ["batch_loss", "labelled_loss", "head_loss", "row_losses", "decoder_and_head", "chunk_tokens",
           "CHUNK_BYTES", "SUPPORTED"]

IGNORE = -100
#: logits (and their float32 copies) materialized at once: 256 MiB, ~210 tokens of a 128k vocabulary
CHUNK_BYTES = 256 * 2**20
#: model types whose ``lm_head(hidden)`` is the logits the loss sees
SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "smollm3")


def decoder_and_head(model):
    """``(decoder, head)`` of a supported causal LM (peft wrapper or not), else ``None``."""
    from .targets import unwrap_peft

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
    # no KV cache: a packed batch's position ids only become a block-diagonal mask without one (qzo.data)
    return model(**{"use_cache": False, **batch}).loss
