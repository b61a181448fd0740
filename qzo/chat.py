"""``qzo chat``: talk to a base model or a trained run, streaming tokens as they are generated."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

from .data import model_input_device
from .load import load

__all__ = ["load_for_chat", "reply", "chat_loop"]


def load_for_chat(source: str, checkpoint: str = "last"):
    """``(model, tokenizer)`` for a run directory (base + a checkpoint's values) or any model source."""
    from .trainer import is_run_dir, load_run_model

    if is_run_dir(Path(source)):
        model, tok, _, _ = load_run_model(Path(source), checkpoint)
        return model, tok
    return load(source)


def reply(model, tok, messages: list[dict], max_new_tokens: int = 128, stream=None, temperature: float = 0.0) -> str:
    """Generate the assistant's next turn; tokens are written to ``stream`` as they come."""
    from transformers import TextIteratorStreamer

    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    device = model_input_device(model)
    enc = {k: v.to(device) for k, v in enc.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sample = temperature > 0
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, streamer=streamer, do_sample=sample,
                  pad_token_id=tok.pad_token_id)
    if sample:
        kwargs["temperature"] = temperature
    worker = threading.Thread(target=lambda: _generate(model, kwargs))
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    worker.join()
    return "".join(pieces).strip()


@torch.no_grad()
def _generate(model, kwargs) -> None:
    model.generate(**kwargs)


def chat_loop(model, tok, max_new_tokens: int = 128, system: str | None = None) -> None:
    """Interactive chat on stdin/stdout; an empty line or Ctrl-D ends it."""
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
        answer = reply(model, tok, messages, max_new_tokens, stream=sys.stdout)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})
