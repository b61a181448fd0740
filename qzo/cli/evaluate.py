"""``qzo eval RUN``: what training changed, on the run's own held-out set.

* held-out loss (mean cross-entropy per assistant token, as the trainer measures it) and
  perplexity (``exp`` of that loss) BEFORE (the base model, no trained values) and AFTER
  (the run's latest checkpoint);
* greedy replies (:func:`qzo.cli.chat.reply`) to the first N held-out prompts, side by side:
  prompt, reference reply, base reply, tuned reply.

The held-out set is the one the run evaluated on (:func:`qzo.data.dataset.datasets_from_config` on
the run's config): the ``data.eval`` file, or, when that is null, the ``data.eval_fraction``
of the training file that the run held out. Samples are the first held-out examples, in
order: the dataset keeps the chat each row was encoded from (``ChatDataset.chats``); a
sample's prompt is every message before the last assistant turn, its reference that turn
(:func:`qzo.objectives.split_chat`).

"Before" of a LoRA-only run is the same loaded model with its adapters switched off
(peft's ``disable_adapter``: one model in memory); a run that also trained scales or dense
slices changed the base layers themselves, so the base is loaded again from the run's model
config (after the tuned model is released). Since LoRA's B starts at zero, "before" equals
the run's step-0 held-out loss in ``metrics.jsonl``.

The result is printed as a table and written to ``RUN/eval.json`` (atomically).
"""

from __future__ import annotations

import gc
import json
import math
import textwrap
from pathlib import Path

import torch

from ..data.dataset import datasets_from_config, eval_loss
from ..data.objectives import last_user_text, split_chat
from ..errors import QzoError
from ..runs.checkpoint import atomic_write_text, find_checkpoint

__all__ = ["evaluate_run", "perplexity", "format_report"]


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _measure(model, tok, held, batch_size: int, prompts: list[list[dict]], max_new_tokens: int):
    from .chat import reply

    loss = eval_loss(model, held, batch_size, tok.pad_token_id)
    replies = [reply(model, tok, messages, max_new_tokens) for messages in prompts]
    return loss, replies


def evaluate_run(run_dir, samples: int = 4, max_new_tokens: int = 64, log=print, checkpoint: str = "last") -> dict:
    """Held-out loss/perplexity and greedy sample replies, base model vs a checkpoint of the run.

    ``checkpoint``: ``last`` (default), ``best`` or ``step-N`` (:func:`qzo.runs.checkpoint.find_checkpoint`).

    Returns the dict also written to ``RUN/eval.json``: ``before`` / ``after`` (``loss``,
    ``perplexity``), ``samples`` (``messages``, ``prompt``, ``reference``, ``base``,
    ``tuned``), and the checkpoint, step, forwards and held-out size. ``log`` receives
    progress lines and the final table. Raises :class:`QzoError` for a folder that is not a
    run or a run without a checkpoint.
    """
    from ..config.build import load_model_and_targets
    from ..runs.reader import load_run_config, load_run_model

    if samples < 0:
        raise QzoError(f"--samples must be >= 0, got {samples}")
    if max_new_tokens < 1:
        raise QzoError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)  # QzoError when it is not a run directory
    ckpt = find_checkpoint(run_dir, checkpoint, log)
    meta = json.loads((ckpt / "meta.json").read_text())
    log(f"qzo: loading {cfg['model']['source']} ({cfg['model']['quant']}) with {ckpt.name}")
    model, tok, params, cfg = load_run_model(run_dir, ckpt)
    _, held = datasets_from_config(cfg, tok)
    chats = held.chats[:samples]  # never None: the held-out set is read from chats and never packed
    prompts = [split_chat(c)[0] for c in chats]
    bs = cfg["train"]["eval_batch_size"]

    log(f"qzo: tuned model: held-out loss on {len(held)} examples, {len(prompts)} replies")
    after, tuned = _measure(model, tok, held, bs, prompts, max_new_tokens)
    t = cfg["targets"]
    lora_only = bool(t["lora"]) and not t["scales"] and not t["dense"] and not t["norms"]
    if lora_only:
        log("qzo: base model (adapters disabled): held-out loss and replies")
        with params.peft_model.disable_adapter():
            before, base = _measure(model, tok, held, bs, prompts, max_new_tokens)
    else:
        del model, params
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log("qzo: base model (loaded again: the run trained its scales or dense slices): held-out loss and replies")
        model, _, _, _ = load_model_and_targets(cfg, build=False)
        before, base = _measure(model, tok, held, bs, prompts, max_new_tokens)

    result = {
        "run": str(run_dir),
        "checkpoint": ckpt.name,
        "step": meta.get("step"),
        "forwards": meta.get("forwards"),
        "held_out": {"source": cfg["data"]["eval"] or f"{cfg['data']['train']} (eval_fraction "
                                                     f"{cfg['data']['eval_fraction']})",
                     "examples": len(held)},
        "before": {"loss": before, "perplexity": perplexity(before)},
        "after": {"loss": after, "perplexity": perplexity(after)},
        "max_new_tokens": max_new_tokens,
        "samples": [
            {"messages": messages, "prompt": last_user_text(messages), "reference": split_chat(chat)[1],
             "base": b, "tuned": tu}
            for chat, messages, b, tu in zip(chats, prompts, base, tuned)
        ],
    }
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    log(format_report(result))
    log(f"qzo: written to {run_dir / 'eval.json'}")
    return result


def _block(label: str, text: str, width: int = 100) -> list[str]:
    pad = " " * 13
    lines = []
    for para in (text or "(empty)").splitlines() or [""]:
        lines.extend(textwrap.wrap(para, width - len(pad)) or [""])
    return [f"  {label:<10} {lines[0]}"] + [pad + line for line in lines[1:]]


def format_report(result: dict) -> str:
    """The readable table ``qzo eval`` prints for an :func:`evaluate_run` result."""
    b, a = result["before"], result["after"]
    held = result["held_out"]
    rows = [
        f"qzo eval {result['run']}: {result['checkpoint']} (step {result['step']}, {result['forwards']} forwards)",
        f"held-out: {held['examples']} examples from {held['source']}",
        "",
        f"  {'':<16}{'loss':>10}{'perplexity':>14}",
        f"  {'before (base)':<16}{b['loss']:>10.4f}{b['perplexity']:>14.3f}",
        f"  {'after (tuned)':<16}{a['loss']:>10.4f}{a['perplexity']:>14.3f}",
    ]
    if math.isfinite(b["perplexity"]) and b["perplexity"] > 0:
        change = (a["perplexity"] / b["perplexity"] - 1) * 100
        rows.append(f"  {'change':<16}{a['loss'] - b['loss']:>+10.4f}{change:>+13.1f}%")
    for i, s in enumerate(result["samples"], 1):
        rows += ["", f"sample {i}/{len(result['samples'])} (greedy, at most {result['max_new_tokens']} new tokens)"]
        rows += _block("prompt", s["prompt"]) + _block("reference", s["reference"])
        rows += _block("base", s["base"]) + _block("tuned", s["tuned"])
    return "\n".join(rows)
