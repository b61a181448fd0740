"""The input embedding kept in host RAM: token ids go to the CPU, hidden states come back.

Why: bitsandbytes leaves the embedding unquantized, and for a large vocabulary it is a big
share of a 4-bit model's GPU bytes (Llama-3.1-8B: 128,256 x 4096 in bf16 is 0.98 GiB of
its 5.6 GiB of weights). The lookup itself is a gather, cheap on any CPU; what crosses PCIe
per forward is the batch's hidden states (8 x 512 x 4096 x 2 bytes = 32 MiB, about 1.3 ms at
25 GB/s) instead of the weight. The values are exactly those of a lookup on the GPU: an
embedding lookup copies rows, it does not round.

The module keeps its name and parameter (exports, ``state_dict`` and peft see the same
model); only its device and two hooks change. Models that tie the embedding to the LM head
(``tie_word_embeddings``) are refused: the head needs that same weight on the GPU every
forward, so moving it would save nothing and stream 1 GiB per forward.
"""

from __future__ import annotations

import torch

from ..errors import QzoError

__all__ = ["keep_input_embedding_on_host", "execution_device"]


def execution_device(model) -> torch.device:
    """Where the decoder runs: the first device of a parameter that is not the input embedding's."""
    embedding = model.get_input_embeddings()
    skip = {id(p) for p in embedding.parameters()}
    for p in model.parameters():
        if id(p) not in skip and p.device.type not in ("meta", "cpu"):
            return p.device
    return torch.device("cpu")


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def keep_input_embedding_on_host(model, device=None) -> bool:
    """Move ``model``'s input embedding to the CPU and route ids and hidden states around it.

    ``device`` is where the decoder runs (default :func:`execution_device`). Returns whether
    hooks were attached: ``False`` on a model that already runs on the CPU (the lookup is
    there already), unless ``device`` names the CPU explicitly (the tests' way to exercise the
    routing on a machine without a GPU). Sets ``model.qzo_input_device`` to the execution device, where
    :func:`qzo.data.dataset.model_input_device` then puts the batch (attention masks and positions
    are built on the decoder's device; only the ids go down).
    """
    embedding = model.get_input_embeddings()
    if embedding is None or not isinstance(embedding, torch.nn.Embedding):
        raise QzoError("model.embedding_on_cpu: this model has no nn.Embedding input embedding; unset the option")
    if _tied(model):
        raise QzoError("model.embedding_on_cpu: this model ties its input embedding to the LM head "
                       "(tie_word_embeddings), which needs the same weight on the GPU every forward, so keeping it on "
                       "the CPU saves nothing; unset model.embedding_on_cpu for this model")
    if device is None:
        device = execution_device(model)
        if device.type == "cpu":
            return False
    device = torch.device(device)
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(embedding)  # accelerate's dispatch hook would move the ids back to the GPU first
    embedding.to("cpu")
    embedding.register_forward_pre_hook(lambda _module, args: tuple(
        a.to("cpu") if torch.is_tensor(a) else a for a in args))
    embedding.register_forward_hook(lambda _module, _args, out: out.to(device, non_blocking=True))
    model.qzo_input_device = device
    return True
