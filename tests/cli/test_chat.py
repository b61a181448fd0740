"""qzo chat: streamed pieces add up to the reply; a run directory loads base + adapter."""

import io

import qzo
from qzo.cli.chat import chat_loop, reply


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


def _greedy_text(model, tok, messages, n):
    import torch

    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_temperature_zero_is_greedy_and_a_seeded_sample_repeats(tiny_model_dir):
    import torch

    model, tok = qzo.load(tiny_model_dir, quant="none")
    messages = [{"role": "user", "content": "hi"}]
    assert reply(model, tok, messages, max_new_tokens=6, temperature=0.0) == _greedy_text(model, tok, messages, 6)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = reply(model, tok, messages, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left as it was
    assert reply(model, tok, messages, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7) == a
    assert reply(model, tok, messages, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8) != a
    assert a != _greedy_text(model, tok, messages, 8)  # a random model's sample is not its greedy reply


def test_sampling_settings_and_checkpoint_errors(tiny_model_dir, capsys):
    import pytest

    from qzo.cli.chat import load_for_chat, sampling_kwargs
    from qzo.cli.main import main
    from qzo.errors import QzoError

    assert sampling_kwargs() == {"do_sample": False}
    assert sampling_kwargs(0.7, 0.9) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    with pytest.raises(QzoError, match="top-p must be in"):
        sampling_kwargs(1.0, 0.0)
    with pytest.raises(QzoError, match="temperature must be >= 0"):
        sampling_kwargs(-0.5)
    assert main(["chat", str(tiny_model_dir), "--prompt", "hi", "--top-p", "1.5"]) == 2  # before the model loads
    assert "top-p must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(QzoError, match="--checkpoint best picks a checkpoint of a run directory"):
        load_for_chat(str(tiny_model_dir), "best")


def test_cli_chat_samples_reproducibly_with_a_seed(tiny_model_dir, capsys):
    from qzo.cli.main import main

    args = ["chat", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-p", "0.95", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_chat_loop_seeds_each_turn(tiny_model_dir, monkeypatch, capsys):
    model, tok = qzo.load(tiny_model_dir, quant="none")

    def session():
        answers = iter(["hello", "again", ""])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
        chat_loop(model, tok, max_new_tokens=4, temperature=1.0, seed=11)
        return capsys.readouterr().out

    assert session() == session()
