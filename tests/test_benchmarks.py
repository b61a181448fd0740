"""The convergence benchmark's --quick mode runs end to end on the real demo model (CI smoke run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_convergence_quick_writes_its_table(tmp_path, smol_folder):
    env = dict(os.environ, QZO_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--methods",
                             "spsa", "gv2"], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "convergence.json").read_text())
    assert summary["budget_forwards"] == 8 and set(summary["methods"]) == {"spsa", "gv2"}
    assert summary["methods"]["spsa"]["fraction_of_spsa_forwards"] == 1.0
    for info in summary["methods"].values():
        assert 0 < info["final_eval_loss"] < 20
    assert (tmp_path / "convergence.csv").is_file()
    assert "final held-out" in result.stdout
