"""Distributed zeroth-order steps over ``torch.distributed``: only seeds' losses cross ranks.

A ZO update is a handful of scalars, so ranks never exchange gradients or weights. Every
rank holds the whole model and the same trainables, draws the same seeds (they are a pure
function of ``(seed, step, j)``), and walks the trainables through *the same* sequence of
in-place perturbations as a single process would. What is split is who runs the forwards:

- **candidate-parallel** (``candidate_parallel = C`` slots): the evaluations of a step come in
  groups that do not depend on each other (SPSA's +/- pair, a GV/Greedy/LDSD/FZOO pool,
  ConMeZO's pair); evaluation i of a group is run by the ranks of slot ``i % C``, and the
  others only apply the perturbation pass (cheap next to a forward) and skip the forward.
- **data-parallel** (``D = world / C`` shards): each rank of a slot evaluates its shard of
  the batch (:func:`shard_rows`).

One ``all_reduce`` (SUM) per group then gives every rank every loss. Each rank writes its
shard's *token sum* and *token count* for the evaluations it ran and zeros elsewhere, so the
reduced loss is ``sum_r s_r / sum_r c_r``: the token mean over the whole batch, exactly what
one process computes up to the float rounding of that sum. With one shard (``D = 1``) a loss
comes from a single rank and is passed through unchanged, so a candidate-parallel run equals
the single-process run bit for bit (the same perturbation passes, the same forwards), given
the same kernels. Every rank then applies the identical update; :meth:`Distributed.check`
compares a checksum of the trainables across ranks every ``train.check_every`` steps.

Faults: a collective that fails (a peer died: gloo sees the socket close) or times out (a
peer hangs: ``timeout_s``) raises :class:`DistributedError` naming this rank, the step and
what was being exchanged; on gloo a short monitored barrier then names the ranks that did
not answer. Under ``torchrun`` the agent also stops the remaining workers and names the
rank that exited.

Bytes on the wire per step (measured by :attr:`Distributed.bytes_sent`): 16 bytes per
evaluation (a float64 sum and count), e.g. 32 bytes for an SPSA step, against 4 bytes per
LoRA value (1.8 MB for the demo's 460,800) for a first-order DDP gradient all-reduce.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch

from ..errors import QzoError
from .params import digest_tensors

__all__ = ["Distributed", "DistributedError", "init_from_env", "shard_rows", "trainables_checksum"]


class DistributedError(QzoError):
    """A collective between ranks failed or timed out, or the ranks' trainables disagree."""


@dataclass
class Layout:
    """Where one rank sits: its candidate slot and its data shard."""

    rank: int
    world: int
    candidate_parallel: int

    @property
    def shards(self) -> int:
        return self.world // self.candidate_parallel

    @property
    def slot(self) -> int:
        return self.rank % self.candidate_parallel

    @property
    def shard(self) -> int:
        return self.rank // self.candidate_parallel


def shard_rows(rows: int, shards: int, shard: int) -> slice:
    """The contiguous rows of a batch that data shard ``shard`` of ``shards`` evaluates (sizes differ by <= 1)."""
    base, extra = divmod(rows, shards)
    start = shard * base + min(shard, extra)
    return slice(start, start + base + (1 if shard < extra else 0))


class Distributed:
    """How a ``qzo.ZO`` step spreads over the ranks of a ``torch.distributed`` process group.

    Args:
        group: the process group (default: the world, ``torch.distributed`` initialized).
        candidate_parallel: C, the candidate slots; the world must be a multiple of C, and
            ``world / C`` ranks share each slot's evaluations as data shards. 1 (default):
            pure data-parallel; ``world``: pure candidate-parallel.
        timeout_s: how long a collective may wait for a peer before the run stops (the
            process group's own timeout applies too; :func:`init_from_env` sets it to this).

    Example (under ``torchrun --nproc-per-node 2``)::

        dist = qzo.distributed.init_from_env(candidate_parallel=2)
        opt = qzo.ZO(params, strategy=qzo.FZOO(probes=4), rule=qzo.SGD(lr=1e-3), distributed=dist)
        loss = opt.step(qzo.CausalLMLoss(model, batch))   # the same batch on every rank
    """

    def __init__(self, group=None, candidate_parallel: int = 1, timeout_s: float = 300.0):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise QzoError("qzo.Distributed needs torch.distributed initialized: start with torchrun and call "
                           "qzo.distributed.init_from_env() (or torch.distributed.init_process_group) first")
        self._dist, self.group = dist, group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        c = int(candidate_parallel)
        if c < 1 or world % c:
            raise QzoError(f"train.candidate_parallel={candidate_parallel} must be >= 1 and divide the world size "
                           f"{world} (each candidate slot gets world / candidate_parallel data shards)")
        self.layout = Layout(rank, world, c)
        self.timeout_s = float(timeout_s)
        self.step = 0  # set by qzo.ZO before each step: named in error messages
        self.bytes_sent = 0  # payload of this rank's collectives (what crosses the wire from it)
        self.collectives = 0
        self.owns_group = False  # init_from_env created the process group (so whoever ends the run closes it)

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world(self) -> int:
        return self.layout.world

    def owns(self, index: int) -> bool:
        """Whether this rank runs evaluation ``index`` of a group (it sits in slot ``index % C``)."""
        return index % self.layout.candidate_parallel == self.layout.slot

    def rows(self, rows: int) -> slice:
        """This rank's rows of a ``rows``-row batch (its data shard)."""
        return shard_rows(rows, self.layout.shards, self.layout.shard)

    def _all_reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        tensor = tensor.to(_comm_device(self._dist, self.group))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.collectives += 1
        try:
            work = self._dist.all_reduce(tensor, group=self.group, async_op=True)
            if not work.wait(timeout=datetime.timedelta(seconds=self.timeout_s)):
                raise RuntimeError(f"no answer within {self.timeout_s:g} s")
        except RuntimeError as exc:
            raise DistributedError(self._fault_message(what, exc)) from None
        return tensor.cpu()

    def _fault_message(self, what: str, exc: Exception) -> str:
        silent = self._silent_ranks()
        who = f"; ranks that did not answer: {silent}" if silent else ""
        return (f"rank {self.rank} of {self.world}: exchanging {what} at step {self.step} failed ({exc}): another rank "
                f"died or hangs{who}. The last checkpoint is intact; fix the cause and continue with "
                "qzo train --resume RUN (any world size).")

    def _silent_ranks(self) -> str:
        """The ranks a short gloo monitored barrier does not hear from (named on rank 0 only)."""
        try:
            if self._dist.get_backend(self.group) != "gloo":
                return ""
            self._dist.monitored_barrier(group=self.group, timeout=datetime.timedelta(seconds=5),
                                         wait_all_ranks=True)
        except RuntimeError as exc:
            text = str(exc)
            return text[text.find("Ranks"):].split("\n")[0] if "Ranks" in text else ""
        return ""

    def reduce_losses(self, values: list, what: str = "losses") -> list[float]:
        """Every evaluation's loss on every rank: ``values[i]`` is ``(loss, tokens)`` where this rank ran i, else None.

        ``tokens`` (the shard's labelled-token count, or ``None`` for a closure that does not
        say) weights the shards; with one shard the loss passes through unchanged.
        """
        one_shard = self.layout.shards == 1
        buf = torch.zeros(len(values), 2, dtype=torch.float64)
        for i, v in enumerate(values):
            if v is not None:
                loss, tokens = v
                weight = 1.0 if one_shard or tokens is None else float(tokens)
                buf[i, 0], buf[i, 1] = float(loss) * weight, weight
        out = self._all_reduce(buf, what)
        return [float(s) if one_shard else float(s / c) if c > 0 else float("nan") for s, c in out.tolist()]

    def gather_rows(self, total_rows: int, local: slice | None, losses: list[float], counts: list[float]):
        """Per-row losses and token counts of the whole batch from the shards that ran them (per-example steps)."""
        buf = torch.zeros(total_rows, 2, dtype=torch.float64)
        if local is not None:
            buf[local, 0] = torch.tensor(losses, dtype=torch.float64)
            buf[local, 1] = torch.tensor(counts, dtype=torch.float64)
        out = self._all_reduce(buf, "per-row losses")
        return out[:, 0].tolist(), out[:, 1].tolist()

    def total_rows(self, local_rows: int | None) -> int:
        """The rows of the whole batch: the sum of the shards' rows (of the ranks that run evaluation 0)."""
        buf = torch.zeros(self.layout.shards, dtype=torch.float64)
        if local_rows is not None:
            buf[self.layout.shard] = float(local_rows)
        return int(self._all_reduce(buf, "row counts").sum().item())

    def any_rank(self, flag: bool, what: str = "a flag") -> bool:
        """``flag`` on any rank (one tiny all-reduce), so every rank takes the same decision (e.g. to stop)."""
        return bool(self._all_reduce(torch.tensor([1.0 if flag else 0.0]), what).item() > 0)

    def from_rank0(self, value):
        """``value`` as rank 0 has it, on every rank (a picklable object: a path, a checkpoint's name)."""
        box = [value]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. until rank 0 has cut the logs the others read)."""
        self._dist.barrier(group=self.group)

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        """Stop with :class:`DistributedError` naming the ranks whose trainables differ from rank 0's."""
        mine = trainables_checksum(tensors)
        buf = torch.zeros(self.world, dtype=torch.int64)
        buf[self.rank] = mine
        sums = self._all_reduce(buf, "trainables checksums").tolist()
        differ = [r for r, c in enumerate(sums) if c != sums[0]]
        if differ:
            raise DistributedError(
                f"the trainables of rank(s) {differ} differ from rank 0's after step {self.step} (checksums "
                f"{[hex(c & 0xFFFFFFFFFFFFFFFF) for c in sums]}): the ranks no longer apply the same update (a "
                "nondeterministic kernel, a rank that was altered, or different data). Stopped before writing more; "
                "resume from the last checkpoint, which rank 0 wrote from its own values.")


def trainables_checksum(tensors: dict[str, torch.Tensor]) -> int:
    """A 63-bit hash of the trainables' bytes, in name order (equal only when every bit is)."""
    h = digest_tensors(sorted(tensors.items()), hashlib.blake2b(digest_size=8))
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


def _comm_device(dist, group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def init_from_env(candidate_parallel: int = 1, timeout_s: float = 300.0) -> Distributed | None:
    """Join the ``torchrun`` job this process belongs to (``WORLD_SIZE`` > 1); ``None`` for a single process.

    gloo on CPU, NCCL with CUDA (each rank on ``cuda:LOCAL_RANK``). An already initialized
    default group is reused (and left open: its owner closes it).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return None
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise QzoError(f"WORLD_SIZE={world} says this is one of {world} processes, but {', '.join(missing)} "
                           "is not set: start distributed runs with torchrun (torchrun --nproc-per-node N -m qzo train "
                           "CONFIG), or unset WORLD_SIZE for one process")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        made = Distributed(candidate_parallel=candidate_parallel, timeout_s=timeout_s)
        made.owns_group = True
        return made
    return Distributed(candidate_parallel=candidate_parallel, timeout_s=timeout_s)
