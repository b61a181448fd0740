"""The examples run as a user would run them (cwd outside the repo, see test_cli_e2e).

Those that train run on a tiny random-init Llama (``--model``): what they check is the example's
workflow, not the demo model (``test_cli_e2e`` trains the demo recipe itself).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args, cwd, env=None):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env=env)


def _hub_cache_with_config(cache: Path, repo_id: str, config) -> Path:
    """A Hugging Face hub cache holding only ``repo_id``'s config.json (what `hf download ID config.json` leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    config.save_pretrained(repo / "snapshots" / revision)
    return cache


def test_any_objective_fits_and_classifies(tmp_path):
    out = _run("any_objective.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    start, end = map(float, re.findall(r"least squares: .*?([\d.]+)(?: \(|$)", out.stdout, re.M))
    assert end < 0.01 * start
    errors = [float(x) for x in re.findall(r"0-1 loss: .*?([\d.]+)$", out.stdout, re.M)]
    assert errors[1] < errors[0] - 0.2




@pytest.mark.slow
def test_quickstart_runs_and_saves_an_adapter(tmp_path, tiny_model_dir):
    out = _run("quickstart.py", "--steps", "2", "--out", str(tmp_path / "adapter"), "--model", str(tiny_model_dir),
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out loss before" in out.stdout and "held-out loss after" in out.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_short_replies_quick_mode_trains_on_a_reward(tmp_path, untied_tiny_model_dir):
    # seed 3: the tiny model's 4-token replies are short (a few characters a token), so most score the full 1 and
    # both perturbed rewards are often equal; at this seed they differ (0.76 and 0.70), which makes the check that
    # the step's train reward is their mean a real one (any seed passes)
    out = _run("short_replies.py", "--quick", "--seed", "3", "--model", str(untied_tiny_model_dir), cwd=tmp_path)
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


def test_offload_7b_gpu_branch_plans_its_placement_without_a_gpu(tmp_path):
    """The GPU branch up to qzo.load, the first step that needs CUDA: the plan of the documented
    command (a hub id, read from the local cache) and the placement it hands to qzo.load."""
    import ast

    from qzo.train.plan import GiB, model_config, plan

    repo_id = "meta-llama/Llama-2-7b-chat-hf"  # the example's default --model
    cache = _hub_cache_with_config(tmp_path / "hub", repo_id, model_config("llama-2-7b"))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = _run("offload_7b.py", "--plan-only", "--gpu", "4GiB", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = plan("llama-2-7b", "nf4", gpu="4GiB", batch=4, seq=96)
    assert not expected.fits and 0 < expected.gpu_layers() < expected.layers
    assert expected.table() in out.stdout
    placement = ast.literal_eval(re.search(r"^placement: (\{.*\})$", out.stdout, re.M)[1])
    assert placement["device_map"] == "auto" and set(placement["max_memory"]) == {0, "cpu"}
    assert placement["max_memory"][0] == f"{expected.weights_allowance() / GiB:.2f}GiB"
    assert "placed on" not in out.stdout  # stopped before loading


    # a card the model fits: no offload (in process, the same function)
    import importlib.util

    spec = importlib.util.spec_from_file_location("offload_7b", EXAMPLES / "offload_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    p, kwargs = module.placement("llama-2-7b", "8GiB")
    assert p.fits and kwargs == {}


def test_sft_trainer_example_trains_with_zo_steps(tmp_path, tiny_model_dir):
    """TRL's SFT script with ZOSFTTrainer: the held-out loss is printed before and after, and the adapter and qzo's
    step log are saved (on the tiny Llama, loaded 4-bit as the script loads any model)."""
    out = _run("sft_trainer.py", "--model", str(tiny_model_dir), "--steps", "4", "--out", str(tmp_path / "sft"),
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = (float(re.search(rf"held-out loss {w}: +([\d.]+)", out.stdout).group(1)) for w in ("before", "after"))
    assert before > 0 and after > 0 and before != after
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "sft" / "qzo" / "steps.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "sft" / "checkpoint-2" / "qzo" / "steps.jsonl").is_file()
