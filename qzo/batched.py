"""Former home of the pool-batched candidate machinery and of the causal-LM loss, kept so old imports work.

The machinery is :mod:`qzo.candidates` (LoRA candidates evaluated inside the adapter
matmuls), the loss :mod:`qzo.loss`. Nothing in qzo imports this module, so it adds no edge
to the import graph that qzo's own modules use.
"""

from .candidates import Candidate, lora_candidates
from .loss import BatchedLoss, CausalLMLoss, causal_lm_loss, stack_batch

__all__ = ["Candidate", "lora_candidates", "BatchedLoss", "CausalLMLoss", "causal_lm_loss", "stack_batch"]
