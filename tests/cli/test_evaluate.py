"""``qzo eval``: base vs tuned held-out loss and sample replies of a tiny run."""

import json
import math

import pytest

from qzo.cli.main import main
from qzo.errors import QzoError
from qzo.cli.evaluate import evaluate_run
from qzo.train.loop import train

from helpers import SHORT_RUN, numbered_code_chats, run_overrides


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _sets(model_dir, data, out_dir, **extra):
    return run_overrides(model_dir, data, out_dir, **{**SHORT_RUN, **extra})


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def lora_run(tiny_lora_run):
    return tiny_lora_run  # the suite's shared run (conftest)


def test_eval_compares_base_and_tuned_on_the_held_out_set(lora_run):
    lines = []
    result = evaluate_run(lora_run, samples=2, max_new_tokens=6, log=lines.append)
    assert json.loads((lora_run / "eval.json").read_text()) == result
    metrics = _metrics(lora_run)
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    # before: the adapters switched off = the run's step-0 model (LoRA's B starts at zero)
    assert result["before"]["loss"] == pytest.approx(evals[0], abs=1e-5)
    assert result["after"]["loss"] == pytest.approx(evals[-1], abs=1e-5)  # the last step evaluated too
    assert result["after"]["loss"] < result["before"]["loss"]
    for side in ("before", "after"):
        assert result[side]["perplexity"] == pytest.approx(math.exp(result[side]["loss"]), rel=1e-12)
    assert (result["checkpoint"], result["step"], result["forwards"]) == ("step-000004", 4, 8)
    assert result["held_out"]["examples"] == 8
    samples = result["samples"]
    assert [s["prompt"] for s in samples] == ["Say the code 0.", "Say the code 1."]
    assert [s["reference"] for s in samples] == ["CODE 0 CODE", "CODE 1 CODE"]
    assert samples[0]["messages"] == [{"role": "user", "content": "Say the code 0."}]
    assert all(isinstance(s["base"], str) and isinstance(s["tuned"], str) for s in samples)
    assert any(s["base"] != s["tuned"] for s in samples)  # the adapters change greedy replies
    table = "\n".join(lines)
    assert "before (base)" in table and "after (tuned)" in table and "reference  CODE 1 CODE" in table


def test_held_out_samples_of_a_split_are_the_examples_the_run_held_out(tiny_tokenizer, tmp_path):
    from qzo.config.schema import load_config
    from qzo.data.dataset import datasets_from_config, encode_chat

    long = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "dropped"}]}
    data = _write(tmp_path / "chats.jsonl", [long] + numbered_code_chats(11)[:5] + [long] + numbered_code_chats(11)[5:])
    cfg = load_config(None, ["data.train=" + str(data), "data.eval=null", "data.eval_fraction=0.3",
                             "train.max_len=64", "train.seed=3"])
    train_ds, held = datasets_from_config(cfg, tiny_tokenizer)
    assert train_ds.dropped == 2 and len(held) == 3
    chats = held.chats  # what qzo eval samples from: the chat each held-out row was encoded from
    assert len(chats) == len(held) and long["messages"] not in chats  # dropped: no assistant token left
    assert [encode_chat(tiny_tokenizer, c, 64)[0] for c in chats] == held.input_ids
    train_texts = {tuple(ids) for ids in train_ds.input_ids}
    assert not any(tuple(ids) in train_texts for ids in held.input_ids)


def test_eval_of_a_scales_run_loads_the_base_again(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "chats.jsonl", numbered_code_chats())
    run = tmp_path / "run"
    train(None, _sets(tiny_model_dir, data, run, **{"targets.lora": "false", "targets.scales": "all",
                                                    "optim.lr": 1e-3}), log=lambda *_: None, progress=False)
    lines = []
    result = evaluate_run(run, samples=1, max_new_tokens=4, log=lines.append)
    evals = [m["eval_loss"] for m in _metrics(run) if m.get("eval_loss") is not None]
    assert any("loaded again" in line for line in lines)
    assert result["before"]["loss"] == pytest.approx(evals[0], abs=1e-5)
    assert result["after"]["loss"] == pytest.approx(evals[-1], abs=1e-5)
    assert len(result["samples"]) == 1


def test_cli_eval_prints_the_table(lora_run, capsys):
    assert main(["eval", str(lora_run), "--samples", "1", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "before (base)" in out and "sample 1/1" in out and "eval.json" in out
    assert len(json.loads((lora_run / "eval.json").read_text())["samples"]) == 1


def test_cli_eval_errors_are_one_line(lora_run, tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "not a qzo run directory" in err[-1]

    fresh = tmp_path / "fresh"  # a run directory before its first checkpoint
    fresh.mkdir()
    (fresh / "config.yaml").write_text((lora_run / "config.yaml").read_text())
    (fresh / "steps.jsonl").touch()
    assert main(["eval", str(fresh)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "has no checkpoint" in err[-1]

    with pytest.raises(QzoError, match="--samples"):
        evaluate_run(lora_run, samples=-1)
