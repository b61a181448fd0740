"""What a run will hold, checked before it is spent: settings that cannot fit are refused, naming the key and the
number, before anything is allocated (not an allocator's traceback minutes in).

Two looks, from :func:`qzo.train.loop.setup`:

* ``check_budget(cfg)``, before the model loads: the trained values and their optimizer state
  (``lora.r``: ``--set lora.r=1000000000`` would ask for 1.6 TiB of LoRA factors), the
  activations of a packed batch (packed rows are ``train.max_len`` wide, whatever the data),
  and ``data.system_prompt`` (it comes before every example, so one longer than ``max_len``
  tokens leaves no example a trained token, after rendering and tokenizing megabytes per example);
* ``check_budget(cfg, train_ds, eval_ds)``, once the data is tokenized: the activations of the
  widest training batch (``train.batch_size`` rows as wide as the widest row) and of a held-out
  batch (``train.eval_batch_size``).

The estimate is :func:`qzo.plan`'s (``qzo plan``), without the weights (they can be offloaded
to the CPU or disk): trainables, optimizer state, one forward's activations, the dequantized
workspace. It is a lower bound (one decoder layer's activations at a time) and is compared to
all the memory the machine has (RAM, within a cgroup's limit, plus every GPU's), so what is
refused here could never have run; what passes may still not fit a GPU, which ``qzo plan`` says.
A model whose shapes the planner does not know (not Llama-like) is not checked.
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["check_budget", "machine_memory", "CHARS_PER_TOKEN"]

GiB = 2**30
#: characters one token can stand for, at most: SmolLM2's longest token is 81 characters, no tokenizer we know of
#: has one over 128, so a text of N characters is at least N / 1024 tokens
CHARS_PER_TOKEN = 1024


def check_budget(cfg: dict, train_ds=None, eval_ds=None) -> None:
    """Raise :class:`ConfigError` if the run ``cfg`` describes cannot fit in this machine's memory (see the module
    docstring); ``train_ds`` / ``eval_ds`` (:class:`qzo.data.dataset.ChatDataset`): the tokenized data, for the
    widths of its batches (without them: a packed row's width, else the narrowest possible)."""
    t, d = cfg["train"], cfg["data"]
    prompt = d.get("system_prompt")
    if isinstance(prompt, str) and len(prompt) > CHARS_PER_TOKEN * t["max_len"]:
        raise ConfigError(f"data.system_prompt is {len(prompt):,} characters, at least "
                          f"{len(prompt) // CHARS_PER_TOKEN:,} tokens: over train.max_len={t['max_len']} before any "
                          "example begins, so every example would be cut inside it; shorten it (a system prompt is a "
                          "few sentences) or raise train.max_len")
    model = _model_config(cfg)
    if model is None:
        return
    memory, where = machine_memory()
    packed = bool(d.get("packing"))
    if train_ds is None:
        looks = [_Look("train", cfg, model, t["batch_size"], t["max_len"] if packed else 2, packed, None)]
    else:
        looks = [_Look("train", cfg, model, t["batch_size"], _width(train_ds), packed, _width(train_ds)),
                 _Look("eval", cfg, model, min(t["eval_batch_size"], len(eval_ds)), _width(eval_ds), False,
                       _width(eval_ds))]
    for look in looks:
        need = look.need()
        if need is not None and need > memory:
            raise ConfigError(look.refusal(need, memory, where))


def machine_memory() -> tuple[int, str]:
    """``(bytes, words)``: the RAM this process may use (the machine's, or its cgroup's limit if lower) plus every
    visible GPU's memory."""
    import psutil
    import torch

    ram = psutil.virtual_memory().total
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit.isdigit():
            ram = min(ram, int(limit))
    except OSError:
        pass
    words = f"{ram / GiB:.1f} GiB of RAM"
    gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    if gpus:
        words += f" and {sum(gpus) / GiB:.1f} GiB on {len(gpus)} GPU(s)"
    return ram + sum(gpus), words


def _width(ds) -> int:
    """The widest batch of ``ds`` in tokens: a packed row's width, else its longest row."""
    return ds.row_len or max((len(x) for x in ds.input_ids), default=2)


def _model_config(cfg: dict):
    """The model's transformers config, for its shapes, or ``None`` when it cannot be read cheaply (the load will
    say what is wrong) or the planner does not know its layout. A GGUF's is read from its converted folder, which the
    load reads next (reading a GGUF's header takes seconds)."""
    from ..models.load import hf_model_path
    from .plan import model_config

    try:
        config = model_config(hf_model_path(cfg["model"]["source"]))
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
            if not isinstance(getattr(config, name, None), int):
                return None
        return config
    except Exception:  # noqa: BLE001 - a missing or odd model is the load's to report, with its own message
        return None


class _Look:
    """One batch the run will hold (``train``: a step's; ``eval``: a held-out evaluation's) and the keys sizing it."""

    def __init__(self, kind: str, cfg: dict, model, rows: int, width: int, packed: bool, data_width: int | None):
        from .plan import config_settings

        self.kind, self.cfg, self.model, self.packed, self.data_width = kind, cfg, model, packed, data_width
        settings = config_settings(cfg)
        settings.pop("source")
        shapes = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        targets = settings["lora_targets"]
        if not isinstance(targets, str):  # the planner's names only (a lower bound: it counts no others)
            settings["lora_targets"] = tuple(n for n in targets if n in shapes)
            if not settings["lora_targets"]:
                settings["lora_r"] = 0
        if kind == "eval":  # no perturbation, no pool: one forward of held-out rows
            settings["pool"] = 1
        if cfg["model"]["dtype"] is None:  # float32 on CPU, bfloat16 on CUDA (qzo.load's default)
            import torch

            settings["dtype"] = "bfloat16" if torch.cuda.is_available() else "float32"
        settings.update(batch=rows, seq=width, embedding_on_cpu=False)
        self.settings = settings
        t = cfg["train"]
        pool_key = self._pool_key()
        self.keys = {"lora.r": settings["lora_r"]} if kind == "train" and settings["lora_r"] else {}
        if kind == "train":
            self.keys["train.batch_size"] = t["batch_size"]
            if pool_key:
                self.keys[pool_key] = settings["pool"]
        else:
            self.keys["train.eval_batch_size"] = rows
        if packed or data_width is not None and data_width >= t["max_len"]:  # rows cut (or padded) to max_len
            self.keys["train.max_len"] = t["max_len"]

    def _pool_key(self) -> str | None:
        from ..zo.strategies import STRATEGIES

        if self.kind != "train" or self.settings["pool"] <= 1:
            return None
        return f"optim.strategy.{STRATEGIES[self.settings['strategy']].pool_arg}"

    def _with(self, key: str, value: int) -> dict:
        s = dict(self.settings)
        if key == "lora.r":
            s["lora_r"] = value
        elif key in ("train.batch_size", "train.eval_batch_size"):
            s["batch"] = value
        elif key == "train.max_len":
            s["seq"] = value if self.packed else min(value, self.data_width or value)
        else:
            s["pool"] = value
        return s

    def need(self, settings: dict | None = None) -> int | None:
        """Bytes the batch holds besides the weights, or ``None`` when the planner cannot size this model."""
        from ..errors import QzoError
        from .plan import plan

        try:
            p = plan(self.model, **(settings or self.settings))
        except (QzoError, ValueError, KeyError, AttributeError, TypeError):
            return None
        return p.trainables + p.state + p.activations + p.workspace

    def _largest(self, key: str, memory: int) -> int:
        """The largest value of ``key`` (the others as they are) whose batch fits ``memory``; 0: none does."""
        low, high = 0, self.keys[key]  # need(high) > memory; need is monotone in every key
        while high - low > 1:
            mid = (low + high) // 2
            need = self.need(self._with(key, mid))
            low, high = (mid, high) if need is not None and need <= memory else (low, mid)
        return low

    def refusal(self, need: int, memory: int, where: str) -> str:
        """The one-line error: the key whose value is furthest past what fits, the estimate, the memory, the fix."""
        fits = {key: self._largest(key, memory) for key in self.keys}
        found = [(self.keys[k] / f, k) for k, f in fits.items() if f >= 1]
        s = self.settings
        if self.kind == "eval":
            what = f"a held-out batch of {s['batch']:,} rows x {s['seq']:,} tokens"
        else:
            lora = f", LoRA r {s['lora_r']:,}" if s["lora_r"] else ""
            tokens = f"x {s['seq']:,} tokens" if self.packed or self.data_width else "of any length"
            what = f"a training step ({s['batch'] * s['pool']:,} rows {tokens}{lora})"
        estimate = f"needs about {_size(need)} besides the weights (qzo plan's estimate), over the {where} here"
        if not found:
            return (f"{what} {estimate}, and no single setting brings it under: lower "
                    f"{', '.join(self.keys)} together")
        _, key = max(found)
        return (f"{key}={self.keys[key]:,} cannot fit: {what} {estimate}; lower {key} (at most {fits[key]:,} fits "
                "with the other settings as they are)")


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} bytes"
