"""End to end on the real demo model (SmolLM2-135M, NF4): `qzo train` for a few steps, then `qzo chat`.

Marked slow (about a minute); CI runs it: it is the one test that goes through the real
entry points, the real GGUF conversion cache and the real chat template.
"""

import json
import subprocess
import sys

import pytest


def _qzo(*args, cwd, timeout=600):
    # cwd outside the repo: what a user's shell has (`python -m` puts cwd first on sys.path)
    return subprocess.run([sys.executable, "-m", "qzo", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


@pytest.mark.slow
def test_demo_trains_a_few_steps_and_chats(tmp_path, smol_folder):
    from importlib.resources import files

    run = tmp_path / "demo"
    # the demo recipe as shipped, but held out on its first 8 chats: the 48 of it, evaluated twice on one
    # thread, were most of the suite's longest test, and what is checked here is the path, not the loss
    held = tmp_path / "held.jsonl"
    held.write_text("".join(files("qzo.data.assets").joinpath("demo_eval.jsonl").read_text().splitlines(True)[:8]))
    result = _qzo("train", "--no-progress", "--set", "train.steps=3", "--set", "train.eval_every=3",
                  "--set", f"data.eval={held}", "--set", f"out_dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out loss before training" in result.stdout and "(8 examples)" in result.stdout
    assert "held-out loss" in result.stdout and "after 3 steps" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["forwards"] == 6 and summary["final_eval_loss"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    chat = _qzo("chat", str(run), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "12", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip()
