"""``qzo export RUN --peft | --merged | --quantized | --gguf``: a run's trained values in the formats people use.

* ``peft``: the LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``),
  for ``peft.PeftModel.from_pretrained(base, folder)``. Only for runs that trained LoRA
  alone: a PEFT adapter cannot carry trained scales or dense slices. Its
  ``base_model_name_or_path`` is a place the base loads from (an absolute folder, the folder
  a built-in name or GGUF was converted into, or a hub id), so
  ``AutoPeftModelForCausalLM.from_pretrained(folder)`` finds it.
* ``merged``: a plain ``transformers`` folder (safetensors, ``bfloat16`` by default) that
  ``AutoModelForCausalLM.from_pretrained`` loads without qzo, peft or bitsandbytes. Every
  quantized weight is dequantized *with its trained scales*, dense slices are written as
  trained, and each LoRA delta ``B @ A * alpha / r`` is added to its weight. The merge is
  done in float32 per tensor and cast once at the end, so the only difference from the
  trained model is the final rounding (none with ``dtype="float32"``).
* ``quantized``: a bitsandbytes 4-bit folder (NF4/FP4 codes, the *trained* block scales)
  that ``from_pretrained`` loads straight into 4-bit. Dense slices are written unquantized
  and listed in ``llm_int8_skip_modules``. LoRA cannot be folded into 4-bit codes without
  re-quantizing the sum (which would throw away what ZO learned at 1e-3 scale), so a LoRA
  run's adapter goes next to it in ``adapter/``.
* ``gguf``: the merged model as one llama.cpp GGUF file (``f16`` or ``q8_0``) and an Ollama
  ``Modelfile`` beside it (:mod:`qzo.export.gguf`).
* ``gguf-lora``: a LoRA-only run's adapter as llama.cpp's LoRA GGUF, for the base's GGUF (the
  one the run started from, when it did), with a Modelfile that applies it (``ADAPTER``).

Every export is written into a hidden temp folder and renamed into place; an existing
destination is never overwritten.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelSourceError, QzoError, check_choice
from ..models.streaming import streamed_layers
from ..runs.checkpoint import find_checkpoint, load_checkpoint
from ..targets import unwrap_peft
from .merge import merged_state_dict, merged_tensors  # noqa: F401 - public here since export had them

__all__ = ["export", "FORMATS", "merged_state_dict", "merged_tensors"]

FORMATS = ("peft", "merged", "quantized", "gguf", "gguf-lora")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export(run_dir, fmt: str, out=None, base=None, dtype: str = "bfloat16", log=print,
           checkpoint: str = "last", gguf_type: str = "f16") -> Path:
    """Export a checkpoint of a run (``last`` by default) as ``fmt``: one of :data:`FORMATS`.

    Args:
        run_dir: a directory ``qzo train`` wrote.
        fmt: one of :data:`FORMATS`.
        out: destination folder (must not exist); default ``<run>/export-<fmt>`` (``export-gguf-<type>``).
        base: where the base model is now, when it moved since training (same model).
        dtype: ``merged`` only: ``bfloat16`` (default), ``float16`` or ``float32``.
        checkpoint: ``last``, ``best`` or ``step-N`` (:func:`qzo.runs.checkpoint.find_checkpoint`).
        gguf_type: ``gguf`` only: ``f16`` (default) or ``q8_0`` (:mod:`qzo.export.gguf`).

    Returns:
        The folder written.
    """
    from ..runs.reader import load_run_config

    check_choice("export format", fmt, FORMATS)
    check_choice("export dtype", dtype, _DTYPES)
    from .gguf import GGUF_TYPES

    check_choice("GGUF type", gguf_type, GGUF_TYPES)
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    default = f"export-gguf-{gguf_type}" if fmt == "gguf" else f"export-{fmt}"
    out = Path(out) if out is not None else run_dir / default
    if out.exists():
        raise QzoError(f"export destination {str(out)!r} already exists; remove it or pass --out elsewhere")
    targets = cfg["targets"]
    if fmt in ("peft", "gguf-lora") and (not targets["lora"] or targets["scales"] or targets["dense"]
                                         or targets["norms"]):
        trained = [k for k in ("lora", "scales", "dense", "norms") if targets[k]]
        raise QzoError(f"--{fmt} writes a LoRA adapter, but this run trained {', '.join(trained)}; an adapter "
                       "cannot hold scales or dense slices: use --merged (a plain model), --gguf or --quantized")
    if fmt == "quantized" and cfg["model"]["quant"] not in ("nf4", "fp4"):
        raise QzoError(f"--quantized writes a bitsandbytes 4-bit folder and supports nf4/fp4 bases; this run's base "
                       f"is {cfg['model']['quant']}: use --merged (a bf16 model) or --peft (the adapter)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        trainables = load_checkpoint(ckpt)[0]
        if fmt == "peft":
            _write_adapter(tmp, cfg, trainables, _base_reference(cfg, base, log))
        elif fmt == "merged":
            _write_merged(tmp, cfg, trainables, base, _DTYPES[dtype])
        elif fmt == "gguf":
            _write_gguf(tmp, cfg, trainables, base, gguf_type, log)
        elif fmt == "gguf-lora":
            _write_gguf_lora(tmp, cfg, trainables, base)
        else:
            _write_quantized(tmp, cfg, trainables, base, out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"qzo: exported {ckpt.name} of {run_dir} as {fmt} to {out}")
    return out


def _load_base(cfg: dict, base, lora: bool):
    """``(model, tok, params, parts)``: the run's base with its targets built (LoRA only if ``lora``).

    ``params`` is ``None`` when no target is left to build (a LoRA-only run loaded without LoRA).
    """
    from ..config.build import load_model_and_targets

    cfg = copy.deepcopy(cfg)
    if base is not None:
        cfg["model"]["source"] = str(base)
    cfg["model"]["cpu_fused_4bit"] = False  # exports read the plain layout; the fused one is repacked
    cfg["targets"]["lora"] = lora and cfg["targets"]["lora"]
    cfg["lora"]["init_from"] = None  # the checkpoint's values replace the starting ones
    try:
        if any(cfg["targets"].values()):
            model, tok, params, parts = load_model_and_targets(cfg)
        else:
            cfg["targets"]["lora"] = True  # loads the base and its tokenizer; no target is built
            (model, tok, _, _), params, parts = load_model_and_targets(cfg, build=False), None, {}
        streamed = streamed_layers(model)
        if streamed is not None:  # an export reads every weight: the streamed layers' codes come back for good
            streamed.materialize()
        return model, tok, params, parts
    except ModelSourceError as exc:
        raise QzoError(f"the run's base model cannot be loaded ({exc}); if it moved, pass its new place with "
                       "--base PATH (the same model the run was trained on)") from None


def _load_values(params, trainables: dict) -> None:
    params.load_state_dict({t.name: trainables[t.name] for t in params})


def _base_reference(cfg: dict, base, log) -> str:
    """``base_model_name_or_path`` for an adapter: what ``AutoPeftModelForCausalLM`` can load the base from.

    A folder becomes its absolute path, a built-in name or a ``.gguf`` the folder qzo converted
    it into (``qzo.load.hf_model_path``), a hub id stays as it is. A base that is not where the
    run says (and no ``--base``) is written as the run names it, with a note.
    """
    from ..models.load import hf_model_path

    source = str(base if base is not None else cfg["model"]["source"])
    try:
        found = hf_model_path(source)
    except ModelSourceError as exc:
        log(f"qzo: the adapter's base_model_name_or_path is {source!r}, which does not load here ({exc}); pass "
            "--base PATH to write where the base is now")
        return source
    return str(Path(found).resolve()) if Path(found).is_dir() else found


def _lora_config(cfg: dict, base_reference: str):
    import peft

    lc = cfg["lora"]
    # task_type: AutoPeftModelForCausalLM picks its model class from it
    return peft.LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], target_modules=lc["target_modules"], lora_dropout=0.0,
                           bias="none", base_model_name_or_path=base_reference, task_type="CAUSAL_LM")


def _write_adapter(folder: Path, cfg: dict, trainables: dict, base_reference: str) -> None:
    """A PEFT adapter folder from the checkpoint's LoRA tensors (their names are peft's saved keys)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _lora_config(cfg, base_reference).save_pretrained(str(folder))
    lora = {k: v.contiguous() for k, v in trainables.items() if ".lora_A." in k or ".lora_B." in k}
    save_file(lora, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _plain_config(model, dtype: torch.dtype):
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    return config


def _write_merged(folder: Path, cfg: dict, trainables: dict, base, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    model, tok, params, _ = _load_base(cfg, base, lora=True)
    _load_values(params, trainables)
    state = merged_state_dict(model, dtype)
    config = _plain_config(unwrap_peft(model), dtype)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QzoError(f"merged export: the plain {type(plain).__name__} expects {missing[:3]} and does not know "
                       f"{unexpected[:3]}; this architecture's layout is not supported yet")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(str(folder), safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(str(folder))
    _note(folder, cfg, "merged", {"dtype": str(dtype).removeprefix("torch.")})


def _write_quantized(folder: Path, cfg: dict, trainables: dict, base, out: Path) -> None:
    model, tok, params, parts = _load_base(cfg, base, lora=False)
    if cfg["targets"]["scales"] or cfg["targets"]["dense"] or cfg["targets"]["norms"]:
        _load_values(params, trainables)
    qc = model.config.quantization_config
    qc.llm_int8_enable_fp32_cpu_offload = False  # a training-time placement choice, not part of the model
    if "dense" in parts:  # written unquantized: from_pretrained must not turn them back into 4-bit layers
        skip = list(getattr(qc, "llm_int8_skip_modules", None) or [])
        if not skip:  # transformers' own default, which an explicit list replaces: the output head stays full
            head = model.get_output_embeddings()
            skip = [name for name, module in model.named_modules() if module is head]
        qc.llm_int8_skip_modules = skip + [p for p in parts["dense"].modules if p not in skip]
    model.save_pretrained(str(folder), safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(str(folder))
    if cfg["targets"]["lora"]:  # its base is this folder, where it is about to be renamed to
        _write_adapter(folder / "adapter", cfg, trainables, str(out.resolve()))
    _note(folder, cfg, "quantized", {"adapter": bool(cfg["targets"]["lora"])})


def _write_gguf(folder: Path, cfg: dict, trainables: dict, base, gguf_type: str, log) -> None:
    """The merged model as ``model-<type>.gguf`` (:mod:`qzo.export.gguf`) and an Ollama ``Modelfile`` beside it."""
    from ..models.load import resolve_source
    from .gguf import modelfile, write_gguf

    model, tok, params, _ = _load_base(cfg, base, lora=True)
    _load_values(params, trainables)
    kind, source = resolve_source(str(base if base is not None else cfg["model"]["source"]))
    name = f"model-{gguf_type}.gguf"
    write_gguf(folder / name, model, tok, gguf_type, source_gguf=source if kind == "gguf" else None,
               name=f"{Path(str(cfg['model']['source'])).name} (qzo fine-tune)", log=log)
    (folder / "Modelfile").write_text(modelfile(name, tok))
    _note(folder, cfg, "gguf", {"type": gguf_type, "file": name, "tokenizer": "copied from the base's GGUF"
                                if kind == "gguf" else "built from the Hugging Face tokenizer"})


def _write_gguf_lora(folder: Path, cfg: dict, trainables: dict, base) -> None:
    """``adapter.gguf`` (llama.cpp's LoRA GGUF) and a Modelfile that applies it to the base's GGUF."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models.load import hf_model_path, resolve_source
    from .gguf import modelfile, write_lora_gguf

    source = str(base if base is not None else cfg["model"]["source"])
    try:
        kind, value = resolve_source(source)
        folder_of_base = hf_model_path(source)
    except ModelSourceError as exc:
        raise QzoError(f"the run's base model cannot be found ({exc}); if it moved, pass its new place with "
                       "--base PATH") from None
    lora = {k: v for k, v in trainables.items() if ".lora_A." in k or ".lora_B." in k}
    write_lora_gguf(folder / "adapter.gguf", lora, AutoConfig.from_pretrained(folder_of_base), cfg["lora"]["alpha"],
                    name=f"{Path(source).name} (qzo LoRA)")
    # the base as llama.cpp runs it: the GGUF the run started from, else one the user converts it into
    base_gguf = str(Path(value).resolve()) if kind == "gguf" else "./base.gguf"
    text = modelfile(base_gguf, AutoTokenizer.from_pretrained(folder_of_base), adapter="adapter.gguf")
    if kind != "gguf":
        text = ("# base.gguf: this run's base as a GGUF (llama.cpp's convert_hf_to_gguf.py of " + source + ")\n") + text
    (folder / "Modelfile").write_text(text)
    _note(folder, cfg, "gguf-lora", {"file": "adapter.gguf", "base_gguf": base_gguf})


def _note(folder: Path, cfg: dict, fmt: str, extra: dict) -> None:
    """``qzo_export.json``: what was exported from which base, for whoever finds the folder later."""
    note = {"format": fmt, "base": cfg["model"]["source"], "quant": cfg["model"]["quant"],
            "targets": cfg["targets"], **extra}
    (folder / "qzo_export.json").write_text(json.dumps(note, indent=2))
