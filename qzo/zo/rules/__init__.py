"""Update rules: SGD (fused, state-free), Momentum, Adam (ZO-Adam), Sign. Any works with any strategy."""

from .base import Rule

from .sgd import SGD  # isort: skip  (first: the order configs, the CLI and errors list the rules in)
from .dense_grad import Momentum, Adam, Sign, SignMomentum, DenseRule  # isort: skip

__all__ = ["Rule", "DenseRule", "SGD", "Momentum", "Adam", "Sign", "SignMomentum", "RULES", "state_copies"]

#: the rules by config name (``optim.rule.name``): each class registers itself where it is defined
RULES: dict[str, type[Rule]] = Rule.registry


def state_copies(name: str) -> int:
    """Copies of the trainables a rule keeps as state (Momentum 1, Adam 2, SGD and Sign none)."""
    return len(getattr(RULES[name], "state_names", ()))
