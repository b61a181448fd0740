"""What zeroth-order optimization trains: an ordered set of named tensors with stream ids.

Every trainable tensor gets a *stream id*, the second half of the noise key (see
``qzo.noise``). It is derived from the tensor's name, so the noise a tensor receives does
not depend on which other tensors are trained or in what order they are listed. Tensors
passed without names are named by position (``"0"``, ``"1"``, ...), as torch optimizers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..errors import TargetError
from ..noise.contract import stream_id, subsample_keys

__all__ = ["Trainable", "ParamSet"]


@dataclass(frozen=True)
class Trainable:
    """One trained tensor: its stable name, the live tensor (updated in place), its stream id.

    ``noise`` scales the random part of every direction on this tensor (``z`` becomes
    ``noise * z`` in each perturbation and update pass): 1 everywhere is MeZO; see
    :meth:`ParamSet.with_noise`.
    """

    name: str
    tensor: torch.Tensor
    stream: int
    noise: float = 1.0

    def coefs(self, coefs):
        """``coefs`` times this tensor's noise scale (the same list when it is 1: bit-identical passes)."""
        return coefs if self.noise == 1.0 else [float(c) * self.noise for c in coefs]


class ParamSet:
    """An ordered collection of :class:`Trainable` tensors, the ``params`` argument of ``qzo.ZO``.

    Build it from a ``ParamSet``, from an iterable of tensors, or from an iterable of
    ``(name, tensor)`` pairs (for example ``model.named_parameters()``).
    """

    def __init__(self, params):
        if isinstance(params, ParamSet):
            items = list(params.items)
        else:
            items = [self._as_trainable(i, p) for i, p in enumerate(params)]
        if not items:
            raise ValueError("ZO got an empty parameter list: pass at least one tensor to train")
        names = [t.name for t in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate trainable names {dupes}: every tensor needs its own name")
        for t in items:
            if not t.tensor.is_floating_point():
                raise TypeError(f"trainable {t.name!r} has dtype {t.tensor.dtype}; ZO trains floating-point tensors")
            if not t.tensor.is_contiguous():
                raise ValueError(f"trainable {t.name!r} is not contiguous; pass tensor.contiguous() storage")
        self.items: list[Trainable] = items

    @staticmethod
    def _as_trainable(index: int, p) -> Trainable:
        if isinstance(p, Trainable):
            return p
        if isinstance(p, torch.Tensor):
            name, tensor = str(index), p
        elif isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[1], torch.Tensor):
            name, tensor = str(p[0]), p[1]
        else:
            raise TypeError(f"params item {index} is {type(p).__name__}; expected a tensor or a (name, tensor) pair")
        return Trainable(name, tensor, stream_id(name))

    def __iter__(self) -> Iterator[Trainable]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def select(self, *patterns: str) -> "ParamSet":
        """The trainables whose names match any fnmatch pattern, as a new set sharing the live tensors.

        What ZO then perturbs and updates is only these; the others keep their values and draw
        no noise, and each selected tensor draws exactly the noise it would in the full set
        (stream ids come from names). ``lora.select("*lora_B*")`` trains LoRA's B factors
        alone: at init B = 0, so the gradient with respect to A is zero and A's noise is pure
        noise until B moves.
        """
        import fnmatch

        chosen = [t for t in self.items if any(fnmatch.fnmatchcase(t.name, p) for p in patterns)]
        if not chosen:
            raise ValueError(f"no trainable matches {list(patterns)}; names look like {self.items[0].name!r}")
        return ParamSet(chosen)

    def with_noise(self, scales: dict[str, float]) -> "ParamSet":
        """The set with per-tensor noise scales: LoRA-aware (or any group-aware) directions.

        ``scales`` maps fnmatch patterns to a scale (the first matching pattern wins; tensors
        no pattern matches keep 1). A tensor's direction is ``scale * z`` with the same ``z``
        it draws in the plain set, in the perturbations and the update alike: a scale s on a
        group is that group's eps times s with its slope's contribution times s (its step
        times s squared), so ``{"*lora_A*": 0.5}`` explores A at half of B's scale. A scale
        of 0 leaves the tensor out (it keeps its values and draws no noise, as :meth:`select`):
        ``{"*lora_A*": 0}`` is "B only". Nothing new is stored. A bad scale or a pattern that
        matches nothing is a :class:`qzo.TargetError` (a ``ValueError``).
        """
        import dataclasses
        import fnmatch

        for pattern, scale in scales.items():
            if not (isinstance(scale, (int, float)) and scale >= 0 and math.isfinite(scale)):
                raise TargetError(f"noise scale for {pattern!r} must be a finite number >= 0, got {scale!r}")
            if not any(fnmatch.fnmatchcase(t.name, pattern) for t in self.items):
                raise TargetError(f"noise scale pattern {pattern!r} matches no trainable; names look like "
                                 f"{self.items[0].name!r}")
        scaled = []
        for t in self.items:
            scale = next((float(v) for p, v in scales.items() if fnmatch.fnmatchcase(t.name, p)), 1.0)
            if scale:
                scaled.append(dataclasses.replace(t, noise=scale))
        if not scaled:
            raise TargetError(f"noise scales {scales} leave no trainable with noise: nothing would train")
        return ParamSet(scaled)

    def subsample(self, fraction: float, seed: int, step: int) -> "ParamSet":
        """The tensors step ``step`` perturbs when each is kept with probability ``fraction`` (at least one).

        Which ones is a pure function of ``(seed, step, stream)`` (:func:`qzo.noise.subsample_keys`), so a
        resumed run and its replay pick the same. The others keep their values and draw no noise this
        step: block-coordinate ZO, as LDSD's code touches about 10% of the tensors a step, and Sparse
        MeZO a subset of the values.
        """
        if not 0 < fraction <= 1:
            raise ValueError(f"subsample must be in (0, 1], got {fraction}")
        if fraction == 1:
            return self
        keys = subsample_keys(seed, step, [t.stream for t in self.items])
        kept = [t for t, u in zip(self.items, keys) if u < fraction]
        return ParamSet(kept or [self.items[min(range(len(keys)), key=keys.__getitem__)]])

    @property
    def numel(self) -> int:
        """Total number of trained values."""
        return sum(t.tensor.numel() for t in self.items)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> detached CPU copy of each trained tensor (what a checkpoint stores)."""
        return {t.name: t.tensor.detach().to("cpu", copy=True).contiguous() for t in self.items}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved values into the live tensors; names and shapes must match exactly."""
        missing = [t.name for t in self.items if t.name not in state]
        extra = sorted(set(state) - {t.name for t in self.items})
        if missing or extra:
            raise ValueError(f"checkpoint does not match the trainables: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for t in self.items:
                src = state[t.name]
                if src.shape != t.tensor.shape:
                    raise ValueError(f"{t.name}: checkpoint shape {tuple(src.shape)} != {tuple(t.tensor.shape)}")
                t.tensor.copy_(src)


def as_param_set(params: "ParamSet | Iterable") -> ParamSet:
    """``params`` as a :class:`ParamSet` (no copy when it already is one)."""
    return params if isinstance(params, ParamSet) else ParamSet(params)


def digest_tensors(named: Iterable[tuple[str, torch.Tensor]], hasher):
    """Feed each ``(name, tensor)``'s name and raw bytes to ``hasher`` (a ``hashlib`` object), in the order given.

    The one byte-level fingerprint of trainables: :func:`qzo.replay.state_digest` (SHA-256 in
    set order) and the ranks' agreement check (:func:`qzo.distributed.trainables_checksum`)
    both read it, so equal hashes mean bit-identical values and names. Returns ``hasher``.
    """
    for name, t in named:
        hasher.update(name.encode())
        hasher.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return hasher
