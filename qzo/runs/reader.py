"""A run directory read back: its config, and its model with a checkpoint's values.

What ``qzo eval``, ``qzo chat``, ``qzo export``, ``qzo plot`` and a resume need from a run
folder that :mod:`qzo.train.loop` wrote (its layout is in that module's docstring), without
importing the training loop. Nothing here writes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ..config.build import load_model_and_targets, total_steps
from ..config.reading import clip, load_yaml, read_config
from ..config.schema import DEFAULTS, ConfigError, merge_config, validate
from ..errors import QzoError
from .checkpoint import find_checkpoint, load_checkpoint

__all__ = ["RESUMABLE_KEYS", "is_run_dir", "load_run_config", "load_run_model"]

# Keys a resumed run may change: they do not alter the trajectory of earlier steps.
RESUMABLE_KEYS = ("train.steps", "train.forwards", "train.eval_every", "train.eval_every_forwards",
                  "train.save_every", "train.keep_checkpoints", "train.eval_batch_size", "train.report_to")


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "steps.jsonl").exists()


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """The resolved config of a run, with the overrides a resume may apply."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise QzoError(f"{str(run_dir)!r} is not a qzo run directory (no config.yaml / steps.jsonl); "
                       "pass the folder a previous `qzo train` wrote")
    # a run written before a key existed resumes with that key's default (the behaviour it ran with)
    base = copy.deepcopy(DEFAULTS)
    path = run_dir / "config.yaml"
    if path.is_symlink():
        raise QzoError(f"{path} is a symbolic link; a run's config.yaml is a file qzo wrote: restore it from a backup "
                       "or start a new run")
    try:  # bounded like any config (qzo.config.reading): a planted file cannot run away with time or memory
        data = load_yaml(read_config(path), str(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({clip(exc, 200)}); restore the file qzo wrote") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run's config must be a mapping of sections, not {type(data).__name__}; restore "
                          "the file qzo wrote")
    merge_config(base, data)
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"--set {key} cannot change on --resume (it would change earlier steps); "
                              f"resumable keys: {', '.join(RESUMABLE_KEYS)}")
    from ..config.schema import apply_overrides

    steps_before = total_steps(base)
    cfg = apply_overrides(base, overrides or [])
    if cfg["optim"]["schedule"] != "constant" and total_steps(cfg) != steps_before:
        raise ConfigError(f"train.steps / train.forwards cannot change on --resume with the "
                          f"{cfg['optim']['schedule']} schedule: its lr at every step depends on the total; "
                          "start a new run instead")
    return validate(cfg)


def load_run_model(run_dir: Path, checkpoint: "Path | str | None" = None, source=None):
    """Base model + trainables with a run's checkpoint: ``(model, tok, params, cfg)``.

    ``checkpoint`` is a checkpoint folder or what ``--checkpoint`` takes (``last``, the
    default; ``best``; ``step-N``; see :func:`qzo.runs.checkpoint.find_checkpoint`). ``source``
    loads the base from another place than the run's ``model.source`` (a moved folder); it
    must be the same model, which the checkpoint's names and shapes check.
    """
    cfg = load_run_config(run_dir)
    if source is not None:
        cfg["model"]["source"] = str(source)
    ckpt = checkpoint if isinstance(checkpoint, Path) else find_checkpoint(run_dir, checkpoint or "last")
    cfg["lora"]["init_from"] = None  # the checkpoint holds the values: the run's starting point need not exist now
    model, tok, params, _ = load_model_and_targets(cfg)
    params.load_state_dict(load_checkpoint(ckpt)[0])
    from ..data.templates import set_chat_template

    set_chat_template(tok, cfg["data"].get("chat_template"))  # chat and eval format chats as training did
    return model, tok, params, cfg
