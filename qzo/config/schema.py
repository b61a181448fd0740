"""Run configuration: defaults, YAML loading, ``--set key=value`` overrides and validation.

``DEFAULTS`` are what every key is when a config does not set it: plain MeZO (SPSA on every
trainable, lr 1e-3) on the demo model and data. ``qzo train`` with no config runs the shipped
recipe ``smollm2-135m/demo`` (:data:`DEMO_RECIPE`, package data, so a wheel has it), which
spells out the keys a user tunes, with comments, and differs from the defaults only where a
measurement says the demo should (B-only directions and their lr, batch, steps; a test holds
that list). The defaults stay MeZO because a default like ``noise_scale: {"*lora_A*": 0}``
names LoRA tensors, which a config training scales or dense slices does not have.
``load_config`` takes a YAML file or a shipped recipe's name (:mod:`qzo.recipes`). A config
is a nested dict with the fixed sections below. Every key must exist in
``DEFAULTS`` (a typo is an error that lists the valid keys), values are checked against the
default's type, and impossible values are rejected with the valid range.
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import yaml

from ..data.formats import FORMATS, check_fields
from ..data.sources import parse_hf
from ..data.templates import template_problem
from ..errors import ConfigError, DataError
from ..models.bnb import QUANTS
from ..recipes import DEMO_MODEL
from ..targets.lora import ALL_LINEAR
from ..zo.normalize import NORMALIZATIONS
from ..zo.rules import RULES
from ..zo.strategies import STRATEGIES
from .reading import MAX_CONFIG_BYTES, clip, load_yaml, read_config, short_repr

__all__ = ["REPORTERS", "DEFAULTS", "load_config", "config_file", "merge_config", "apply_overrides", "validate",
           "flat_keys", "get"]

#: the trackers ``train.report_to`` may name, with the command that installs each (qzo.runs.metrics drives them)
REPORTERS = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb", "mlflow": "pip install mlflow"}

DEFAULTS: dict = {
    "model": {
        "source": DEMO_MODEL,  # folder, .gguf, built-in name or hub id
        "quant": "nf4",  # nf4 | fp4 | int8 | none
        "double_quant": False,
        "dtype": None,  # compute dtype; null: float32 on CPU, bfloat16 on CUDA
        "device_map": None,  # null: auto with a GPU, cpu without
        "max_memory": None,  # e.g. {0: "6GiB", "cpu": "48GiB"} (GPU by index: accelerate rejects "cuda:0")
        "offload_folder": None,
        "trust_remote_code": False,
        "cpu_fused_4bit": False,  # bitsandbytes' fused bf16 CPU kernel (AVX512-BF16 only; faster on some CPUs)
        "embedding_on_cpu": False,  # input embedding in host RAM (GPU bytes saved; values unchanged; untied models)
    },
    "lora": {
        "r": 8,
        "alpha": 16.0,
        "target_modules": ["q_proj", "v_proj"],  # module names, or all-linear (every decoder linear, not the head)
        # null: fresh adapters (B = 0); a PEFT adapter folder, a qzo run or its checkpoints/step-N: start from
        # its values (r, alpha, modules and shapes must match; qzo.lora.load_initial_values checks them)
        "init_from": None,
    },
    "targets": {
        "lora": True,  # train the LoRA adapters of the lora section
        "scales": None,  # null: off; "all" or module patterns: train their quantization scales (qzo.scales)
        "dense": None,  # null: off; module patterns trained as float32 dense slices (qzo.dense)
        "norms": None,  # null: off; "all" or module patterns: the normalization layers' gains (qzo.norms)
    },
    "data": {
        "train": "builtin:demo_train",  # JSONL, builtin:NAME, hf:KIND:PATH, hf:NAME[:SPLIT] or hf:NAME:CONFIG:SPLIT
        "eval": "builtin:demo_eval",  # null: hold out data.eval_fraction of train
        "eval_fraction": 0.1,
        "format": "auto",  # auto | chat | sharegpt | alpaca | completion | text (auto: detected per record)
        "fields": None,  # null, or qzo's field names -> the dataset's, e.g. {messages: conv, role: speaker}
        "system_prompt": None,  # system message added to examples without one; null: none added
        "chat_template": None,  # null: the tokenizer's; chatml | llama3 | qwen2.5 | path to a jinja file
        "train_on_inputs": False,  # true: loss on every token of the chat, not only the assistant's
        "packing": False,  # pack whole training examples into rows of train.max_len (no attention across them)
    },
    "optim": {
        # the components: a name and the constructor's own settings, e.g. {name: gv, pool: 4} is qzo.GV(pool=4)
        # (strategies: spsa | gv | greedy | ldsd | fzoo | conmezo | per_example; `gv` alone means {name: gv})
        "strategy": {"name": "spsa"},
        "rule": {"name": "sgd"},  # sgd | momentum (beta) | adam (betas, eps) | sign; each takes weight_decay
        "lr": 1e-3,  # the rule's lr (a schedule scales it per step); auto: a range test at the start finds it
        "eps": 1e-2,  # perturbation scale
        "normalize": None,  # null | spread (step / spread of the step's losses, FZOO) | rms (running RMS of the slope)
        "normalize_beta": 0.99,  # normalize rms: decay of the running mean square
        "schedule": "constant",  # constant | linear | cosine
        "warmup_steps": 0,
        "min_lr_ratio": 0.0,  # final lr / lr for linear and cosine
        "batched": False,  # pool strategies: evaluate the pool in one stacked forward (LoRA only)
        "clip": None,  # limit the projected gradient to [-clip, clip] (QZO's clipping; null: off)
        # LoRA-aware directions: name pattern -> scale of the noise those tensors draw, e.g. {"*lora_A*": 0} (B only)
        # or {"*lora_A*": 0.5} (A explored at half of B's scale); null: plain noise everywhere (MeZO)
        "noise_scale": None,
        "noise_scale_steps": None,  # noise_scale for the first this many steps only, then plain (null: always)
        "subsample": None,  # a share in (0, 1]: each step perturbs only that share of the tensors (null: all of them)
    },
    "train": {
        "steps": 200,
        "forwards": None,  # a budget in loss evaluations instead of steps: stop at the first step reaching it
        "batch_size": 8,
        "max_len": 96,
        "eval_every": 50,  # steps between held-out evaluations (also at step 0 and the end)
        "eval_every_forwards": None,  # instead of eval_every: evaluate at the first step past each multiple
        "early_stop_patience": None,  # stop after this many held-out evaluations without a new best (null: off)
        "early_stop_factor": None,  # stop when a held-out loss exceeds the best by this factor, e.g. 1.5 (null: off)
        # undo a step whose loss is non-finite or over this x the running mean of the last 20 (qzo.train.guard), e.g. 3;
        # null: off (a non-finite loss stops the run). Costs two copies of the trainables in RAM and in checkpoints
        "divergence_factor": None,
        "divergence_backoff": 0.5,  # the lr is multiplied by this at every undone step
        "divergence_limit": 3,  # this many undone steps in a row stop the run
        "eval_batch_size": 16,
        "save_every": 50,  # steps between checkpoints (also at the end)
        "keep_checkpoints": 2,
        "seed": 0,
        "candidate_parallel": 1,  # under torchrun: ranks that split each step's evaluations (world / this = data shards)
        "check_every": 50,  # under torchrun: compare a checksum of the trainables across ranks every this many steps
        "dist_timeout_s": 300.0,  # under torchrun: a rank silent this long stops the run, naming where
        "report_to": ["tensorboard"],  # trackers mirroring metrics.jsonl: any of tensorboard, wandb, mlflow ([]: none)
    },
    "objective": {
        "kind": "cross_entropy",  # cross_entropy (on the assistant tokens) | reward (on generated replies)
        "reward": None,  # kind reward: exact_match | token_f1 | module:function | file.py:function (qzo.objectives)
        "max_new_tokens": 32,  # kind reward: longest reply generated per prompt and evaluation
        "temperature": 0.0,  # kind reward: 0 greedy; > 0 sampling, the same random numbers for a step's evaluations
    },
    "out_dir": None,  # run directory; null: runs/<name>-<time>
}

_CHOICES = {
    ("model", "quant"): QUANTS,
    ("model", "dtype"): (None, "float32", "bfloat16", "float16"),
    ("optim", "normalize"): (None, *NORMALIZATIONS),
    ("optim", "schedule"): ("constant", "linear", "cosine"),
    ("data", "format"): FORMATS,
    ("objective", "kind"): ("cross_entropy", "reward"),
}
_POSITIVE = {("optim", "lr"), ("optim", "eps"), ("lora", "alpha"), ("train", "dist_timeout_s")}
_AT_LEAST_ONE = {("lora", "r"), ("train", "steps"), ("train", "batch_size"), ("train", "eval_every"),
                 ("train", "candidate_parallel"), ("train", "check_every"),
                 ("train", "eval_batch_size"), ("train", "save_every"), ("train", "keep_checkpoints"),
                 ("train", "divergence_limit")}
# Keys that may be null, by the types they take otherwise.
_NULLABLE_BY_TYPE = {
    (str,): ("model.dtype", "model.offload_folder", "data.eval", "data.system_prompt", "data.chat_template",
             "lora.init_from", "out_dir", "optim.normalize", "objective.reward"),
    (str, dict): ("model.device_map",),
    (dict,): ("model.max_memory", "data.fields", "optim.noise_scale"),
    (float, int): ("optim.clip", "train.early_stop_factor", "train.divergence_factor", "optim.subsample"),
    (int,): ("optim.noise_scale_steps", "train.forwards", "train.eval_every_forwards", "train.early_stop_patience"),
    (str, list): ("targets.scales", "targets.norms"),
    (list,): ("targets.dense",),
}
_NULLABLE_TYPES = {tuple(key.split(".")): types for types, keys in _NULLABLE_BY_TYPE.items() for key in keys}


#: the component keys: name -> family registry. Their settings are the class's constructor arguments, so the
#: schema below a component is the class itself (checked by building it, :func:`component`)
COMPONENTS = {"optim.strategy": STRATEGIES, "optim.rule": RULES}
#: arguments a component takes from elsewhere in the config, not from its own mapping
_GIVEN = {"optim.rule": {"lr": "optim.lr"}}
#: the flat optim keys before components nested their settings -> where each lives now
MOVED = {f"optim.{old}": new for old, new in {
    "pool": "optim.strategy.pool", "split": "optim.strategy.split", "candidates": "optim.strategy.candidates",
    "sigma": "optim.strategy.sigma", "lr_mu": "optim.strategy.lr_mu", "probes": "optim.strategy.probes",
    "baseline": "optim.strategy.baseline", "cone_theta": "optim.strategy.theta", "cone_beta": "optim.strategy.beta",
    "cone_ramp_steps": "optim.strategy.ramp_steps", "momentum": "optim.rule.beta", "betas": "optim.rule.betas",
    "weight_decay": "optim.rule.weight_decay"}.items()}


def moved_error(key: str) -> ConfigError:
    """The one error for a flat key of the older layout: its new spelling."""
    new = MOVED[key]
    section, arg = new.rsplit(".", 1)
    example = {"optim.strategy": "{name: gv, pool: 4}", "optim.rule": "{name: momentum, beta: 0.9}"}[section]
    return ConfigError(f"config key {key!r} is now {new!r}: a component's settings live with it, e.g. "
                       f"{section.split('.')[1]}: {example} in the optim section, or --set {new}=VALUE")


def component(family: dict, spec, where: str, **given):
    """Build the strategy or rule a config mapping names (``{name: gv, pool: 4}`` or just ``gv``).

    The class's constructor is the schema: an unknown setting, a value of the wrong type or one
    the constructor refuses is a :class:`ConfigError` naming the key (``optim.strategy.pool``)
    and what it takes. ``given`` are the arguments the config sets elsewhere (a rule's lr).
    """
    spec = {"name": spec} if isinstance(spec, str) else spec
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"config key {where!r} must be a name or a mapping with a name, e.g. {{name: "
                          f"{next(iter(family))}}}; choose one of {', '.join(family)}, got {_brief(spec)}")
    settings = {k: v for k, v in spec.items() if k != "name"}
    cls = family.get(spec["name"])
    if cls is None:
        raise ConfigError(f"config key '{where}.name' is {_brief(spec['name'])}; choose one of {', '.join(family)}")
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and n not in given}
    for key, value in settings.items():
        if key not in params:
            taken = {k: f"config key {v!r}" for k, v in _GIVEN.get(where, {}).items()}
            hint = f" ({key} is {taken[key]})" if key in taken else ""
            raise ConfigError(f"config key '{where}.{clip(key, 60)}' is not a setting of {spec['name']}{hint}; its "
                              f"settings: {', '.join(params) or 'none'}")
        default = params[key].default
        if isinstance(default, tuple) and isinstance(value, list):  # YAML has no tuples: betas [0.9, 0.999]
            ok = len(value) == len(default) and all(_type_ok(d, v, ()) for d, v in zip(default, value))
        else:
            ok = default is inspect.Parameter.empty or default is None or _type_ok(default, value, ())
        if not ok:
            want = "number" if isinstance(default, float) else type(default).__name__
            raise ConfigError(f"config key '{where}.{key}' must be a {want} (like its default {default!r}), got "
                              f"{_brief(value)}")
    try:
        return cls(**given, **settings)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"config key {where!r} ({spec['name']}): {clip(exc)}") from None


def _brief(value) -> str:
    """A bad value as one short line (a config value can be huge): at most 80 characters, computed in bounded time
    (reprlib looks at the first few items of a container, a few levels deep, never all of it)."""
    try:
        text = short_repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        text = f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else f"<a {type(value).__name__}>"
    return clip(text)


def flat_keys(tree: dict = DEFAULTS, prefix: str = "") -> list[str]:
    """Every valid dotted key, e.g. ``optim.lr`` (a component, ``optim.strategy``, is one key: its settings
    depend on the class it names)."""
    keys = []
    for k, v in tree.items():
        if isinstance(v, dict) and (prefix + k) not in ("model.max_memory", *COMPONENTS):
            keys.extend(flat_keys(v, prefix + k + "."))
        else:
            keys.append(prefix + k)
    return keys


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(cfg: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(node[part], str) and ".".join(parts[:i + 1]) in COMPONENTS:  # gv -> {name: gv}: a setting
            node[part] = {"name": node[part]}
        node = node[part]
    node[parts[-1]] = value


def merge_config(base: dict, update: dict, where: str = "") -> None:
    """Merge a (partial) config tree into ``base`` in place; an unknown key is a :class:`ConfigError`."""
    for k, v in update.items():
        key = f"{where}{k}"
        if key in MOVED:
            raise moved_error(key)
        if key in COMPONENTS:  # a component's mapping replaces the default whole: its settings belong to its name
            base[k] = copy.deepcopy(v)
            continue
        if k not in base:
            valid = [x for x in flat_keys() if x.startswith(where)] if where else list(DEFAULTS)
            raise ConfigError(f"unknown config key {_brief(key)}; valid keys here: {', '.join(valid)}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            merge_config(base[k], v, key + ".")
        elif isinstance(base[k], dict) and key != "model.max_memory":
            raise ConfigError(f"config key {_brief(key)} is a section; give it a mapping of "
                              f"{', '.join(base[k])}, not {_brief(v)}")
        else:
            base[k] = v


def config_file(config: str | Path):
    """The file ``config`` names: a YAML file, else a shipped recipe (``llama-3.1-8b-instruct/gpu-24gib``)."""
    path = Path(config)
    if path.is_file():
        return path
    from .. import recipes

    try:
        return recipes.find(str(config))
    except ConfigError:
        raise ConfigError(f"config {_brief(str(config))} does not exist: it is neither a file nor a shipped recipe; "
                          f"the recipes are: {', '.join(recipes.names())} (`qzo recipes` shows each one's "
                          f"model and card)") from None


#: what ``qzo train`` runs with no config (the CPU demo)
DEMO_RECIPE = "smollm2-135m/demo"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults, then the YAML file or shipped recipe (``None``: the demo's), then ``key=value`` overrides; validated.

    The file is read only up to :data:`MAX_CONFIG_BYTES` and parsed by a loader that refuses
    YAML whose aliases expand past :data:`qzo.config.reading.MAX_NODES` values (:func:`load_yaml`), so a hostile
    file costs milliseconds, not minutes and gigabytes.
    """
    cfg = copy.deepcopy(DEFAULTS)
    path = config_file(DEMO_RECIPE if path is None else path)
    try:
        data = load_yaml(read_config(path), str(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {clip(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    merge_config(cfg, data)
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``1e-3``, ``[a, b]``, ``null``), by the
    bounded loader of config files (:func:`load_yaml`), and at most :data:`MAX_CONFIG_BYTES` long."""
    valid = flat_keys()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {_brief(item)}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in MOVED:
            raise moved_error(key)
        if key not in valid and not (key.rsplit(".", 1)[0] in COMPONENTS and key.count(".") == 2):
            raise ConfigError(f"unknown config key {_brief(key)} in --set; valid keys: {', '.join(valid)}")
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"--set {key}: the value is {len(raw):,} characters, over the {MAX_CONFIG_BYTES:,} a "
                              f"whole config may hold; give {key} a shorter value")
        try:
            value = load_yaml(raw, f"--set {key}")
        except yaml.YAMLError:
            value = raw
        _set(cfg, key, value)
    return cfg


def _type_ok(default, value, key: tuple) -> bool:
    if value is None:
        return default is None or key in _NULLABLE_TYPES
    if default is None:
        return isinstance(value, _NULLABLE_TYPES.get(key, (object,)))
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if key == ("lora", "target_modules") and value == ALL_LINEAR:
        return True
    if isinstance(default, list):
        kind = (int, float) if isinstance(default[0], float) else type(default[0])
        return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    return isinstance(value, type(default))


def _validate_targets(cfg: dict) -> None:
    t = cfg["targets"]
    if not (t["lora"] or t["scales"] or t["dense"] or t["norms"]):
        raise ConfigError("nothing to train: targets.lora is false and targets.scales / targets.dense / "
                          "targets.norms are null; turn one on, e.g. --set targets.lora=true")
    for key in ("scales", "norms"):
        if isinstance(t[key], str) and t[key] != "all":
            raise ConfigError(f"config key 'targets.{key}' is {_brief(t[key])}; give \"all\" or a list of module "
                              "patterns such as [q_proj, v_proj] or ['model.layers.0.*']")
    for key in ("scales", "dense", "norms"):
        value = t[key]
        if isinstance(value, list) and (not value or not all(isinstance(v, str) and v for v in value)):
            raise ConfigError(f"config key 'targets.{key}' must be null or a non-empty list of module patterns "
                              f"(strings), got {_brief(value)}")
    if cfg["optim"]["strategy"]["name"] == "per_example" and (t["scales"] or t["dense"] or t["norms"]
                                                             or not t["lora"]):
        raise ConfigError("optim.strategy per_example perturbs each row inside the LoRA layers' forward: it trains "
                          "LoRA only (targets.lora true, targets.scales and targets.dense null)")
    if cfg["optim"]["batched"] and (t["scales"] or t["dense"] or t["norms"]):
        raise ConfigError("config key 'optim.batched' evaluates LoRA candidates inside the forward; it cannot "
                          "batch scale or dense targets: set optim.batched=false or train LoRA only")


def _validate_data(cfg: dict) -> None:
    d = cfg["data"]
    problem = check_fields(d["fields"])
    if problem:
        raise ConfigError(f"config key 'data.fields' {clip(problem)}")
    problem = template_problem(d["chat_template"])
    if problem:
        raise ConfigError(f"config key 'data.chat_template' {clip(problem)}")
    for key in ("train", "eval"):  # an hf: spec's syntax is checked here, before the model loads
        if isinstance(d[key], str) and d[key].startswith("hf:"):
            try:
                parse_hf(d[key])
            except DataError as exc:
                raise ConfigError(f"config key 'data.{key}': {clip(exc)}") from None
    if d["format"] == "text" and cfg["objective"]["kind"] == "reward":
        raise ConfigError("data.format text (raw text, no prompts) cannot be used with objective.kind=reward, which "
                          "generates replies to chats; set data.format to a chat format or "
                          "objective.kind=cross_entropy")


def _validate_objective(cfg: dict) -> None:
    ob = cfg["objective"]
    if ob["max_new_tokens"] < 1:
        raise ConfigError(f"config key 'objective.max_new_tokens' must be >= 1, got {_brief(ob['max_new_tokens'])}")
    if not ob["temperature"] >= 0:
        raise ConfigError(f"config key 'objective.temperature' must be >= 0 (0: greedy), got "
                          f"{_brief(ob['temperature'])}")
    if ob["kind"] != "reward":
        return
    reward = ob["reward"]
    if not reward or not reward.strip():
        raise ConfigError("objective.kind is reward but 'objective.reward' is not set; give exact_match, token_f1 "
                          "or module:function, e.g. --set objective.reward=token_f1")
    if reward.strip() not in ("exact_match", "token_f1") and ":" not in reward:
        raise ConfigError(f"config key 'objective.reward' is {_brief(reward)}; give exact_match, token_f1, "
                          "module:function or path/to/file.py:function")
    if cfg["data"]["packing"]:
        raise ConfigError("data.packing cannot be used with objective.kind=reward: replies are generated per "
                          "chat, and packed rows mix several; set data.packing=false")
    if cfg["optim"]["batched"] or cfg["optim"]["strategy"]["name"] == "per_example":
        raise ConfigError("config keys 'optim.batched' and optim.strategy per_example evaluate the cross-entropy loss "
                          "inside one forward; with objective.kind=reward set optim.batched=false and another strategy")


def _validate_names(cfg: dict) -> None:
    """``lora.target_modules`` and ``train.report_to``: the one string and the names they take."""
    modules = cfg["lora"]["target_modules"]
    if isinstance(modules, str) and modules != ALL_LINEAR:
        raise ConfigError(f"config key 'lora.target_modules' is {_brief(modules)}; give a list of module names such as "
                          f"[q_proj, v_proj], or {ALL_LINEAR} (every linear layer of the decoder, not the LM head)")
    report_to = cfg["train"]["report_to"]
    if isinstance(report_to, str):  # `--set train.report_to=wandb`: one name; none (transformers' word): []
        report_to = cfg["train"]["report_to"] = [] if report_to == "none" else [report_to]
    if isinstance(report_to, list) and all(isinstance(n, str) for n in report_to):  # else: the type check's error
        unknown = [n for n in report_to if n not in REPORTERS]
        if unknown:
            raise ConfigError(f"config key 'train.report_to' names "
                              f"{clip(', '.join(map(repr, unknown)))}; give a list of "
                              f"{', '.join(REPORTERS)} (any subset; [] for none), e.g. [tensorboard, wandb]")


def _validate_components(cfg: dict) -> None:
    """Build every component the config names (the one check of its settings); store it as a mapping."""
    for where, family in COMPONENTS.items():
        section, key = where.split(".")
        spec = cfg[section][key]
        given = {arg: get(cfg, source) for arg, source in _GIVEN.get(where, {}).items()}
        given = {arg: 1.0 if value == "auto" else value for arg, value in given.items()}  # optim.lr auto: any lr builds
        component(family, spec, where, **given)
        if isinstance(spec, str):
            cfg[section][key] = {"name": spec}


def validate(cfg: dict) -> dict:
    """Check types, choices and ranges of every key; raises :class:`ConfigError` naming the key."""
    _validate_names(cfg)
    for dotted in flat_keys():
        if dotted in COMPONENTS:  # their schema is their class: checked by building them, below
            continue
        if dotted == "optim.lr" and get(cfg, dotted) == "auto":  # found at the start of the run (qzo.zo.auto_lr)
            continue
        key = tuple(dotted.split("."))
        default, value = get(DEFAULTS, dotted), get(cfg, dotted)
        if isinstance(default, float) and isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; users write it that way.
            try:
                value = float(value)
                _set(cfg, dotted, value)
            except ValueError:
                pass
        if not _type_ok(default, value, key):
            kinds = _NULLABLE_TYPES.get(key, ())
            want = type(default).__name__ if default is not None else "/".join(t.__name__ for t in kinds)
            raise ConfigError(f"config key {dotted!r} must be {want}, got {_brief(value)}")
        if isinstance(value, float) and not math.isfinite(value) or (
                isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value)):
            raise ConfigError(f"config key {dotted!r} must be a finite number, got {_brief(value)}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"config key {dotted!r} is {_brief(value)}; choose one of "
                              f"{', '.join(map(str, _CHOICES[key]))}")
        if key in _POSITIVE and not value > 0:
            raise ConfigError(f"config key {dotted!r} must be > 0, got {_brief(value)}")
        if key in _AT_LEAST_ONE and value < 1:
            raise ConfigError(f"config key {dotted!r} must be >= 1, got {_brief(value)}")
    _validate_components(cfg)
    _validate_targets(cfg)
    _validate_data(cfg)
    _validate_objective(cfg)
    if cfg["targets"]["lora"] and not cfg["lora"]["target_modules"]:
        raise ConfigError("config key 'lora.target_modules' is empty; name at least one layer, e.g. [q_proj, v_proj]")
    init = cfg["lora"]["init_from"]
    if init is not None and (not init.strip() or not cfg["targets"]["lora"]):
        raise ConfigError(f"config key 'lora.init_from' is {_brief(init)}: give the path of a PEFT adapter folder, a qzo run or "
                          "one of its checkpoints, with targets.lora true (it sets the adapters' starting values), or null")
    o = cfg["optim"]
    for key, low in (("warmup_steps", 0), ("min_lr_ratio", 0)):
        if o[key] < low:
            raise ConfigError(f"config key 'optim.{key}' must be >= {low}, got {_brief(o[key])}")
    if o["min_lr_ratio"] > 1:
        raise ConfigError(f"config key 'optim.min_lr_ratio' must be <= 1 (the final lr / lr), got "
                          f"{_brief(o['min_lr_ratio'])}")
    strategy = STRATEGIES[o["strategy"]["name"]]
    if o["batched"] and strategy.pool_arg is None:
        pools = ", ".join(n for n, c in STRATEGIES.items() if c.pool_arg)
        raise ConfigError(f"config key 'optim.batched' applies to pool strategies ({pools}), not {strategy.name}")
    if not 0 <= o["normalize_beta"] < 1:
        raise ConfigError(f"config key 'optim.normalize_beta' must be in [0, 1), got {_brief(o['normalize_beta'])}")
    patience, factor = cfg["train"]["early_stop_patience"], cfg["train"]["early_stop_factor"]
    if factor is not None and not factor > 1:
        raise ConfigError(f"config key 'train.early_stop_factor' must be > 1 (a loss that many times the best) or "
                          f"null, got {_brief(factor)}")
    divergence, backoff = cfg["train"]["divergence_factor"], cfg["train"]["divergence_backoff"]
    if divergence is not None and not divergence > 1:
        raise ConfigError(f"config key 'train.divergence_factor' must be > 1 (a loss that many times its running "
                          f"mean is undone) or null (off), got {_brief(divergence)}")
    if not 0 < backoff <= 1:
        raise ConfigError(f"config key 'train.divergence_backoff' must be in (0, 1] (the lr is multiplied by it at "
                          f"every undone step), got {_brief(backoff)}")
    if patience is not None and patience < 1:
        raise ConfigError(f"config key 'train.early_stop_patience' must be >= 1 or null, got {_brief(patience)}")
    for key in ("forwards", "eval_every_forwards"):
        if cfg["train"][key] is not None and cfg["train"][key] < 1:
            raise ConfigError(f"config key 'train.{key}' must be >= 1 or null, got {_brief(cfg['train'][key])}")
    if o["subsample"] is not None and not 0 < o["subsample"] <= 1:
        raise ConfigError(f"config key 'optim.subsample' must be in (0, 1] (a share of the tensors) or null, got "
                          f"{short_repr(o['subsample'])}")
    if o["clip"] is not None and not o["clip"] > 0:
        raise ConfigError(f"config key 'optim.clip' must be > 0 or null, got {_brief(o['clip'])}")
    for pattern, scale in (o["noise_scale"] or {}).items():
        if not isinstance(pattern, str) or isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not scale >= 0:
            raise ConfigError(f"config key 'optim.noise_scale' maps name patterns to scales >= 0, e.g. "
                              f"{{'*lora_A*': 0}}; got {_brief(pattern)}: {_brief(scale)}")
    if o["noise_scale_steps"] is not None and (o["noise_scale_steps"] < 0 or not o["noise_scale"]):
        raise ConfigError(f"config key 'optim.noise_scale_steps' must be >= 0 and needs optim.noise_scale, got "
                          f"{_brief(o['noise_scale_steps'])} with noise_scale {_brief(o['noise_scale'])}")
    return cfg
