"""The examples run as a user would run them (cwd outside the repo, see test_cli_e2e)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args, cwd):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def test_any_objective_fits_and_classifies(tmp_path):
    out = _run("any_objective.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    start, end = map(float, re.findall(r"least squares: .*?([\d.]+)(?: \(|$)", out.stdout, re.M))
    assert end < 0.01 * start
    errors = [float(x) for x in re.findall(r"0-1 loss: .*?([\d.]+)$", out.stdout, re.M)]
    assert errors[1] < errors[0] - 0.2


@pytest.mark.slow
def test_quickstart_runs_and_saves_an_adapter(tmp_path, smol_folder):
    out = _run("quickstart.py", "--steps", "2", "--out", str(tmp_path / "adapter"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out loss before" in out.stdout and "held-out loss after" in out.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_short_replies_quick_mode_trains_on_a_reward(tmp_path, smol_folder):
    out = _run("short_replies.py", "--quick", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = (float(re.search(rf"mean reward {w}: ([\d.]+)", out.stdout).group(1)) for w in ("before", "after"))
    assert 0 <= before <= 1 and 0 <= after <= 1
    step = re.search(r"step 1: train reward ([\d.]+) \(\+eps ([\d.]+), -eps ([\d.]+)\)", out.stdout)
    assert step and float(step.group(1)) == pytest.approx((float(step.group(2)) + float(step.group(3))) / 2, abs=1e-3)


def test_short_reply_reward_counts_characters_so_the_hack_zo_found_scores_low():
    import importlib.util

    spec = importlib.util.spec_from_file_location("short_replies", EXAMPLES / "short_replies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reward = module.short_reply(16)
    replies = ["Tuesday.", "It is Tuesday, I think.", "ellaellaellaellaellaellaellaella", ".", ""]
    assert reward([""] * len(replies), replies, [""] * len(replies)) == [1.0, 16 / 23, 0.5, 0.0, 0.0]
