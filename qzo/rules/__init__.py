"""Update rules: SGD (fused, state-free), Momentum, Adam (ZO-Adam), Sign. Any works with any strategy."""

from .base import Rule
from .dense import Adam, DenseRule, Momentum, Sign
from .sgd import SGD

__all__ = ["Rule", "DenseRule", "SGD", "Momentum", "Adam", "Sign"]
