"""Config -> components: the model, the trainables and the optimizer a run config describes.

The builders ``qzo train`` uses, kept apart from the training loop (:mod:`qzo.train.loop`) and
the run directory (:mod:`qzo.runs.reader`) so that ``qzo eval``, ``qzo chat``, ``qzo export`` and
scripts build the same objects from a config without importing the loop. Each builder is a
pure function of the config (and the model), so a run and its resume build the same things.
"""

from __future__ import annotations

from ..errors import ConfigError, QzoError, TargetError
from ..models.load import load
from ..targets import combine
from ..targets.dense import dense
from ..targets.lora import lora
from ..targets.norms import norm_paths
from ..targets.scales import scales
from ..zo.distributed import Distributed
from ..zo.normalize import Normalize
from ..zo.optim import ZO
from ..zo.params import ParamSet
from ..zo.rules import RULES
from ..zo.schedule import Schedule
from ..zo.strategies import STRATEGIES
from .schema import component

__all__ = ["build_strategy", "build_rule", "total_steps", "build_optimizer", "build_targets", "describe_targets",
           "load_model_and_targets"]


def build_strategy(cfg: dict):
    """The strategy ``optim.strategy`` names, built from its settings (its constructor is its schema)."""
    return component(STRATEGIES, cfg["optim"]["strategy"], "optim.strategy")


def build_rule(cfg: dict, lr: float | None = None):
    """The update rule ``optim.rule`` names, with ``optim.lr`` (or ``lr``: what ``optim.lr: auto`` found)."""
    lr = cfg["optim"]["lr"] if lr is None else lr
    if lr == "auto":
        raise QzoError("optim.lr is auto: the training loop finds it (qzo.zo.auto_lr) and passes it as lr=")
    return component(RULES, cfg["optim"]["rule"], "optim.rule", lr=lr)


def total_steps(cfg: dict, spent_forwards: int = 0) -> int:
    """The run's length in steps: ``train.steps``, or the first step reaching ``train.forwards`` evaluations.

    A strategy's forwards per step are fixed (a batched pool of K counts K), so a budget in
    forwards is a step count known before the run, which the lr schedules need. ``spent_forwards``
    (an lr range test's, ``optim.lr: auto``) come out of the budget.
    """
    budget = cfg["train"]["forwards"]
    if budget is None:
        return cfg["train"]["steps"]
    return max(-(-(budget - spent_forwards) // build_strategy(cfg).forwards_per_step), 1)


def build_optimizer(cfg: dict, params, distributed: Distributed | None = None, lr: float | None = None,
                    spent_forwards: int = 0, schedule: bool = True) -> ZO:
    """The ``qzo.ZO`` a config describes (spread over ranks with ``distributed``).

    ``lr`` replaces ``optim.lr`` (what ``optim.lr: auto`` found, after ``spent_forwards`` of the budget);
    ``schedule=False`` builds it with a constant lr (the range test's own steps).
    """
    o = cfg["optim"]
    schedule = Schedule(o["schedule"], total_steps=total_steps(cfg, spent_forwards), warmup_steps=o["warmup_steps"],
                        min_ratio=o["min_lr_ratio"]) if schedule else Schedule()
    normalize = Normalize(o["normalize"], beta=o["normalize_beta"]) if o["normalize"] else None
    try:  # noise_scale's patterns are checked against the trainables, which the config alone does not know
        return ZO(params, strategy=build_strategy(cfg), rule=build_rule(cfg, lr), eps=o["eps"],
                  seed=cfg["train"]["seed"], schedule=schedule, clip=o["clip"], normalize=normalize,
                  distributed=distributed, noise_scale=o["noise_scale"], noise_scale_steps=o["noise_scale_steps"],
                  subsample=o["subsample"])
    except TargetError as exc:  # only ParamSet.with_noise raises it while building ZO
        raise ConfigError(f"config key 'optim.noise_scale': {exc}") from None


def build_targets(model, cfg: dict, initial_lora=None) -> tuple[ParamSet, dict[str, ParamSet]]:
    """The trainables ``cfg["targets"]`` asks for: ``(the set ZO trains, {kind: part})``.

    Kinds are built in a fixed order (LoRA, scales, dense) so a run and its resume name and
    seed every tensor the same way; more than one kind goes through :func:`qzo.combine`.
    ``initial_lora`` (a :class:`qzo.targets.lora.InitialValues`, read by the caller that knows where
    ``lora.init_from`` points) replaces the config's path as the adapters' starting values.
    """
    t, parts = cfg["targets"], {}
    if t["lora"]:
        lc = cfg["lora"]
        start = lc["init_from"] if initial_lora is None else initial_lora
        parts["lora"] = lora(model, r=lc["r"], alpha=lc["alpha"], target_modules=lc["target_modules"],
                             seed=cfg["train"]["seed"], init_from=start)
    if t["scales"]:
        parts["scales"] = scales(model, modules=None if t["scales"] == "all" else t["scales"])
    if t["dense"] or t["norms"]:  # norms are dense slices too: one part, one dense.safetensors
        modules = list(t["dense"] or []) + (norm_paths(model, t["norms"]) if t["norms"] else [])
        parts["dense"] = dense(model, modules=list(dict.fromkeys(modules)))
    params = next(iter(parts.values())) if len(parts) == 1 else combine(*parts.values())
    return params, parts


def describe_targets(parts: dict[str, ParamSet]) -> str:
    """``"460,800 values: lora 120 tensors, scales 210 tensors"`` for logs."""
    total = sum(p.numel for p in parts.values())
    return f"{total:,} trainable values: " + ", ".join(f"{k} {len(p)} tensors ({p.numel:,})" for k, p in parts.items())


def load_model_and_targets(cfg: dict, build: bool = True, initial_lora=None):
    """Base model (quantized, placed) with the configured trainables: ``(model, tok, params, parts)``.

    ``build=False`` loads the base alone (``params`` is ``None``, ``parts`` empty), on the
    same CPU 4-bit path as the run, so its losses are the run's starting point.
    """
    m = cfg["model"]
    # bitsandbytes' fused CPU kernel reads a bf16 copy of the block scales: a run that trains
    # scales or dense slices loads the plain path, so they start from the full-precision scales
    t = cfg["targets"]
    fused = m["cpu_fused_4bit"] and not (t["scales"] or t["dense"] or t["norms"])
    model, tok = load(m["source"], m["quant"], double_quant=m["double_quant"], dtype=m["dtype"],
                      device_map=m["device_map"], max_memory=m["max_memory"], offload_folder=m["offload_folder"],
                      trust_remote_code=m["trust_remote_code"], cpu_fused_4bit=fused,
                      embedding_on_cpu=m["embedding_on_cpu"])
    if tok is None:
        raise QzoError("this model source has no tokenizer; training on chat data needs one")
    if not build:
        return model, tok, None, {}
    params, parts = build_targets(model, cfg, initial_lora)
    return model, tok, params, parts
