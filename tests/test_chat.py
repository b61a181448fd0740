"""qzo chat: streamed pieces add up to the reply; a run directory loads base + adapter."""

import io

import qzo
from qzo.chat import chat_loop, reply


def test_reply_streams_and_returns_the_text(tiny_model_dir):
    model, tok = qzo.load(tiny_model_dir, quant="nf4")
    stream = io.StringIO()
    text = reply(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=6, stream=stream)
    assert stream.getvalue().strip() == text
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 6 + 1


def test_chat_loop_reads_turns_until_empty_line(tiny_model_dir, monkeypatch, capsys):
    model, tok = qzo.load(tiny_model_dir, quant="nf4")
    answers = iter(["hello", "again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    chat_loop(model, tok, max_new_tokens=3)
    out = capsys.readouterr().out
    assert out.count("model> ") == 2
