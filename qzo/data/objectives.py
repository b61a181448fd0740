"""Objectives besides cross-entropy: train on a reward computed from generated text.

Zeroth-order steps only need a number per evaluation, so the objective does not have to be
differentiable: generate replies, score them with any function, and hand ``-mean(reward)``
to ``opt.step`` as the loss. That covers what first-order tuning cannot use directly:
exact-match or F1 against a reference, "the reply parses as JSON", "at most N words", a
unit test that passes or fails, a call to an external checker.

A reward function has the signature::

    fn(prompts: list[str], completions: list[str], references: list[str]) -> list[float]

one float per completion, higher is better, all finite. ``prompts[i]`` is the content of
the last user message of chat ``i`` (``""`` when the chat has none before its reply),
``completions[i]`` the generated reply (special tokens dropped, surrounding whitespace
stripped) and ``references[i]`` the chat's last assistant turn, the reply the data holds.
A reward may ignore any of them. Returning another length, a non-number or a NaN/inf is a
:class:`qzo.QzoError` that names the reward.

Built in: :func:`exact_match` and :func:`token_f1`; :func:`load_reward` resolves those
names or ``"module:function"`` (``"path/to/file.py:function"`` also works), which is what
the config key ``objective.reward`` holds.

TRL's reward functions work too: a function with TRL's signature, ``fn(completions,
**kwargs) -> list[float]`` (it takes ``**kwargs`` and a ``completions`` parameter, and no
``references`` one), is called through :class:`TRLReward`, which passes what TRL's
``GRPOTrainer`` passes for a conversational dataset (qzo's data are chats): ``prompts`` (each
chat's prompt messages), ``completions`` (each reply as ``[{"role": "assistant", "content":
text}]``), ``completion_ids`` and the reference reply as ``solution`` (the column TRL's own
``accuracy_reward`` reads) and ``references``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import QzoError
from ..noise import contract as noise
from .dataset import model_input_device

__all__ = ["RewardFn", "exact_match", "token_f1", "load_reward", "check_rewards", "split_chat", "last_user_text",
           "RewardLoss", "TRLReward", "is_trl_reward",
           "BUILTIN_REWARDS"]

RewardFn = Callable[[list, list, list], Sequence[float]]


def _normalize(text: str) -> str:
    """Lowercase, strip, and collapse runs of whitespace into one space."""
    return " ".join(str(text).lower().split())


def exact_match(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """1.0 where the completion equals the reference after normalization, else 0.0.

    Normalization: lowercase, strip, collapse whitespace (``" Paris\\n"`` matches ``"paris"``;
    punctuation still counts: ``"Paris."`` does not).
    """
    _same_length(completions, references)
    return [float(_normalize(c) == _normalize(r)) for c, r in zip(completions, references)]


def token_f1(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """SQuAD-style token F1 between completion and reference, in [0, 1].

    Tokens are the whitespace-separated words of the normalized texts (as in
    :func:`exact_match`); precision and recall count shared tokens as multisets. Two empty
    texts score 1.0, one empty text 0.0. Unlike the official SQuAD script, punctuation and
    articles are kept (they may be what the reward is about).
    """
    _same_length(completions, references)
    scores = []
    for c, r in zip(completions, references):
        pred, gold = _normalize(c).split(), _normalize(r).split()
        if not pred or not gold:
            scores.append(float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / len(pred), common / len(gold)
        scores.append(2 * precision * recall / (precision + recall))
    return scores


def _same_length(completions, references) -> None:
    if len(completions) != len(references):
        raise QzoError(f"got {len(completions)} completions but {len(references)} references")


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "token_f1": token_f1}


def _load_file_module(path: Path, spec: str):
    if not path.is_file():
        raise QzoError(f"reward {spec!r}: the file {str(path)!r} does not exist")
    name = f"qzo_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise QzoError(f"reward {spec!r}: running {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import(module_name: str, spec: str):
    """Import ``module_name``, also from the working directory (where ``qzo train`` users keep their rewards)."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)  # last: never shadows an installed module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise QzoError(f"reward {spec!r}: no module named {exc.name!r} (put it on PYTHONPATH or in the "
                           "directory you run from, or give path/to/file.py:function)") from None
        raise QzoError(f"reward {spec!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise QzoError(f"reward {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def is_trl_reward(fn) -> bool:
    """Whether ``fn`` has TRL's reward signature: ``**kwargs``, a ``completions`` parameter, no ``references`` one.

    TRL calls rewards with keyword arguments only and requires ``**kwargs`` (it passes every
    dataset column); a qzo reward is called positionally as ``(prompts, completions,
    references)``, so a function naming ``references`` keeps qzo's call.
    """
    if isinstance(fn, TRLReward):
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: qzo's positional call
        return False
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return takes_kwargs and "completions" in params and "references" not in params


class TRLReward:
    """A reward with TRL's signature, ``fn(completions, **kwargs) -> list[float]``, as a qzo reward.

    :meth:`score` calls ``fn`` with the keyword arguments TRL's ``GRPOTrainer`` gives a
    conversational dataset::

        prompts          each chat's prompt: its messages before the last assistant turn
        completions      each reply as one message, [{"role": "assistant", "content": text}]
        completion_ids   each reply's generated token ids (trailing padding dropped), when known
        solution         the chat's reference reply (its last assistant turn), under the name of the
                         dataset column TRL's accuracy_reward reads; also as ``references``

    Called with qzo's signature ``(prompts, completions, references)`` (prompt strings), each
    prompt becomes one user message. :class:`RewardLoss` calls :meth:`score` with the full
    prompt chats.
    """

    def __init__(self, fn):
        if not callable(fn):
            raise QzoError(f"TRLReward needs a function, got {type(fn).__name__}")
        self.fn = fn
        functools.update_wrapper(self, fn)  # errors name the user's function

    def score(self, prompt_chats: list[list[dict]], completions: list[str], references: list[str],
              completion_ids: list[list[int]] | None = None) -> list[float]:
        """``fn``'s rewards for these replies, checked (:func:`check_rewards`)."""
        values = self.fn(prompts=[[dict(m) for m in chat] for chat in prompt_chats],
                         completions=[[{"role": "assistant", "content": c}] for c in completions],
                         completion_ids=completion_ids, solution=list(references), references=list(references))
        return check_rewards(values, len(completions), self.fn)

    def __call__(self, prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
        return self.score([[{"role": "user", "content": p}] for p in prompts], completions, references)


def _adapt(fn) -> RewardFn:
    """``fn`` as qzo calls rewards: TRL-style functions through :class:`TRLReward`."""
    return TRLReward(fn) if is_trl_reward(fn) else fn


def load_reward(spec) -> RewardFn:
    """The reward function ``spec`` names.

    ``spec`` is ``"exact_match"``, ``"token_f1"``, ``"module:function"`` (imported with
    :mod:`importlib`, e.g. ``"my_rewards:short"``; from ``PYTHONPATH``, installed packages or
    the working directory) or ``"path/to/file.py:function"``. A callable
    is returned as it is, or wrapped in :class:`TRLReward` when it has TRL's signature
    (:func:`is_trl_reward`). Raises :class:`qzo.QzoError` when the module or attribute is
    missing or the attribute is not callable.
    """
    if callable(spec):
        return _adapt(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise QzoError(f"reward must be a function or a name ({', '.join(BUILTIN_REWARDS)} or module:function), "
                       f"got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise QzoError(f"unknown reward {spec!r}; choose {' or '.join(BUILTIN_REWARDS)}, or give "
                       "'module:function' (e.g. my_rewards:short_reply)")
    module_name, attr = spec.rsplit(":", 1)
    if not module_name or not attr:
        raise QzoError(f"reward {spec!r}: expected 'module:function' with both parts non-empty")
    if module_name.endswith(".py"):
        module = _load_file_module(Path(module_name).expanduser(), spec)
    else:
        module = _import(module_name, spec)
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise QzoError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}"
                       + (f"; its functions: {', '.join(public)}" if public else ""))
    fn = getattr(module, attr)
    if not callable(fn):
        raise QzoError(f"reward {spec!r}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    return _adapt(fn)


def _reward_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def check_rewards(values, n: int, fn=None) -> list[float]:
    """``values`` as ``n`` finite floats, or a :class:`qzo.QzoError` naming the reward ``fn``."""
    name = f"reward {_reward_name(fn)!r}" if fn is not None else "the reward"
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().reshape(-1).tolist()
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise QzoError(f"{name} must return a list of {n} numbers (one per completion), got {values!r:.200}") from None
    if len(out) != n:
        raise QzoError(f"{name} returned {len(out)} values for {n} completions; it must return one per completion")
    bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
    if bad:
        raise QzoError(f"{name} returned non-finite values ({', '.join(str(out[i]) for i in bad[:4])}) for "
                       f"completion(s) {', '.join(map(str, bad[:4]))}; rewards must be finite numbers")
    return out


def split_chat(chat: list[dict]) -> tuple[list[dict], str]:
    """``(prompt messages, reference)``: the messages before the last assistant turn, and that turn's text."""
    last = max((i for i, m in enumerate(chat) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise QzoError("a chat without an assistant turn has no reference reply to generate against")
    return [dict(m) for m in chat[:last]], chat[last]["content"]


def last_user_text(messages: list[dict]) -> str:
    """The content of the last user message (``""`` when there is none): what a reader judges a reply against."""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


class RewardLoss:
    """``opt.step`` closure: generate replies to a batch of chats, return ``-mean(reward)``.

    Args:
        model, tok: the (quantized, adapted) causal LM and its tokenizer (with a chat template).
        chats: the batch, each a list of ``{"role", "content"}`` messages. The prompt is every
            message before the last assistant turn (rendered with the chat template and the
            generation prompt), the reference that turn's text.
        reward_fn: a reward (see the module docstring) or a name :func:`load_reward` resolves.
        max_new_tokens: longest reply generated.
        temperature: 0 decodes greedily; above 0 samples from ``softmax(logits / temperature)``
            (plain temperature sampling: no top-k / top-p, whatever the model's generation
            config says).
        seed, step: sampling is seeded from ``(seed, step)``; :meth:`set_step` moves to
            another step (the trainer builds one closure per step with ``step=``).

    Calling it returns ``-mean(reward)`` as a float32 scalar tensor; ``last_completions``
    and ``last_rewards`` keep what the latest call generated and scored, ``last_token_ids``
    the generated ids (``[batch, new tokens]``, padded after a row's end of turn).

    Why the sampling seed depends on the step only (common random numbers): a ZO step
    estimates a slope from the difference ``f(theta + eps z) - f(theta - eps z)`` of two
    evaluations. With sampling, each evaluation is noisy; if the two used independent random
    draws, the difference would be dominated by sampling noise (of order the reward's
    spread) rather than by the effect of the perturbation (of order ``eps``), and the
    gradient estimate would be mostly noise. Seeding both evaluations of a step identically
    makes them draw the same random numbers at every position, so a reply changes only where
    the perturbation moved the token probabilities across a draw: the sampling noise cancels
    in the difference. A new step gets new draws, so over steps the objective is still the expected
    reward. Greedy decoding (``temperature == 0``) is deterministic and needs no seed.

    The global torch RNG is left as it was (sampling runs inside ``torch.random.fork_rng``).
    Prompts are left-padded by hand (the tokenizer's ``padding_side`` is not touched), so
    every reply starts right after its prompt and a batched greedy reply is the one generated
    for its prompt alone (up to float rounding; tested equal on a float32 model).
    """

    def __init__(self, model, tok, chats: list[list[dict]], reward_fn, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0, step: int = 0):
        if not chats:
            raise QzoError("RewardLoss needs at least one chat")
        if max_new_tokens < 1:
            raise QzoError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature >= 0:
            raise QzoError(f"temperature must be >= 0, got {temperature}")
        self.model, self.tok = model, tok
        self.reward_fn = load_reward(reward_fn)
        self.prompt_chats, self.references = zip(*(split_chat(c) for c in chats))
        self.prompt_chats, self.references = list(self.prompt_chats), list(self.references)
        self.prompts = [last_user_text(m) for m in self.prompt_chats]
        self.max_new_tokens, self.temperature = int(max_new_tokens), float(temperature)
        self.seed, self.step = int(seed), int(step)
        self.last_completions: list[str] = []
        self.last_rewards: list[float] = []
        self.last_token_ids: torch.Tensor | None = None
        self._inputs = None

    def set_step(self, step: int) -> "RewardLoss":
        """Sample with the random numbers of ``step`` from now on (returns self)."""
        self.step = int(step)
        return self

    def sampling_seed(self) -> int:
        """The torch seed of the current step's sampling: a function of ``(seed, step)`` only."""
        return noise.sampling_seed(self.seed, self.step)

    def _encode(self) -> dict[str, torch.Tensor]:
        if self._inputs is None:
            tok = self.tok
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if pad_id is None:
                raise QzoError("the tokenizer has neither a pad nor an eos token; set tok.pad_token")
            rows = []
            for messages in self.prompt_chats:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                rows.append(tok(text, add_special_tokens=False)["input_ids"])
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):  # left padding: every prompt ends in the last column
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
            self._inputs = {"input_ids": ids, "attention_mask": mask, "pad_token_id": pad_id}
        return self._inputs

    @torch.no_grad()
    def generate(self) -> list[str]:
        """Replies to the batch's prompts with the current weights (and this step's random numbers)."""
        enc = self._encode()
        device = model_input_device(self.model)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                      pad_token_id=enc["pad_token_id"])
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.sampling_seed())
                out = self.model.generate(**kwargs)
        else:
            kwargs.update(do_sample=False)
            out = self.model.generate(**kwargs)
        new = out[:, ids.shape[1]:]
        self.last_token_ids = new.cpu()
        return [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]

    def rewards(self, completions: list[str]) -> list[float]:
        if isinstance(self.reward_fn, TRLReward):  # TRL's call: the prompt chats and the generated ids
            return self.reward_fn.score(self.prompt_chats, list(completions), self.references,
                                        self._completion_ids(len(completions)))
        values = self.reward_fn(list(self.prompts), list(completions), list(self.references))
        return check_rewards(values, len(completions), self.reward_fn)

    def _completion_ids(self, n: int) -> list[list[int]] | None:
        """The latest generated ids per reply, trailing padding dropped (``None`` if they are not these replies')."""
        if self.last_token_ids is None or len(self.last_token_ids) != n:
            return None
        pad = self._encode()["pad_token_id"]
        out = []
        for row in self.last_token_ids.tolist():
            while row and row[-1] == pad:
                row.pop()
            out.append(row)
        return out

    def __call__(self) -> torch.Tensor:
        completions = self.generate()
        rewards = self.rewards(completions)
        self.last_completions, self.last_rewards = completions, rewards
        return torch.tensor(-sum(rewards) / len(rewards), dtype=torch.float32)

    def __repr__(self) -> str:
        return (f"RewardLoss({len(self.prompts)} prompts, reward={_reward_name(self.reward_fn)}, "
                f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature}, step={self.step})")
