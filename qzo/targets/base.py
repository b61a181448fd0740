"""What the kinds of trainables share, and how they combine.

``qzo.scales`` (the quantization scales of 4/8-bit layers) and ``qzo.dense`` (chosen
modules as float32 masters) are built from modules picked by name or pattern
(:func:`select_modules`) and share the :class:`ModuleTargets` base (save, re-apply on a
fresh base model); :func:`combine` merges several trainable sets, LoRA included, into one
``ParamSet`` for ``qzo.ZO``.

Module paths are *clean* paths: peft's ``base_layer`` wrapper segment is dropped, so a
layer has the same name (and the same noise stream) whether LoRA was injected around it
before or after, and a checkpoint of scales taken on a LoRA-wrapped model applies to a
plain one.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import TargetError  # noqa: F401 - defined here first: importable from here as before
from ..models.bnb import is_quantized
from ..zo.params import ParamSet, Trainable

__all__ = ["TargetError", "ModuleTargets", "Targets", "combine", "is_quantized", "clean_path", "unwrap_peft",
           "select_modules", "read_checkpoint", "FILE_NAMES", "kind_of", "save_parts"]


def clean_path(path: str) -> str:
    """``path`` without peft's ``base_layer`` segments (the name a layer has without LoRA)."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def unwrap_peft(model):
    """The model inside a ``peft.PeftModel``, else ``model``: names then match those of the plain model.

    A ``PeftModel``'s module paths start with ``base_model.model.``; unwrapping keeps them
    (and the noise streams derived from them) the same with or without the wrapper.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _matches(path: str, pattern: str) -> bool:
    # a whole path or a dotted suffix: "q_proj" and "layers.0.self_attn.q_proj" both name
    # model.layers.0.self_attn.q_proj, as in peft's target_modules
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)


def _listing(paths: list[str], limit: int = 16) -> str:
    """``paths`` shortened for an error message: numbered layers folded into one ``*`` pattern."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(".".join("*" if part.isdigit() else part for part in path.split(".")), []).append(path)
    shown = [template if len(members) > 1 else members[0] for template, members in groups.items()]
    more = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def select_modules(
    model,
    patterns: Iterable[str] | str | None,
    eligible: Callable[[str, torch.nn.Module], bool],
    what: str,
    kind: str,
    hint: str = "",
) -> list[tuple[str, str, torch.nn.Module]]:
    """The eligible modules of ``model`` that ``patterns`` pick, in model order.

    Args:
        patterns: module paths or fnmatch patterns, each matched against the whole clean
            path or a dotted suffix of it; ``None`` picks every eligible module.
        eligible: ``(clean path, module) -> bool``.
        what: the caller's name for errors (``"qzo.scales"``).
        kind: what eligible modules are, for errors (``"quantized linear"``).
        hint: how to get eligible modules, for the error when there are none.

    Returns:
        ``(clean path, raw path, module)`` triples. Raises :class:`TargetError` when there is
        nothing eligible or a pattern picks nothing.
    """
    found = []
    for raw, module in model.named_modules():
        path = clean_path(raw)
        if raw and eligible(path, module):
            found.append((path, raw, module))
    if not found:
        raise TargetError(f"{what}: this model has no {kind} modules{'; ' + hint if hint else ''}")
    if patterns is None:
        return found
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise TargetError(f"{what}: modules is empty; name at least one {kind} module, e.g. {found[0][0]!r}")
    unmatched = [p for p in patterns if not any(_matches(path, p) for path, _, _ in found)]
    if unmatched:
        raise TargetError(f"{what}: {unmatched} match no {kind} module (patterns match a whole module path or a "
                          "dotted suffix of it; '*' spans dots, so 'model.layers.0.*' is all of block 0); "
                          f"{kind} modules here: {_listing([path for path, _, _ in found])}")
    return [entry for entry in found if any(_matches(entry[0], p) for p in patterns)]


def _parent(model, raw_path: str) -> tuple[torch.nn.Module, str]:
    """The module holding ``raw_path``'s last component, and that component."""
    if "." not in raw_path:
        return model, raw_path
    head, leaf = raw_path.rsplit(".", 1)
    return model.get_submodule(head), leaf


class ModuleTargets(ParamSet):
    """Trainables built from chosen modules of a model; knows how to rebuild itself on another.

    Attributes:
        model: the model the tensors live in.
        modules: the clean module paths that were selected (a checkpoint's recipe).
        clip: directional-derivative clip for ``qzo.ZO`` (``None``: no clipping), see
            :func:`qzo.scales.clip_grad`.
    """

    #: the builder's name, stored in saved files (``"scales"`` / ``"dense"``)
    kind = "targets"

    def __init__(self, items, model, modules: list[str], clip: float | None = None):
        super().__init__(items)
        self.model = model
        self.modules = list(modules)
        self.clip = clip

    @classmethod
    def build(cls, model, modules, clip=None) -> "ModuleTargets":  # pragma: no cover - overridden
        raise NotImplementedError

    def save(self, path) -> Path:
        """Write the trained values to a safetensors file (names as in :meth:`state_dict`)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "qzo_target": self.kind, "modules": json.dumps(self.modules)}
        save_file(self.state_dict(), str(path), metadata=meta)
        return path

    def apply_to(self, model) -> "ModuleTargets":
        """Build the same targets on ``model`` (e.g. a freshly loaded base) and copy these values in."""
        other = type(self).build(model, self.modules, clip=self.clip)
        other.load_state_dict(self.state_dict())
        return other


def read_checkpoint(checkpoint) -> dict[str, torch.Tensor]:
    """A state dict from a dict or a safetensors file path."""
    if isinstance(checkpoint, dict):
        return checkpoint
    from safetensors.torch import load_file

    path = Path(checkpoint)
    if not path.is_file():
        raise TargetError(f"checkpoint {str(path)!r} does not exist; pass a file written by .save() or a state dict")
    return load_file(str(path))


class Targets(ParamSet):
    """Several trainable sets as one (the result of :func:`combine`).

    Attributes:
        parts: the sets combined, in order (each keeps its own ``save`` / ``save_adapter``).
        clip: the smallest ``clip`` any part carries (``None`` if none does).
    """

    def __init__(self, items, parts, clip):
        super().__init__(items)
        self.parts = list(parts)
        self.clip = clip

    def save(self, folder) -> Path:
        """Write each part in its own format into ``folder`` (:func:`save_parts`)."""
        return save_parts(self.parts, folder)


#: the file or folder each kind is saved as inside a combined set's folder (and a run's), filled by
#: :func:`target_kind` where each kind is defined, in the order a run builds them (lora, scales, dense)
FILE_NAMES: dict[str, str] = {}


def target_kind(cls):
    """Class decorator: register a kind of trainables qzo saves and loads, under its ``kind`` and ``file_name``."""
    if cls.kind in FILE_NAMES:
        raise TypeError(f"target kind {cls.kind!r} is registered twice")
    FILE_NAMES[cls.kind] = cls.file_name
    return cls


def save_parts(parts: Iterable[ParamSet], folder) -> Path:
    """Write each part in its own format into ``folder``, under its kind's name (:data:`FILE_NAMES`): the layout
    of a combined set and of a run's final values, which :func:`qzo.targets.load` reads back. A folder holds
    each kind once (a run builds at most one of each)."""
    parts = list(parts)
    kinds = [kind_of(part) for part in parts]
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:
        raise TargetError(f"save: this combined set has more than one {twice[0]} part; a saved folder holds each "
                          "kind once, so save each part on its own")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for kind, part in zip(kinds, parts):
        part.save(folder / FILE_NAMES[kind])
    return folder


def kind_of(params: ParamSet) -> str:
    """``"lora"``, ``"scales"`` or ``"dense"``: what ``params`` is (a :class:`TargetError` for any other set)."""
    kind = getattr(params, "kind", None)
    if kind not in FILE_NAMES:
        raise TargetError(f"{type(params).__name__} is not a kind qzo can save (made by qzo.lora, qzo.scales or "
                          "qzo.dense); save a plain ParamSet's state_dict() with safetensors yourself")
    return kind


def _storage_span(t: torch.Tensor) -> tuple[int, int, int]:
    start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    return t.untyped_storage().data_ptr(), start, start + t.numel() * t.element_size()


def combine(*parts) -> Targets:
    """Train several sets at once: ``combine(qzo.lora(...), qzo.scales(...))``.

    Each part is a ``ParamSet`` (or anything ``ParamSet`` accepts). Names must be unique
    across parts and no tensor may be trained twice (for example a tied ``lm_head`` and
    ``embed_tokens`` as two dense slices): both are :class:`TargetError`. Stream ids come
    from the names, so each tensor receives the same noise as when trained alone.
    """
    if not parts:
        raise TargetError("combine() needs at least one set of trainables")
    sets = [p if isinstance(p, ParamSet) else ParamSet(p) for p in parts]
    seen: dict[str, str] = {}
    spans: list[tuple[tuple[int, int, int], str]] = []
    items: list[Trainable] = []
    for index, ps in enumerate(sets):
        label = f"part {index} ({type(ps).__name__})"
        for t in ps:
            if t.name in seen:
                raise TargetError(f"combine: {t.name!r} is in both {seen[t.name]} and {label}; every trained tensor "
                                  "needs its own name, so select it in only one of them")
            seen[t.name] = label
            base, start, end = _storage_span(t.tensor)
            for (b, s, e), owner in spans:
                if b == base and start < e and s < end:
                    raise TargetError(f"combine: {t.name!r} in {label} shares memory with {owner}; the same "
                                      "values would be perturbed twice (tied weights?), so train them once")
            spans.append(((base, start, end), f"{t.name!r} in {label}"))
            items.append(t)
    clips = [c for c in (getattr(ps, "clip", None) for ps in sets) if c is not None]
    return Targets(items, sets, min(clips) if clips else None)
