"""Strategies: how a ZO step draws its direction and estimates the slope along it.

``base`` holds the interface (:class:`Strategy`, :class:`Estimate`, :class:`Probe`); one
strategy per module.
"""

from .base import Component, Estimate, Probe, Strategy
from .conmezo import ConMeZO
from .fzoo import FZOO
from .ldsd import LDSD
from .per_example import PerExample
from .pool import GV, Greedy
from .spsa import SPSA

__all__ = ["Component", "Estimate", "Probe", "Strategy", "SPSA", "GV", "Greedy", "LDSD", "FZOO", "ConMeZO",
           "PerExample", "STRATEGIES"]

#: config / CLI name -> strategy class (the one table the config, the CLI and the planner read)
STRATEGIES = {"spsa": SPSA, "gv": GV, "greedy": Greedy, "ldsd": LDSD, "fzoo": FZOO, "conmezo": ConMeZO,
              "per_example": PerExample}
