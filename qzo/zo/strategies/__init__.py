"""Strategies: how a ZO step draws its direction and estimates the slope along it.

``base`` holds :class:`Strategy` (the probe and the estimate it talks in are ``qzo.zo.types``);
one strategy per module.
"""

from .base import Strategy

# in the order configs, the CLI and errors list them (each class registers itself on import)
from .spsa import SPSA  # isort: skip
from .pool import GV, Greedy  # isort: skip
from .ldsd import LDSD  # isort: skip
from .fzoo import FZOO  # isort: skip
from .conmezo import ConMeZO  # isort: skip
from .per_example import PerExample  # isort: skip

__all__ = ["Strategy", "SPSA", "GV", "Greedy", "LDSD", "FZOO", "ConMeZO",
           "PerExample", "STRATEGIES"]

#: config / CLI name -> strategy class: each class registers itself where it is defined (its ``name``)
STRATEGIES = Strategy.registry
