"""The short form of scripts/kill_campaign.py: a real qzo train killed 3 times at random moments (inside a checkpoint
write among them, at the campaign's 0.3 odds) ends bit-exact.

It trains the tests' tiny Llama (``tiny_model_dir``: the campaign's own model shape with the tiny tokenizer instead of
the demo's, whose 49k-token embedding is nothing a kill is about)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_three_random_kills_leave_no_corrupt_checkpoint_and_a_bit_exact_run(tmp_path, tiny_model_dir):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "kill_campaign.py"), "--kills", "3",
                             "--per-round", "3", "--steps", "8", "--out", str(tmp_path), "--model",
                             str(tiny_model_dir)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = json.loads((tmp_path / "kill_campaign.json").read_text())
    # a round ends when a start finishes before its kill lands (a late random time): then another begins
    assert counts["kills"] == 3 and counts["rounds"] == counts["rounds_bit_exact"] >= 1
    assert counts["corrupt_checkpoints"] == counts["lost_steps"] == counts["log_gaps"] == 0
    assert counts["starts"] == counts["kills"] + counts["rounds"]  # the killed starts and one finished per round
