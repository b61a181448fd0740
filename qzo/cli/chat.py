"""``qzo chat``: talk to a base model or a trained run, streaming tokens as they are generated.

Decoding is greedy by default (``temperature`` 0: the same reply every time). With
``temperature > 0`` it samples from ``softmax(logits / temperature)``, cut to the smallest set
of tokens holding ``top_p`` of the probability (nucleus sampling; ``top_p`` 1: no cut); no
top-k cut, whatever the model's generation config says, so the two knobs mean what they
say. ``seed`` makes a sample reproducible: the reply is drawn with torch seeded to it (the
global RNG is left as it was), and turn ``t`` of a chat (from 0) uses ``seed + t``.

The reply is generated in a worker thread while this one prints the streamed pieces: the
settings are checked before it starts, and an error in it ends the stream and is raised here
(a streamer nobody ends would keep this thread waiting forever). The prompt is rendered by
:func:`qzo.data.templates.render`, which bounds a chat template's time.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

from ..data.dataset import model_input_device
from ..errors import QzoError
from ..models.load import load

__all__ = ["load_for_chat", "reply", "chat_loop", "sampling_kwargs", "check_settings"]


def load_for_chat(source: str, checkpoint: str | None = None):
    """``(model, tokenizer)`` for a run directory (base + a checkpoint's values, default ``last``) or any model
    source (which has no checkpoints: naming one is an error)."""
    from ..runs.reader import is_run_dir, load_run_model

    if is_run_dir(Path(source)):
        model, tok, _, _ = load_run_model(Path(source), checkpoint or "last")
        return model, tok
    if checkpoint is not None:
        raise QzoError(f"--checkpoint {checkpoint} picks a checkpoint of a run directory, and {source!r} is a model "
                       "source, not a run; pass the run directory written by qzo train, or drop --checkpoint")
    return load(source)


def check_settings(max_new_tokens, seed=None) -> None:
    """Refuse (:class:`QzoError`, naming the flag) a ``--max-new-tokens`` below 1 or a ``--seed`` torch cannot take,
    before a reply's generation thread starts."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise QzoError(f"--max-new-tokens must be a whole number >= 1 (the longest reply, in tokens), got "
                       f"{max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        shown = f"a {seed.bit_length()}-bit number" if isinstance(seed, int) else repr(seed)[:40]
        raise QzoError(f"--seed must be a whole number in [-2**63, 2**64) (torch's seed range), got {shown}")


def sampling_kwargs(temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """``generate`` settings: greedy at ``temperature`` 0, else temperature + nucleus sampling (no top-k)."""
    if not temperature >= 0:
        raise QzoError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise QzoError(f"top-p must be in (0, 1] (1: no nucleus cut), got {top_p}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}


def reply(model, tok, messages: list[dict], max_new_tokens: int = 128, stream=None, temperature: float = 0.0,
          top_p: float = 1.0, seed: int | None = None) -> str:
    """Generate the assistant's next turn; tokens are written to ``stream`` as they come.

    Args:
        temperature: 0 decodes greedily; above 0 samples (see the module docstring).
        top_p: nucleus sampling's probability mass (1: off); only with ``temperature > 0``.
        seed: seed of the sample (``None``: torch's current random state).
    """
    from transformers import TextIteratorStreamer

    from ..data.templates import render

    check_settings(max_new_tokens, seed)  # before the worker starts: the errors it can see coming
    sampling = sampling_kwargs(temperature, top_p)
    text = render(tok, messages, True, where="qzo chat")  # the template's time is bounded there
    enc = tok(text, add_special_tokens=False, return_tensors="pt")  # what apply_chat_template(tokenize=True) does
    device = model_input_device(model)
    enc = {k: v.to(device) for k, v in enc.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id, **sampling)
    failed: list[BaseException] = []

    def work() -> None:
        try:
            _generate(model, kwargs, seed, device)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread, below
            failed.append(exc)
            streamer.end()  # the caller's loop over the streamer ends instead of waiting forever

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    worker.join()
    if failed:
        raise failed[0]
    return "".join(pieces).strip()


@torch.no_grad()
def _generate(model, kwargs, seed: int | None = None, device=None) -> None:
    if seed is None:
        model.generate(**kwargs)
        return
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model.generate(**kwargs)


def chat_loop(model, tok, max_new_tokens: int = 128, system: str | None = None, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None) -> None:
    """Interactive chat on stdin/stdout; an empty line or Ctrl-D ends it. Turn ``t`` samples with ``seed + t``."""
    messages = [{"role": "system", "content": system}] if system else []
    print("qzo chat: type a message (empty line or Ctrl-D to quit)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if not text:
            return
        messages.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        turn_seed = None if seed is None else seed + sum(m["role"] == "assistant" for m in messages)
        answer = reply(model, tok, messages, max_new_tokens, stream=sys.stdout, temperature=temperature, top_p=top_p,
                       seed=turn_seed)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})
