"""qzo: zeroth-order fine-tuning of 4/8-bit quantized LLMs with seed-replayed noise.

    model, tok = qzo.load("smollm2-135m", quant="nf4")
    params = qzo.lora(model, r=8, target_modules=["q_proj", "v_proj"])
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-3), eps=1e-2)
    loss = opt.step(lambda: model(**batch).loss)

A pool strategy over LoRA can evaluate its pool in one stacked forward:
``qzo.GV(pool=4, batched=True)`` with ``opt.step(qzo.CausalLMLoss(model, batch))``.
"""

import logging
import sys

__version__ = "0.1.0"

# bitsandbytes logs on every int8 matmul that fp32 inputs are cast to fp16: expected, and it
# would print thousands of lines per run.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: "inputs will be cast" not in record.getMessage()
)

from .targets.bnb import quiet_hub_kernel_warning  # noqa: E402

quiet_hub_kernel_warning()  # before anything imports bitsandbytes, which logs it at import

from . import noise  # noqa: E402
from .backend import get_backend, set_backend  # noqa: E402
from .loss import CausalLMLoss  # noqa: E402
from . import targets  # noqa: E402
from .targets.dense import DenseParams, dense, load_dense  # noqa: E402
from .targets.scales import ScaleParams, clip_grad, load_scales, scales  # noqa: E402
from .targets import TargetError, combine  # noqa: E402
from .errors import ConfigError, DataError, ModelSourceError, NonFiniteLossError, QzoError  # noqa: E402
from .load import load  # noqa: E402
from .targets.lora import lora  # noqa: E402

# The modules' paths before qzo/targets/ gathered them: `from qzo.scales import ScaleParams` and
# `from qzo.bnb import choose_cpu_path` go on working (the same module objects, not copies). As
# before, the attributes qzo.lora / qzo.scales / qzo.dense are the builder functions.
for _old in ("bnb", "lora", "scales", "dense"):
    sys.modules[f"{__name__}.{_old}"] = sys.modules[f"{__name__}.targets.{_old}"]
del _old
from .targets import bnb  # noqa: E402,F401  (qzo.bnb.choose_cpu_path, as before)
from .optim import ZO, StepRecord  # noqa: E402
from . import distributed  # noqa: E402  (qzo.distributed.init_from_env: a ZO run over torchrun ranks)
from .distributed import Distributed  # noqa: E402
from .params import ParamSet, Trainable  # noqa: E402
from .rules import SGD, Adam, Momentum, Rule, Sign  # noqa: E402
from .schedule import Schedule  # noqa: E402
from .normalize import Normalize  # noqa: E402
from .strategies import FZOO, GV, LDSD, SPSA, ConMeZO, Estimate, Greedy, PerExample, Strategy  # noqa: E402
from . import objectives  # noqa: E402  (qzo.objectives.RewardLoss: train on a reward)
from . import replay  # noqa: E402  (qzo.replay.replay_sgd: a run's values from its step log)
# qzo.plan(...): a ZO step's planned peak memory. As with qzo.load, the function takes the module's
# attribute name; `from qzo.plan import PRESETS` still reaches the module.
from .plan import plan  # noqa: E402

__all__ = [
    "load", "lora", "scales", "dense", "combine", "ZO", "StepRecord",
    "SPSA", "GV", "Greedy", "LDSD", "FZOO", "ConMeZO", "PerExample", "Normalize",
    "SGD", "Momentum", "Adam", "Sign", "Schedule", "clip_grad",
    "CausalLMLoss", "Strategy", "Rule", "Estimate", "ParamSet", "Trainable",
    "ScaleParams", "DenseParams", "load_scales", "load_dense", "targets", "noise",
    "set_backend", "get_backend", "objectives", "replay", "plan", "distributed", "Distributed",
    "QzoError", "ConfigError", "DataError", "ModelSourceError", "NonFiniteLossError", "TargetError", "__version__",
]
