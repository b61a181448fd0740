"""Launch tables: many tensors of one dtype described to a single kernel launch.

A ZO step touches every trained tensor with the same seeds; for LoRA that is hundreds of
small tensors (a 7B model with r 8 on q,v: 128 tensors of 32k values), and one launch each
would cost more in launch latency than the work itself. A :class:`Table` lists the base
pointer of each tensor (and of its companions: LDSD's mean, a rule's moments), its size,
and for every BLOCK-sized tile of work which tensor and which element it starts at, so one
launch covers them all. Tables depend only on the tensors' storage, so they are built once
and reused every step (keyed by the data pointers); only the key and coefficient vectors
change per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Table", "table_for", "step_vectors"]

_CACHE: dict[tuple, "Table"] = {}
_CACHE_LIMIT = 64


@dataclass
class Table:
    """Device arrays for one launch (see the module docstring).

    Attributes:
        ptrs: role -> int64 tensor of base addresses, one per tensor (``"x"`` always present).
        numels: int64 sizes of the tensors.
        block_tensor: int32 tensor index of every tile.
        block_start: int64 first element of every tile.
    """

    ptrs: dict[str, torch.Tensor]
    numels: torch.Tensor
    block_tensor: torch.Tensor
    block_start: torch.Tensor

    @property
    def n_blocks(self) -> int:
        return int(self.block_tensor.numel())


def table_for(roles: dict[str, list[torch.Tensor]], block: int) -> Table:
    """The (cached) table for tensors ``roles["x"]`` and their same-shaped companions.

    All tensors of a role share one dtype; companions (``mu``, ``m``, ``v``) are float32.
    """
    xs = roles["x"]
    device = xs[0].device
    key = (block, device) + tuple(
        (role, tuple((t.data_ptr(), t.numel(), t.dtype) for t in ts)) for role, ts in sorted(roles.items())
    )
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    numels = [t.numel() for t in xs]
    blocks = [(i, start) for i, n in enumerate(numels) for start in range(0, n, block)]
    ptrs = {role: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)
            for role, ts in roles.items()}
    table = Table(
        ptrs=ptrs,
        numels=torch.tensor(numels, dtype=torch.int64, device=device),
        block_tensor=torch.tensor([b[0] for b in blocks], dtype=torch.int32, device=device),
        block_start=torch.tensor([b[1] for b in blocks], dtype=torch.int64, device=device),
    )
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = table
    return table


def step_vectors(keys, *coef_lists, device) -> tuple[torch.Tensor, ...]:
    """Per-step device inputs: the Philox keys ``[tensors, seeds]`` (int64) and each coefficient list (float32).

    The keys come from the caller (``qzo.noise.derive_seeds(seeds, streams)``): how a seed and a
    stream become a key is part of qzo's noise contract, which this package does not import.

    Coefficients are float32 because the torch reference multiplies float32 noise by a
    Python float, which torch rounds to float32 first.
    """
    keys = torch.from_numpy(np.ascontiguousarray(np.asarray(keys, dtype=np.int64).reshape(len(keys), -1)))
    keys = keys.to(device, non_blocking=True)
    coefs = [torch.from_numpy(np.asarray(c, dtype=np.float32)).to(device, non_blocking=True) for c in coef_lists]
    return (keys, *coefs)
