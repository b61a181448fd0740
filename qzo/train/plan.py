"""``qzo plan``: the expected peak memory of a ZO step, from a model's config alone.

No weights are read: the estimate is arithmetic on the config (layer shapes, vocabulary)
and the run's settings. A ZO step's peak is an inference forward's peak plus what is
trained (the memory contract), so the parts are:

* weights      decoder linears at the quantized size (NF4/FP4: 0.5 byte a weight plus one
               float32 absmax per 64 weights, or 1 byte per 64 with double quantization;
               int8: 1 byte plus one float32 scale per row), embeddings, LM head and norms
               in the compute dtype (bitsandbytes leaves them unquantized);
* trainables   LoRA factors (float32) and their state: the rule's moments (Momentum 1x,
               Adam 2x) and LDSD's mean (1x);
* activations  one decoder layer's live tensors at a time (no grad: earlier layers' are
               freed; a pool-batched step multiplies them by the pool size) and one chunk
               of logits with its float32 copies: the loss runs the head only on labelled
               positions, 256 MiB of logits at a time (``qzo.data.loss``), instead of keeping
               ``[batch, seq, vocab]`` (5.2 GiB for a 128k vocabulary at 8 x 512); and the
               boolean ``[batch, 1, seq, seq]`` attention mask of a padded batch (the
               attention itself is SDPA's, linear in seq);
* workspace    the largest quantized weight dequantized for its matmul.

When the total exceeds the GPU budget, the plan says how many decoder layers to keep on
the GPU and what ``max_memory`` gives that split. Offloaded layers are what ``qzo.load``
makes of them: kept *unquantized* in the compute dtype on the CPU (bitsandbytes cannot
offload its 4-bit layers) and copied to the GPU for each forward, so the GPU needs room
for one such layer in flight and every forward moves all of them over PCIe. ``max_memory``
caps only the weights accelerate places, so the GPU figure it is given is the budget less
everything else the step needs (accelerate then reserves the in-flight layer from it).
LoRA adapters of offloaded layers stay on the GPU (``qzo.lora``), so they never move.
The estimate still has to be checked against measured GPU peaks (``benchmarks/memory.py``,
owed to a GPU session); on CPU its weight bytes are tested against a real quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.schema import component
from ..data.loss import chunk_tokens
from ..errors import QzoError, check_choice
from ..models.bnb import QUANTS
from ..targets.lora import ALL_LINEAR
from ..zo.rules import RULES
from ..zo.rules import state_copies as rule_state_copies  # not to shadow the local of plan()
from ..zo.strategies import STRATEGIES

__all__ = ["PRESETS", "HUB_PRESETS", "Plan", "plan", "model_config", "parse_size", "plan_source", "config_settings",
           "plan_config"]

GiB = 2**30
PCIE_BYTES_PER_S = 25e9  # PCIe 4.0 x16, what a consumer board gives in practice

#: configs of common models (no download needed): hidden, intermediate, layers, heads, kv heads, vocab, tied
PRESETS = {
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000, False),
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000, False),
    "llama-2-70b": (8192, 28672, 80, 64, 8, 32000, False),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "llama-3.1-70b": (8192, 28672, 80, 64, 8, 128256, False),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32768, False),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_size(text) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"24GB"`` or a number of bytes -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    units = {"gib": GiB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "kib": 2**10, "kb": 10**3, "b": 1}
    t = str(text).strip().lower()
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise QzoError(f"cannot read the size {text!r}; write it like 8GiB, 512MiB or 24GB") from None


def model_config(source):
    """A transformers config for ``source``: a preset name, a config, a model folder, a GGUF (header only) or
    a hub id whose ``config.json`` is in the local Hugging Face cache."""
    from transformers import AutoConfig, LlamaConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if str(source) in PRESETS:
        h, i, n, heads, kv, vocab, tied = PRESETS[str(source)]
        return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                           num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
    from ..models.load import resolve_source

    kind, where = resolve_source(source)
    if kind == "gguf":
        return AutoConfig.from_pretrained(str(where.parent), gguf_file=where.name)
    if kind == "folder":
        return AutoConfig.from_pretrained(str(where))
    if kind == "hub":
        # its config.json from the local Hugging Face cache, where qzo.load reads hub ids; never downloaded
        try:
            return AutoConfig.from_pretrained(where, local_files_only=True)
        except OSError:
            raise QzoError(f"qzo plan reads a hub id's config from the local Hugging Face cache, and {where!r} is "
                           f"not there: `hf download {where} config.json` fetches it (a few KB), or pass a preset "
                           f"({', '.join(PRESETS)}), a model folder or a .gguf file") from None
    raise QzoError(f"qzo plan needs a local config: {source!r} is not a preset ({', '.join(PRESETS)}), "
                   "a model folder or a .gguf file")


def _linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear in one Llama-style decoder layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    return {"q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * head_dim, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _quantized_bytes(n_in: int, n_out: int, quant: str, double_quant: bool, dtype_bytes: int) -> int:
    n = n_in * n_out
    if quant in ("nf4", "fp4"):
        blocks = -(-n // 64)
        scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
        return n // 2 + scales
    if quant == "int8":
        return n + 4 * n_out
    return n * dtype_bytes


@dataclass
class Plan:
    """The estimate, in bytes, and what to do when it does not fit."""

    weights: int
    trainables: int
    state: int
    activations: int
    workspace: int
    budget: int | None
    per_layer: int  # one decoder layer on the GPU (quantized)
    layers: int
    # one offloaded layer's bytes on the wire per forward: its packed 4-bit codes when they stream
    # packed (qzo.models.streaming; its scales stay on the GPU), else the whole layer unquantized
    streamed_layer: int = 0
    stream_packed: bool = False
    # what accelerate's "auto" map counts for one layer when it sizes 4-bit weights (codes + norms,
    # not the block scales): the unit max_memory's GPU figure is spent in
    accelerate_layer: int = 0
    forwards_per_step: int = 2
    pcie_bytes_per_s: float = PCIE_BYTES_PER_S
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.trainables + self.state + self.activations + self.workspace

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def _saved(self) -> int:
        """GPU bytes one offloaded layer frees: its codes (packed streaming) or all of it."""
        return self.streamed_layer if self.stream_packed else self.per_layer

    def _in_flight(self) -> int:
        """GPU bytes of offloaded layers present at a time: two packed (one computing, one read ahead), or one."""
        return 2 * self.streamed_layer if self.stream_packed else self.streamed_layer

    def gpu_layers(self) -> int:
        """How many decoder layers stay whole on the GPU (all of them when the model fits)."""
        if self.budget is None or self.fits:
            return self.layers
        over = self.total + self._in_flight() - self.budget
        return max(0, self.layers - -(-over // max(self._saved(), 1)))

    def gpu_total(self) -> int:
        """Peak GPU memory with :meth:`gpu_layers` whole on the GPU (the rest streamed in)."""
        keep = self.gpu_layers()
        if keep == self.layers:
            return self.total
        return self.total - (self.layers - keep) * self._saved() + self._in_flight()

    def offloaded_bytes(self) -> int:
        """Bytes copied to the GPU each forward (and held in host RAM): every offloaded layer's streamed bytes."""
        return (self.layers - self.gpu_layers()) * self.streamed_layer

    def streaming_s_per_step(self) -> float:
        """Seconds a step spends copying offloaded layers at :attr:`pcie_bytes_per_s` (overlapped with compute)."""
        return self.forwards_per_step * self.offloaded_bytes() / self.pcie_bytes_per_s

    def weights_allowance(self) -> int:
        """The GPU ``max_memory`` for offloading: what makes accelerate's map keep :meth:`gpu_layers` layers.

        Unquantized offload: the budget less what is not weights. Packed streaming: the
        resident weights in accelerate's own units (it sizes a 4-bit layer by its codes, and
        knows nothing of the streamed layers' scales and the two in flight, which the
        planner has already taken from the budget).
        """
        if not self.stream_packed:
            return self.budget - (self.trainables + self.state + self.activations + self.workspace)
        rest = self.weights - self.layers * self.per_layer  # embeddings, head, final norm
        return rest + self.gpu_layers() * self.accelerate_layer

    def table(self) -> str:
        rows = [("weights", self.weights), ("trainables", self.trainables), ("optimizer state", self.state),
                ("activations", self.activations), ("workspace", self.workspace), ("total", self.total)]
        lines = [f"{name:18}{value / GiB:9.2f} GiB" for name, value in rows]
        if self.budget is not None:
            verdict = "fits" if self.fits else "does not fit"
            lines.append(f"{'GPU budget':18}{self.budget / GiB:9.2f} GiB: {verdict}")
            if not self.fits:
                keep = self.gpu_layers()
                offloaded = self.offloaded_bytes()
                cpu = max(8, -(-int(1.25 * offloaded) // GiB))
                how = ("packed 4-bit codes (their scales stay on the GPU)" if self.stream_packed else "unquantized")
                lines.append(f"keep {keep} of {self.layers} decoder layers whole on the GPU ({self.gpu_total() / GiB:.2f} "
                             f"GiB peak) and stream {self.layers - keep}, {how}: {offloaded / GiB:.2f} GiB of host "
                             "RAM, copied to the GPU every forward")
                lines.append(f"  at {self.pcie_bytes_per_s / 1e9:g} GB/s (PCIe 4.0 x16) that is "
                             f"{offloaded / self.pcie_bytes_per_s:.2f} s a forward, {self.streaming_s_per_step():.2f} s "
                             f"a step of {self.forwards_per_step} forwards (overlapped with compute where it can)")
                why = ("accelerate's count of the resident layers' codes, embeddings and head: the streamed layers' "
                       "scales, the two in flight and the activations come on top" if self.stream_packed else
                       "the GPU figure caps weights only: the budget less activations, workspace and trainables")
                lines.append(f"  model.device_map: auto, model.max_memory: {{0: '{self.weights_allowance() / GiB:.2f}GiB', "
                             f"cpu: '{cpu}GiB'}} ({why})")
                if self.stream_packed:
                    lines.append(f"  loading reads the whole 4-bit model into host RAM once ({self.weights / GiB:.2f} "
                                 "GiB) before the GPU part moves over")
        lines += self.notes
        return "\n".join(lines)


def _forwards_per_step(strategy: str, pool: int) -> int:
    """A step's loss evaluations, from the class (its ``pool_arg`` sized 4, or the stacked pool)."""
    cls = STRATEGIES[strategy]
    return cls(**({cls.pool_arg: max(pool, 4)} if cls.pool_arg else {})).forwards_per_step


def _gpus_notes(gpus: int, strategy: str, batch: int, pool: int, layer_acts: int, logits: int, mask: int,
                activations: int) -> list[str]:
    """What ``gpus`` ranks buy: every rank holds the whole 4-bit model, so weights per GPU do not shrink."""
    fps = _forwards_per_step(strategy, pool)
    slots = max(d for d in range(1, gpus + 1) if gpus % d == 0 and d <= max(fps, 1))
    rounds = -(-fps // slots)
    rows = -(-batch // gpus)
    shrink = rows / batch
    dp_acts = int(layer_acts * shrink + logits * shrink + mask * shrink * shrink)
    return [f"{gpus} GPUs (torchrun --nproc-per-node {gpus} -m qzo train): each rank holds a full copy, so the "
            "weights, trainables and state per GPU are as above; ranks exchange only losses (16 bytes an evaluation)",
            f"  candidate-parallel (train.candidate_parallel: {slots}): a step's {fps} forwards take the time of {rounds} "
            f"instead of {fps} (up to {fps / rounds:.1f}x the steps per second); memory per GPU unchanged",
            f"  data-parallel (train.candidate_parallel: 1): each rank runs {rows} of the {batch} rows, so activations "
            f"fall from {activations / GiB:.2f} to about {dp_acts / GiB:.2f} GiB per GPU and a forward takes about "
            f"1/{gpus} of the time"]


def plan(source, quant: str = "nf4", gpu=None, batch: int = 8, seq: int = 512, lora_r: int = 8,
         lora_targets=("q_proj", "v_proj"), rule: str = "sgd", strategy: str = "spsa", pool: int = 1,
         double_quant: bool = False, dtype: str = "bfloat16", gpus: int = 1, embedding_on_cpu: bool = False) -> Plan:
    """Estimate the peak memory of one ZO step (see the module docstring for the parts).

    Args:
        source: a preset (``llama-2-7b``, ...), a config, a model folder, a GGUF or a hub id in the local
            Hugging Face cache (its ``config.json`` only).
        quant: ``nf4``, ``fp4``, ``int8`` or ``none``.
        gpu: the GPU budget (``"8GiB"`` or bytes); ``None``: no verdict.
        batch, seq: the batch shape of a training step.
        lora_r, lora_targets: the LoRA adapters trained (r 0: none).
        rule, strategy: decide the state kept (Adam 2x, Momentum 1x, LDSD's mean and ConMeZO's momentum 1x).
        pool: candidates evaluated in one stacked forward (``batched=True``), else 1.
        double_quant: bitsandbytes' double quantization of the 4-bit scales.
        dtype: compute dtype of the unquantized parts and the activations.
        gpus: ranks of a ``torchrun`` run (``qzo.distributed``); adds what N GPUs buy to the notes.
        embedding_on_cpu: the input embedding in host RAM (``model.embedding_on_cpu``): its bytes leave the GPU
            (an untied model only; a tied one is refused, as :func:`qzo.load` refuses it).
    """
    check_choice("quant", quant, QUANTS)
    check_choice("rule", rule, RULES)
    check_choice("strategy", strategy, STRATEGIES)
    check_choice("dtype", dtype, _DTYPE_BYTES)
    cfg = model_config(source)
    db = _DTYPE_BYTES[dtype]
    shapes = _linear_shapes(cfg)
    all_linear = lora_targets == ALL_LINEAR or tuple(lora_targets) == (ALL_LINEAR,)
    if all_linear:  # peft's all-linear: every linear of the decoder layers, not the LM head
        lora_targets = tuple(shapes)
    unknown = sorted(set(lora_targets) - set(shapes))
    if unknown:
        raise QzoError(f"LoRA targets {unknown} are not decoder linears; choose from {', '.join(shapes)}")
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    layer_weights = sum(_quantized_bytes(i, o, quant, double_quant, db) for i, o in shapes.values()) + 2 * h * db
    lora_values = sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in lora_targets) if lora_r else 0
    state_copies = rule_state_copies(rule) + STRATEGIES[strategy].dense_state_copies
    per_layer = layer_weights  # what keeping one more layer on the GPU costs
    # 4-bit layers that do not fit stream their packed codes (qzo.models.streaming); others go unquantized (accelerate)
    stream_packed = quant in ("nf4", "fp4")
    streamed_layer = (sum(i * o // 2 for i, o in shapes.values()) if stream_packed
                      else (sum(i * o for i, o in shapes.values()) + 2 * h) * db)
    embed = vocab * h * db
    tied = getattr(cfg, "tie_word_embeddings", False)
    head = 0 if tied else vocab * h * db
    if embedding_on_cpu and tied:
        raise QzoError("embedding_on_cpu: this model ties its input embedding to the LM head, which needs that weight "
                       "on the GPU every forward, so keeping it on the CPU saves nothing; leave the option off")
    host_embed = embed if embedding_on_cpu else 0
    embed -= host_embed
    weights = layers * layer_weights + embed + head + h * db
    trainables = 4 * lora_values * layers
    state = trainables * state_copies
    rows = batch * seq * pool
    i = cfg.intermediate_size
    # one layer at a time: residual, normed input, q/k/v/attention output; MLP gate, up, product
    layer_acts = rows * (6 * h + 3 * i) * db
    # the loss runs the head on labelled positions a chunk at a time (qzo.data.loss): one chunk of
    # logits, their float32 upcast and log-softmax, plus the gathered hidden states
    logits = min(batch * seq, chunk_tokens(vocab)) * vocab * (db + 2 * 4) + batch * seq * h * db
    # transformers' SDPA path builds a boolean [batch, 1, seq, seq] mask when the batch is padded
    mask = batch * pool * seq * seq
    activations = layer_acts + logits + mask
    workspace = max(i * o for i, o in shapes.values()) * db if quant != "none" else 0
    notes = []
    if all_linear and lora_r:
        notes.append(f"LoRA all-linear: every linear of the decoder layers ({', '.join(shapes)}), not the LM head")
    if host_embed:
        notes.append(f"the input embedding ({host_embed / GiB:.2f} GiB) stays in host RAM (model.embedding_on_cpu); "
                     f"each forward moves the batch's hidden states, {batch * seq * pool * h * db / 2**20:.0f} MiB, "
                     "to the GPU")
    elif embed + head > 0.25 * (weights or 1) and not tied:
        notes.append(f"embeddings + LM head are {(embed + head) / GiB:.2f} GiB in {dtype} (bitsandbytes leaves them "
                     "unquantized): keeping the input embedding on CPU (model.embedding_on_cpu: true, "
                     f"--embedding-on-cpu) saves {embed / GiB:.2f} GiB")
    if gpus > 1:
        notes += _gpus_notes(gpus, strategy, batch, pool, layer_acts, logits, mask, activations)
    elif gpus < 1:
        raise QzoError(f"--gpus must be >= 1, got {gpus}")
    result = Plan(weights, trainables, state, activations, workspace, parse_size(gpu) if gpu is not None else None,
                  per_layer, layers, streamed_layer=streamed_layer, stream_packed=stream_packed,
                  accelerate_layer=sum(i * o // 2 for i, o in shapes.values()) + 2 * h * db,
                  forwards_per_step=_forwards_per_step(strategy, pool), notes=notes)
    if result.budget is not None and not result.fits and result.gpu_total() > result.budget:
        need = result.total - layers * result._saved() + result._in_flight()
        raise QzoError(f"a GPU budget of {result.budget / GiB:.2f} GiB is below what even full offload needs: "
                       f"{need / GiB:.2f} GiB (embeddings, head, activations for batch {batch} x {seq}, the layers in "
                       "flight); "
                       "lower train.batch_size or train.max_len, or use a larger GPU")
    return result


#: hub ids of the shipped recipes' models -> the preset with their shapes, for a cache without their config.json
HUB_PRESETS = {
    "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/Llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
}


def plan_source(source, log=print):
    """The config to plan ``source`` with: :func:`model_config`'s, or for a shipped recipe's hub id whose
    ``config.json`` is not in the local cache, its preset's (same shapes), saying so to ``log``."""
    try:
        return model_config(source)
    except QzoError:
        preset = HUB_PRESETS.get(str(source))
        if preset is None or preset not in PRESETS:
            raise
        log(f"qzo plan: {source}'s config.json is not in the local Hugging Face cache; planning with the preset "
            f"{preset}, which has its shapes (`hf download {source} config.json` puts the real one there)")
        return model_config(preset)


def config_settings(cfg: dict) -> dict:
    """:func:`plan`'s arguments for a run config (a recipe): what its ZO step holds.

    ``model.source``, ``quant``, ``double_quant``, ``embedding_on_cpu`` and ``dtype`` (null: bfloat16, what CUDA
    runs), ``lora.r`` (0 when ``targets.lora`` is off) and ``target_modules``, ``optim.rule``
    and ``strategy`` (their names), the stacked pool (the strategy's ``pool_arg`` setting, e.g. gv's
    ``pool``, when ``optim.batched``; else 1), ``train.batch_size`` and ``max_len``. Trained scales and
    dense slices are not planned (LoRA trainables only).
    """
    m, o, t = cfg["model"], cfg["optim"], cfg["train"]
    strategy = component(STRATEGIES, o["strategy"], "optim.strategy")
    stacked = getattr(strategy, strategy.pool_arg) if o["batched"] and strategy.pool_arg else 1
    targets = cfg["lora"]["target_modules"]
    return {"source": m["source"], "quant": m["quant"], "double_quant": m["double_quant"],
            "embedding_on_cpu": m["embedding_on_cpu"],
            "dtype": m["dtype"] or "bfloat16", "batch": t["batch_size"], "seq": t["max_len"],
            "lora_r": cfg["lora"]["r"] if cfg["targets"]["lora"] else 0,
            "lora_targets": targets if isinstance(targets, str) else tuple(targets), "rule": o["rule"]["name"],
            "strategy": strategy.name, "pool": stacked}


def plan_config(cfg: dict, gpu=None, gpus: int = 1, log=print) -> Plan:
    """The plan of a run config's ZO step (:func:`config_settings`); a hub id goes through :func:`plan_source`."""
    settings = config_settings(cfg)
    return plan(plan_source(settings.pop("source"), log), gpu=gpu, gpus=gpus, **settings)
