"""Update rules: SGD (fused, state-free), Momentum, Adam (ZO-Adam), Sign. Any works with any strategy."""

from .base import Rule
from .dense_grad import Adam, DenseRule, Momentum, Sign
from .sgd import SGD

__all__ = ["Rule", "DenseRule", "SGD", "Momentum", "Adam", "Sign", "RULES", "state_copies"]

#: the rules by config name (``optim.rule``): the one table the config, the CLI and the planner read
RULES: dict[str, type[Rule]] = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "sign": Sign}


def state_copies(name: str) -> int:
    """Copies of the trainables a rule keeps as state (Momentum 1, Adam 2, SGD and Sign none)."""
    return len(getattr(RULES[name], "state_names", ()))
