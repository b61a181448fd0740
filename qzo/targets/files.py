"""One save/load API for every kind of trainable: :func:`save` and :func:`load`.

Each kind is written in the format its users already read, so nothing here needs qzo to
be opened:

* ``lora``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``),
  which ``peft.PeftModel.from_pretrained`` loads on the same base;
* ``scales`` / ``dense``: one safetensors file whose metadata says the kind
  (``qzo_target``) and the modules it covers;
* several kinds trained together (:func:`qzo.combine`, or a run with more than one target
  kind): a folder holding each part under its kind's name (:data:`FILE_NAMES`), which is
  the layout of a run's final values (``RUN/``) and of its best ones (``RUN/best/``).

:func:`load` reads any of these back onto a freshly loaded base, telling the kind from the
files themselves, so the caller never says what it is loading. The old per-kind spellings
(``LoraParams.save_adapter``, ``qzo.load_scales``, ``qzo.load_dense``) remain and do the same.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TargetError
from .base import FILE_NAMES, Targets, combine, kind_of

__all__ = ["save", "load"]


def save(params, path) -> Path:
    """Write ``params`` (any kind, or a combined set) to ``path``; :func:`load` reads it back.

    A single kind goes to ``path`` itself (a folder for LoRA, a file for scales and dense);
    a combined set goes to the folder ``path``, one entry per part (:data:`FILE_NAMES`).
    """
    if not isinstance(params, Targets):
        kind_of(params)  # a plain ParamSet has no format of its own: say so before writing anything
    return Path(params.save(path))


def _file_kind(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a file that is not one
        raise TargetError(f"load: {str(path)!r} is not a safetensors file ({exc})") from None
    kind = meta.get("qzo_target")
    if kind not in ("scales", "dense"):
        raise TargetError(f"load: {str(path)!r} does not say what it holds (no qzo_target metadata); load it with "
                          "qzo.load_scales or qzo.load_dense, whichever wrote it")
    return kind


def load(model, path, clip: float | None = None):
    """The trainables saved at ``path`` by :func:`save` (or by a run), put on ``model``.

    Args:
        model: the base the values were trained on, freshly loaded with the same quantization.
        path: a PEFT adapter folder, a scales or dense safetensors file, or a folder holding
            several of them (a run's folder, its ``best/``, or what :func:`save` wrote for a
            combined set).
        clip: the directional-derivative clip the scales and dense parts carry to ``qzo.ZO``.

    Returns:
        The set the files hold: a ``LoraParams``, ``ScaleParams`` or ``DenseParams``, or a
        combined set of several (LoRA, then scales, then dense: the order a run builds them).
    """
    from .dense import load_dense
    from .scales import load_scales

    path = Path(path).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from .lora import from_adapter

        return from_adapter(model, path)
    if path.is_file():
        kind = _file_kind(path)
        return (load_scales if kind == "scales" else load_dense)(model, path, clip=clip)
    if not path.is_dir():
        raise TargetError(f"load: {str(path)!r} does not exist; give a folder or file written by qzo.targets.save, "
                          "a run folder, or a PEFT adapter folder")
    parts = [load(model, path / name, clip=clip) for name in FILE_NAMES.values() if (path / name).exists()]
    if not parts:
        raise TargetError(f"load: {str(path)!r} holds none of {', '.join(FILE_NAMES.values())}; was it written by "
                          "qzo.targets.save (or is it a run that has not finished)?")
    return parts[0] if len(parts) == 1 else combine(*parts)
