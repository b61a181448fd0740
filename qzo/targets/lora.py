"""``qzo.lora``: LoRA adapters on (quantized) linear layers, as ZO trainables.

peft's LoRA layers are used as they are: they already wrap bitsandbytes ``Linear4bit`` and
``Linear8bitLt``, and the saved adapter then loads with ``peft.PeftModel.from_pretrained``
on the same base. The adapter weights are float32 whatever the base dtype, so the
round trip of +eps z / -eps z perturbations does not drift (bf16 would lose ~3 digits).

Offloaded layers (accelerate ``device_map`` with CPU or disk offload) keep their weights
as ``meta`` placeholders between forwards, and peft creates an adapter on its base
layer's device, so it would build them on ``meta`` too. While injecting, such a layer
shows a one-element stand-in on its *execution* device instead: its adapters then live
there (small, always resident, perturbed in place like any other), and they get the
same initial values as without offload (peft draws them on CPU in the same order).

Names are peft's saved-adapter keys (``base_model.model.<module>.lora_A.weight``), so the
noise stream of each tensor is tied to what it is in the saved file, not to its position.

Starting values (``init_from``, config ``lora.init_from``): a PEFT adapter folder (what peft,
Unsloth or TRL save after first-order (Q)LoRA training), a qzo run directory (its last
checkpoint) or one of its ``checkpoints/step-N`` folders. Its rank, alpha, adapted modules
and every tensor's shape are checked against this model and these settings before a value
is copied, and a mismatch names what differs and the setting that fixes it; nothing is
adapted to fit silently. Only the LoRA tensors are taken (a run's trained scales or dense
slices are not), and they are cast to float32 like every adapter here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from pathlib import Path

import torch

from ..errors import QzoError
from ..noise.contract import stream_id
from ..zo.params import ParamSet, Trainable
from .base import target_kind

__all__ = ["lora", "LoraParams", "InitialValues", "INIT_HELP", "linear_module_names", "all_linear_names", "ALL_LINEAR",
           "load_initial_values", "from_adapter"]

#: ``target_modules`` as peft spells "every linear layer of the decoder, not the LM head"
ALL_LINEAR = "all-linear"


def linear_module_names(model) -> list[str]:
    """Short names (last path component) of every linear-like layer, for error messages."""
    names = set()
    for full, module in model.named_modules():
        if _is_linear(module):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def all_linear_names(model) -> list[str]:
    """What ``target_modules="all-linear"`` adapts: the short name of every linear layer but the LM head.

    peft's rule (``_maybe_include_all_linear_layers``): every ``Linear`` / bitsandbytes
    ``Linear4bit`` / ``Linear8bitLt`` by its last name component, less the output embedding
    (kept out even when its weight is tied to the input embedding). On a Llama-style decoder
    that is ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {full.rsplit(".", 1)[-1] for full, module in model.named_modules()
             if _is_linear(module) and module is not head}
    if not names:
        raise QzoError("lora.target_modules all-linear found no linear layer besides the LM head in this model")
    return sorted(names)


def _execution_device(module) -> torch.device:
    """Where accelerate runs an offloaded ``module`` (its hook's execution device; CPU if none)."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return torch.device("cpu")


@contextlib.contextmanager
def _offloaded_weights_as_stand_ins(model, targets: list[str]):
    """Give offloaded target layers a 1-element weight on their execution device while peft injects."""
    swapped = []
    for path, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None or weight.device.type != "meta" or path.rsplit(".", 1)[-1] not in targets:
            continue
        device = _execution_device(module)
        stand_in = torch.zeros(1, dtype=weight.dtype, device=device).expand(weight.shape)
        module._parameters["weight"] = torch.nn.Parameter(stand_in, requires_grad=False)
        swapped.append((module, weight))
    try:
        yield
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight


@target_kind
class LoraParams(ParamSet):
    """The LoRA tensors of a model (a :class:`~qzo.zo.params.ParamSet`) plus what saving needs.

    Attributes:
        peft_model: the ``peft.PeftModel`` wrapping the same model object.
        model: the original model, now with LoRA layers injected in place.
    """

    #: the kind's name in saved files (:mod:`qzo.targets.files`)
    kind = "lora"
    file_name = "adapter"  # a PEFT adapter folder

    def __init__(self, items, peft_model, model):
        super().__init__(items)
        self.peft_model = peft_model
        self.model = model

    def save_adapter(self, folder) -> None:
        """The former name of :meth:`save` (kept: the same folder)."""
        self.save(folder)

    def save(self, folder) -> Path:
        """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

        :func:`qzo.targets.load` (or ``lora(model, init_from=folder)`` with the same settings)
        reads it back.

        Written from the trainables directly, not through ``peft_model.save_pretrained``:
        that calls ``model.state_dict()``, and on CPUs with AVX512-BF16 bitsandbytes 0.50
        repacks every 4-bit layer for its fused kernel on the first forward and un-packs it
        in ``state_dict()``; the round trip corrupts the layers (logits off by ~50 measured
        on the demo model), so the live model must never go through it. The key names are
        peft's saved-adapter keys, so ``PeftModel.from_pretrained`` loads the folder.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = copy.copy(self.peft_model.peft_config["default"])
        config.task_type = config.task_type or "CAUSAL_LM"  # AutoPeftModelForCausalLM picks its model class from it
        config.save_pretrained(str(folder))
        save_file(self.state_dict(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        return folder


def lora(
    model,
    r: int = 8,
    alpha: float = 16,
    target_modules: list[str] | tuple[str, ...] | str = ("q_proj", "v_proj"),
    seed: int = 0,
    init_from=None,
) -> LoraParams:
    """Inject LoRA adapters into ``model`` (in place) and return them as ZO trainables.

    Args:
        model: a causal LM from :func:`qzo.load` (quantized or not).
        r: adapter rank.
        alpha: scaling numerator (the adapter output is scaled by alpha / r).
        target_modules: short module names to adapt, e.g. ``["q_proj", "v_proj"]``, or ``"all-linear"``
            (:data:`ALL_LINEAR`: every linear layer of the decoder, not the LM head; :func:`all_linear_names`).
        seed: torch seed for the A matrices' init (B starts at zero, as in LoRA).
        init_from: start from these values instead: a PEFT adapter folder, a qzo run directory
            or one of its ``checkpoints/step-N`` folders (:func:`load_initial_values`).

    Returns:
        :class:`LoraParams`; call the original ``model`` as before, the adapters are in it.
    """
    import peft

    if r < 1:
        raise QzoError(f"lora.r must be >= 1, got {r}")
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            raise QzoError(f"lora.target_modules is {target_modules!r}; give a list of module names such as "
                           f"['q_proj', 'v_proj'], or {ALL_LINEAR!r} (every linear of the decoder, not the LM head)")
        target_modules = all_linear_names(model)
    targets = list(target_modules)
    if not targets:
        raise QzoError("lora.target_modules is empty; name at least one linear layer, e.g. ['q_proj', 'v_proj']")
    existing = linear_module_names(model)
    unknown = [t for t in targets if t not in existing]
    if unknown:
        raise QzoError(f"lora.target_modules {unknown} match no module in this model; linear layers here are: "
                       f"{', '.join(existing)}")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _offloaded_weights_as_stand_ins(model, targets), warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing: a FutureWarning on every run
            # that the user can do nothing about
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = peft.get_peft_model(model, config)
    peft_model.eval()
    items = []
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        if p.dtype != torch.float32:
            with torch.no_grad():
                p.data = p.data.float()
        p.requires_grad_(False)  # ZO never builds a graph; no .grad buffers either
        saved = name.replace(".default.", ".")
        items.append(Trainable(saved, p.data, stream_id(saved)))
    params = LoraParams(items, peft_model, model)
    if init_from is not None:
        what = load_initial_values(params, init_from, r=r, alpha=alpha, target_modules=targets)
        print(f"qzo: LoRA starts from {what}", flush=True)
    return params



INIT_HELP = ("give a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), a qzo run directory "
              "or one of its checkpoints/step-N folders")


class InitialValues:
    """LoRA values read for ``init_from`` and what their source says about them (``None``: not recorded)."""

    def __init__(self, what: str, tensors: dict, r, alpha, base, alpha_note: str = "", targets=None):
        self.what, self.tensors, self.r, self.alpha = what, tensors, r, alpha
        self.base, self.alpha_note, self.targets = base, alpha_note, targets


def load_initial_values(params: LoraParams, source, r: int, alpha: float, target_modules) -> str:
    """Copy starting values from ``source`` into ``params`` after checking that they fit; returns what was read.

    Args:
        params: the adapters :func:`lora` just built (their names are peft's saved keys).
        source: a PEFT adapter folder, a qzo run directory (its last checkpoint that verifies)
            or a ``checkpoints/step-N`` folder of one.
        r, alpha, target_modules: this run's LoRA settings, which the source must have too.

    Raises:
        QzoError: the source is missing or unreadable, or its rank, alpha, adapted modules,
            tensor names or shapes differ from this model's adapters (the message names the
            difference and the setting that fixes it).
    """
    if isinstance(source, InitialValues):
        return _install(source, params, r, alpha, list(target_modules))
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise QzoError(f"lora.init_from {str(source)!r} does not exist; {INIT_HELP}")
    if not (path / "adapter_config.json").is_file():
        raise QzoError(f"lora.init_from {str(source)!r} is not a PEFT adapter folder (no adapter_config.json); for a "
                       "qzo run or checkpoint pass qzo.runs.checkpoint.lora_values(path), or export the run with "
                       "`qzo export RUN --peft`")
    return _install(_read_adapter(path), params, r, alpha, list(target_modules))


def from_adapter(model, folder) -> LoraParams:
    """LoRA on ``model`` with a PEFT adapter folder's rank, alpha, adapted modules and values.

    What :func:`qzo.targets.load` gives for an adapter folder: the settings come from the
    folder itself (an rsLoRA adapter's ``lora_alpha`` becomes the alpha whose alpha / r is
    its scale), read once with the values, so they cannot disagree with the check.
    """
    folder = Path(str(folder)).expanduser()
    found = _read_adapter(folder, who="load")
    if isinstance(found.targets, str):
        raise QzoError(f"load: {folder} adapts the modules matching the pattern {found.targets!r}; qzo reads adapters "
                       "whose target_modules is a list of names (as qzo.lora writes them)")
    rank = found.r or next((v.shape[0] for k, v in found.tensors.items() if ".lora_A." in k), 8)
    alpha = found.alpha if found.alpha is not None else 8  # peft's default lora_alpha
    targets = sorted(found.targets or {_adapted_module(k) for k in found.tensors})
    params = lora(model, r=int(rank), alpha=float(alpha), target_modules=targets)
    print(f"qzo: LoRA starts from {_install(found, params, int(rank), float(alpha), targets)}", flush=True)
    return params


def _install(found: InitialValues, params: LoraParams, r: int, alpha: float, targets: list[str]) -> str:
    """Copy ``found``'s tensors into ``params`` after :func:`_check_fits`; returns where they came from."""
    _check_fits(found, params, r, alpha, targets)
    with torch.no_grad():
        for t in params:
            t.tensor.copy_(found.tensors[t.name].to(device=t.tensor.device, dtype=t.tensor.dtype))
    return found.what


def _read_adapter(path: Path, who: str = "lora.init_from") -> InitialValues:
    """A PEFT LoRA adapter folder; refuses the variants whose extra tensors or scales qzo's LoRA does not have.
    ``who`` opens the error messages (the config key or the function the folder was given to)."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except ValueError as exc:
        raise QzoError(f"{who}: {path / 'adapter_config.json'} is not valid JSON ({exc})") from None
    kind = str(config.get("peft_type") or "LORA").upper()
    if kind != "LORA":
        raise QzoError(f"{who} {str(path)!r} is a {kind} adapter; qzo starts LoRA adapters only "
                       "(peft_type LORA)")
    unsupported = []
    if config.get("use_dora"):
        unsupported.append("use_dora (DoRA's magnitude vectors)")
    if (config.get("bias") or "none") != "none" or config.get("lora_bias"):
        unsupported.append(f"bias {config.get('bias')!r} (trained biases)")
    if config.get("modules_to_save"):
        unsupported.append(f"modules_to_save {config['modules_to_save']} (whole modules trained beside the adapters)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        unsupported.append("rank_pattern / alpha_pattern (per-layer ranks or alphas)")
    if unsupported:
        raise QzoError(f"{who} {str(path)!r} uses {'; '.join(unsupported)}, which qzo's LoRA (one r and "
                       "alpha, no other trained tensors) cannot start from; train the adapter without them, or "
                       "merge it into the base (peft's merge_and_unload, then save_pretrained) and use that as "
                       "model.source")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise QzoError(f"{who} {str(path)!r} holds pickled weights (adapter_model.bin), which qzo does "
                           "not read (unpickling can run code); load it with peft and save it again with "
                           "save_pretrained(folder, safe_serialization=True)")
        raise QzoError(f"{who} {str(path)!r} has adapter_config.json but no adapter_model.safetensors")
    from safetensors.torch import load_file

    r0, alpha0, note = config.get("r"), config.get("lora_alpha"), ""
    if config.get("use_rslora") and r0 and alpha0 is not None:
        # rsLoRA scales the adapter by alpha / sqrt(r), qzo by alpha / r: the same scale is alpha * sqrt(r) here
        alpha0, note = alpha0 * math.sqrt(r0), f" (rsLoRA lora_alpha {config['lora_alpha']:g} / sqrt(r), as alpha / r)"
    return InitialValues(f"the PEFT adapter {path}", load_file(str(weights)), r0, alpha0,
                  config.get("base_model_name_or_path"), note, config.get("target_modules"))


def _adapted_module(key: str) -> str:
    """``q_proj`` for ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return key.split(".lora_", 1)[0].rsplit(".", 1)[-1]


def _check_fits(found: InitialValues, params: LoraParams, r: int, alpha: float, targets: list[str]) -> None:
    ours, theirs = {t.name: t.tensor for t in params}, found.tensors
    base = (f"it was made for {found.base!r}: set model.source to that model" if found.base
            else "set model.source to the model it was trained on")
    rank = found.r if found.r is not None else next((v.shape[0] for k, v in theirs.items() if ".lora_A." in k), None)
    if rank is not None and int(rank) != r:
        raise QzoError(f"lora.init_from: {found.what} has rank {rank}, this run has lora.r {r}; set lora.r: {rank} "
                       f"(--set lora.r={rank}) to start from it")
    if found.alpha is not None and not math.isclose(float(found.alpha), float(alpha), rel_tol=1e-6):
        raise QzoError(f"lora.init_from: {found.what} has alpha {float(found.alpha):g}{found.alpha_note}, this run "
                       f"has lora.alpha {float(alpha):g}; the adapter's output is scaled by alpha / r, so set "
                       f"lora.alpha: {float(found.alpha):g} (--set lora.alpha={float(found.alpha):g}) to start from "
                       "what it computes")
    adapted = sorted({_adapted_module(k) for k in theirs})
    if set(adapted) != set(targets):
        raise QzoError(f"lora.init_from: {found.what} adapts {', '.join(adapted)}; this run's lora.target_modules is "
                       f"{', '.join(targets)}: set lora.target_modules: [{', '.join(adapted)}]")
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        raise QzoError(f"lora.init_from: {found.what} does not match this model's adapters: {len(missing)} of them are "
                       f"not in it (e.g. {missing[:2]}) and {len(extra)} of its tensors have no place here "
                       f"(e.g. {extra[:2]}); {base}")
    for name, tensor in ours.items():
        if tuple(theirs[name].shape) != tuple(tensor.shape):
            raise QzoError(f"lora.init_from: {name} is {tuple(theirs[name].shape)} in {found.what} but "
                           f"{tuple(tensor.shape)} in this model, so it was trained on another base; {base}")
        if not torch.isfinite(theirs[name]).all():
            raise QzoError(f"lora.init_from: {name} in {found.what} holds NaN or inf values; start from a good one")
