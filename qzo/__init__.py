"""qzo: zeroth-order fine-tuning of 4/8-bit quantized LLMs with seed-replayed noise.

    model, tok = qzo.load("smollm2-135m", quant="nf4")
    params = qzo.lora(model, r=8, target_modules=["q_proj", "v_proj"])
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-3), eps=1e-2)
    loss = opt.step(lambda: model(**batch).loss)

The house, one package per part, arrows pointing down this list (``tests/test_import_graph.py``
enforces them):

    cli/       what a user runs; the only place that prints for a user
    hf/        ZO steps inside transformers' Trainer and TRL's SFTTrainer (imported on demand)
    train/     the loop (setup -> train -> save), its guard, stop signals, the memory planner
    export/    a run written for peft, llama.cpp and merged checkpoints
    runs/      the run directory: writer, reader, checkpoints, lock, metrics, replay
    config/    the schema and the builders (config -> model, trainables, optimizer)
    data/      records -> batches -> a loss (formats, sources, templates, objectives, assets/)
    targets/   what ZO trains (LoRA, quantization scales, dense slices), saved and loaded
    models/    load, quantize (bnb), stream
    zo/        the optimizer core: ZO.step, strategies, rules; knows no model, data or run
    noise/     the seed -> z contract and the in-place passes; the one importer of qzo_kernels
    errors.py, cache.py   leaves every part may use (error types; the cache folder)

config/ is its own package rather than a part of train/ (the issue's first cut) because the
run reader, export and the CLI need the schema and the builders too, and ``runs/`` must not
import the training loop. The names below are the public API the README uses.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes logs on every int8 matmul that fp32 inputs are cast to fp16: expected, and it
# would print thousands of lines per run.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: "inputs will be cast" not in record.getMessage()
)

from .models.bnb import quiet_hub_kernel_warning  # noqa: E402

quiet_hub_kernel_warning()  # before anything imports bitsandbytes, which logs it at import

from . import noise, targets  # noqa: E402  (qzo.noise.randn: the noise contract; qzo.targets.save/load)
from .data import objectives  # noqa: E402  (qzo.objectives.RewardLoss: train on a reward)
from .data.loss import CausalLMLoss  # noqa: E402
from .errors import ConfigError, DataError, ModelSourceError, NonFiniteLossError, QzoError  # noqa: E402
from .models.load import load  # noqa: E402
from .noise.dispatch import get_backend, set_backend  # noqa: E402
from .runs import replay  # noqa: E402  (qzo.replay.replay_sgd: a run's values from its step log)
from .targets import TargetError, combine  # noqa: E402
from .targets.dense import DenseParams, dense, load_dense  # noqa: E402
from .targets.norms import norms  # noqa: E402
from .targets.lora import lora  # noqa: E402
from .targets.scales import ScaleParams, clip_grad, load_scales, scales  # noqa: E402
from .train.plan import plan  # noqa: E402  (qzo.plan(...): a ZO step's planned peak memory)
from .zo import distributed  # noqa: E402  (qzo.distributed.init_from_env: a ZO run over torchrun ranks)
from .zo.distributed import Distributed  # noqa: E402
from .zo.normalize import Normalize  # noqa: E402
from .zo.optim import ZO  # noqa: E402
from .zo.params import ParamSet, Trainable  # noqa: E402
from .zo.rules import SGD, Adam, Momentum, Rule, Sign, SignMomentum  # noqa: E402
from .zo.schedule import Schedule  # noqa: E402
from .zo.strategies import FZOO, GV, LDSD, SPSA, ConMeZO, Greedy, PerExample, Strategy  # noqa: E402
from .zo.types import Estimate, StepRecord  # noqa: E402

__all__ = [
    "load", "lora", "scales", "dense", "norms", "combine", "ZO", "StepRecord",
    "SPSA", "GV", "Greedy", "LDSD", "FZOO", "ConMeZO", "PerExample", "Normalize",
    "SGD", "Momentum", "Adam", "Sign", "SignMomentum", "Schedule", "clip_grad",
    "CausalLMLoss", "Strategy", "Rule", "Estimate", "ParamSet", "Trainable",
    "ScaleParams", "DenseParams", "load_scales", "load_dense", "targets", "noise",
    "set_backend", "get_backend", "objectives", "replay", "plan", "distributed", "Distributed",
    "QzoError", "ConfigError", "DataError", "ModelSourceError", "NonFiniteLossError", "TargetError", "__version__",
]
