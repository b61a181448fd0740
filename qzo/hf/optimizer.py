"""What the Trainer sees in place of a torch optimizer, and how its lr reaches the qzo rule.

The Trainer keeps what it owns: it builds its lr scheduler (``lr_scheduler_type``,
``warmup_steps``, ``learning_rate``) on :class:`ZOOptimizer`, a torch optimizer whose one
param group holds the lr and whose ``step()`` has nothing left to do (the ZO step needs the
batch, so it runs in ``training_step``). :class:`TrainerLR` is the ``schedule`` of the
``qzo.ZO`` inside: step t's factor is the scheduler's own factor for that step, so the lr
qzo applies (and records in the step log) is the lr the Trainer logs. :func:`build_rule`
turns ``rule="sgd"`` (or ``"momentum"``, ``"adam"``, ``"sign"``) into a rule with the
Trainer's ``learning_rate`` and ``weight_decay`` (Adam also its ``adam_beta1/2`` and
``adam_epsilon``); a rule object keeps its own settings.
"""

from __future__ import annotations

import torch

from ..zo.optim import ZO
from ..zo.rules import RULES, Adam, Rule
from .refuse import UnsupportedOption

__all__ = ["ZOOptimizer", "TrainerLR", "build_rule"]


class ZOOptimizer(torch.optim.Optimizer):
    """The Trainer's optimizer slot: one param group (the trainables, the scheduled lr), no step of its own.

    Args:
        zo: the ``qzo.ZO`` that steps in the trainer's ``training_step``.
        lr: the Trainer's ``learning_rate`` (the scheduler scales it per step).
    """

    def __init__(self, zo: ZO, lr: float):
        super().__init__([t.tensor for t in zo.params], {"lr": lr})
        self.zo = zo

    def step(self, closure=None):
        """Nothing: the ZO step already ran in ``training_step`` (it needs the batch, which a step() never sees)."""
        return

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: no gradient is ever computed."""


class TrainerLR:
    """A ``qzo.ZO`` schedule that follows the Trainer's lr scheduler (duck-typed ``factor(step)``).

    Trainer step ``g`` (0-based, what ``state.global_step`` counts before the step) is qzo step
    ``g + 1``. A ``LambdaLR`` (every ``lr_scheduler_type`` but ``reduce_lr_on_plateau``) sets
    the lr to ``base_lr * lambda(g)``; qzo's lr is ``rule.lr * factor(g + 1)`` with
    ``rule.lr == base_lr``, so returning ``lambda(g)`` gives the same float, bit for bit, and
    is a pure function of the step (a resumed run needs no scheduler state for it). Other
    schedulers are read where they left the lr.

    Args:
        trainer: the trainer whose ``lr_scheduler`` and ``optimizer`` it reads (at each step: the
            Trainer builds its scheduler after the optimizer).
        base_lr: the rule's lr, which the Trainer's ``learning_rate`` is.
    """

    def __init__(self, trainer, base_lr: float):
        self.trainer, self.base_lr = trainer, float(base_lr)

    def factor(self, step: int) -> float:
        scheduler = getattr(self.trainer, "lr_scheduler", None)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas:
            return float(lambdas[0](step - 1))
        group_lr = self.trainer.optimizer.param_groups[0]["lr"]
        return float(group_lr) / self.base_lr

    def __repr__(self) -> str:
        return f"TrainerLR({type(getattr(self.trainer, 'lr_scheduler', None)).__name__})"


def build_rule(rule: Rule | str | None, args) -> Rule:
    """The qzo rule of a trainer: a name built from the Trainer's arguments, or a rule object checked against them.

    Raises:
        UnsupportedOption: an unknown rule name, or a rule object whose lr is not ``args.learning_rate``
            (the Trainer's lr and scheduler drive qzo's lr, so the two cannot disagree).
    """
    lr = float(args.learning_rate)
    if rule is None:
        rule = "sgd"
    if isinstance(rule, str):
        if rule not in RULES:
            raise UnsupportedOption(f"rule {rule!r} is not a qzo rule; pass one of {', '.join(RULES)} or a rule object")
        cls = RULES[rule]
        kwargs = {"weight_decay": float(args.weight_decay)}
        if cls is Adam:
            kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return cls(lr=lr, **kwargs)
    if not isinstance(rule, Rule):
        raise UnsupportedOption(f"rule is a {type(rule).__name__}; pass a name ({', '.join(RULES)}) or a qzo rule object")
    if rule.lr != lr:
        raise UnsupportedOption(f"rule={type(rule).__name__}(lr={rule.lr:g}) but learning_rate={lr:g}: the Trainer's "
                                f"learning_rate and scheduler drive qzo's lr, so set learning_rate={rule.lr:g} in the "
                                f"TrainingArguments (or pass rule={rule.name!r})")
    return rule
