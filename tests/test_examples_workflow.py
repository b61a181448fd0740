"""The workflow examples (resume, offload, exported adapter) run in their CPU form, as a user runs them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_TOKENIZER, run_overrides, write_code_chats

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args, cwd):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd)




def test_resume_example_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """The example's stop / resume / compare on the tiny model (resuming is not about the demo model;
    ``test_cli_e2e`` trains the demo recipe itself)."""
    data = write_code_chats(tmp_path)
    overrides = run_overrides(tiny_model_dir, data, tmp_path / "unused")
    sets = [arg for o in overrides if not o.startswith(("train.", "out_dir")) for arg in ("--set", o)]
    out = _run("resume_run.py", "--steps", "4", "--out", str(tmp_path / "runs"), *sets, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step logs identical: True; trained values identical: True" in out.stdout


def test_offload_example_gives_identical_losses_on_cpu(tmp_path):
    """The CPU form's tiny Llama with the tests' tiny tokenizer (the demo's is not what offloading is about)."""
    out = _run("offload_7b.py", "--steps", "2", "--tokenizer", str(TINY_TOKENIZER), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"model.layers.2": "disk"' in out.stdout and "identical: True" in out.stdout


@pytest.mark.slow
def test_exported_adapter_and_merged_model_answer_in_plain_transformers(tmp_path, untied_tiny_model_dir):
    """Export and plain-transformers loading on a tiny model (``--set`` overrides of the example's run): what is
    checked is that both load and answer, not what the demo model says."""
    data = write_code_chats(tmp_path)
    overrides = run_overrides(untied_tiny_model_dir, data, tmp_path / "runs")
    sets = [arg for o in overrides if not o.startswith(("train.steps", "train.eval_every")) for arg in ("--set", o)]
    out = _run("use_exported_adapter.py", "--train", "2", *sets, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    replies = re.findall(r"^(adapter|merged model) \(.*\): '(.*)'$", out.stdout, re.M)
    assert [kind for kind, _ in replies] == ["adapter", "merged model"]
    assert all(text.strip() for _, text in replies)
