"""Strategies: how a ZO step chooses its random direction and estimates the slope along it.

A strategy never touches tensors. It talks to a :class:`Probe`, which perturbs every
trainable by a seed-replayed combination of noise and evaluates the loss, and returns an
:class:`Estimate`: the direction as ``(seed, coefficient)`` terms, the projected gradient
``grad`` along it, and what perturbation is still applied to the trainables. The update
rule (``qzo.zo.rules``) then turns that into a parameter change, fused with undoing the
leftover perturbation in one pass. This split is what lets steered strategies (MeZO-GV,
Greedy, LDSD) plug in beside SPSA without touching the loop or the rules.
"""

from __future__ import annotations

import math
from typing import Callable

from ..types import Component, Estimate, Probe

__all__ = ["Strategy", "weighted_slopes"]


class Strategy(Component):
    """Base class. Subclasses implement :meth:`estimate` and say their cost in forwards."""

    registry: dict[str, type] = {}
    #: the constructor argument that sets how many candidates a step evaluates (and a batched forward
    #: stacks), for the strategies that have a pool; the planner reads it
    pool_arg: str | None = None

    #: loss evaluations per step (what ``opt.forwards`` counts; a batched pool of K counts K).
    forwards_per_step: int = 0
    #: evaluate the pool in one stacked forward (pool strategies; see ``qzo.targets.candidates``).
    batched: bool = False
    #: float32 tensors the size of the trainables the strategy keeps (LDSD's mean, ConMeZO's momentum)
    dense_state_copies: int = 0

    def bind(self, params) -> None:
        """Called once by ``qzo.ZO`` with the trainables (to size dense state such as a mean)."""

    @property
    def mean(self) -> dict | None:
        """Name -> the dense mean added with ``mu_coef`` (``None``: no mean). Data the step hands down to the
        probe and the noise passes, so nothing below the strategy calls back into it."""
        return None

    def after_update(self, params) -> None:
        """Called after the rule updated the trainables (LDSD moves its mean here)."""

    def estimate(self, probe: Probe, draw_seeds: Callable[[int], list[int]]) -> Estimate:
        raise NotImplementedError


def weighted_slopes(seeds: list[int], slopes: list[float], weights: list[float], count: int):
    """``(direction, grad)`` of the estimate ``g_hat = sum_i weights[i] * slopes[i] * z(seeds[i])``.

    ``grad`` is the RMS of the slopes over ``count`` (a magnitude: what clipping and
    normalization act on) and each coefficient is ``weights[i] * slopes[i] / grad``, so
    ``grad * d`` is exactly g_hat. Used by the strategies whose every evaluation enters the
    estimate (FZOO, PerExample).
    """
    grad = math.sqrt(math.fsum(g * g for g in slopes) / count)
    direction = [(s, w * g / grad if grad > 0 else 0.0) for s, w, g in zip(seeds, weights, slopes)]
    return direction, grad
