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
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .errors import QzoError
from .params import ParamSet, Trainable
from .noise import stream_id

__all__ = ["lora", "LoraParams", "linear_module_names"]


def linear_module_names(model) -> list[str]:
    """Short names (last path component) of every linear-like layer, for error messages."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
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


class LoraParams(ParamSet):
    """The LoRA tensors of a model (a :class:`~qzo.params.ParamSet`) plus what saving needs.

    Attributes:
        peft_model: the ``peft.PeftModel`` wrapping the same model object.
        model: the original model, now with LoRA layers injected in place.
    """

    def __init__(self, items, peft_model, model):
        super().__init__(items)
        self.peft_model = peft_model
        self.model = model

    def save_adapter(self, folder) -> None:
        """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

        Written from the trainables directly, not through ``peft_model.save_pretrained``:
        that calls ``model.state_dict()``, and on CPUs with AVX512-BF16 bitsandbytes 0.50
        repacks every 4-bit layer for its fused kernel on the first forward and un-packs it
        in ``state_dict()``; the round trip corrupts the layers (logits off by ~50 measured
        on the demo model), so the live model must never go through it. The key names are
        peft's saved-adapter keys, so ``PeftModel.from_pretrained`` loads the folder.
        """
        from pathlib import Path

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.peft_model.peft_config["default"].save_pretrained(str(folder))
        save_file(self.state_dict(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def lora(
    model,
    r: int = 8,
    alpha: float = 16,
    target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> LoraParams:
    """Inject LoRA adapters into ``model`` (in place) and return them as ZO trainables.

    Args:
        model: a causal LM from :func:`qzo.load` (quantized or not).
        r: adapter rank.
        alpha: scaling numerator (the adapter output is scaled by alpha / r).
        target_modules: short module names to adapt, e.g. ``["q_proj", "v_proj"]``.
        seed: torch seed for the A matrices' init (B starts at zero, as in LoRA).

    Returns:
        :class:`LoraParams`; call the original ``model`` as before, the adapters are in it.
    """
    import peft

    if r < 1:
        raise QzoError(f"lora.r must be >= 1, got {r}")
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
    return LoraParams(items, peft_model, model)
