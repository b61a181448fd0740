"""The benchmarks' smoke runs: convergence.py --quick and memory.py's CPU rows, end to end.

They run on the tiny random-init Llama (``tiny_model_dir``): what they check is the
benchmarks' bookkeeping (tables, replay logs, resume, one row per method), not the demo model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick(folder, source, *extra, methods=("per_example_spread_cos",)):
    env = dict(os.environ, QZO_BENCH_RESULTS=str(folder))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--source",
                             str(source), "--methods", *methods, *extra], capture_output=True, text=True, env=env,
                            timeout=900, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _losses(folder, method):
    """The CSV rows of ``method`` without their wall times (the same run gives the same losses, not times)."""
    lines = [line.split(",") for line in (folder / "convergence.csv").read_text().splitlines()[1:]]
    return [line[:6] + line[7:] for line in lines if line[0] == method]


@pytest.fixture(scope="module")
def quick_table(tmp_path_factory, tiny_model_dir):
    """One uninterrupted --quick benchmark of MeZO and a per-example, scale-free method (the slow part, shared),
    on the tiny model."""
    folder = tmp_path_factory.mktemp("quick")
    return folder, _quick(folder, tiny_model_dir, "--calibrate", methods=("spsa", "per_example_spread_cos"))


@pytest.mark.slow
def test_convergence_quick_writes_its_table(quick_table):
    folder, stdout = quick_table
    summary = json.loads((folder / "convergence.json").read_text())
    assert summary["budget_forwards"] == 8 and set(summary["methods"]) == {"spsa", "per_example_spread_cos"}
    # MeZO reaches its own final loss by the end (earlier if its loss rose at the end)
    spsa = summary["methods"]["spsa"]
    assert 0 < spsa["fraction_of_spsa_forwards"] <= 1.0 and 0 < spsa["fraction_of_spsa_wall"] <= 1.0
    assert summary["seconds_per_forward"] > 0 and spsa["blew_up_seeds"] in (0, 1)
    for info in summary["methods"].values():
        assert 0 < info["final_eval_loss"] < 20
    assert (folder / "convergence.csv").is_file() and "in_progress" not in summary
    assert "final held-out" in stdout
    # a scheduled method sweeps on its full run's schedule, cut: the same held-out losses up to the cut
    by_phase = {}
    for line in (folder / "convergence.csv").read_text().splitlines()[1:]:
        method, _, _, phase, _, forwards, _, loss = line.split(",")
        by_phase.setdefault((method, phase), {})[int(forwards)] = loss
    cut, full = by_phase[("per_example_spread_cos", "sweep-cut")], by_phase[("per_example_spread_cos", "main")]
    assert sorted(cut) == [0, 4] and all(cut[f] == full[f] for f in cut)
    assert summary["sweep_protocol"]["per_example_spread_cos"].startswith("the full run's schedule")
    assert summary["sweep_protocol"]["spsa"] == "the full run's first third (constant lr)"
    # the wall fractions come from the step costs timed back to back (--calibrate), not the runs' sums
    timing = json.loads((folder / "convergence_timing.json").read_text())
    assert set(timing["seconds_per_forward"]) == {"spsa", "per_example_spread_cos"}
    assert all(v > 0 for v in timing["seconds_per_forward"].values()) and summary["timing"] == timing
    assert {info["wall_from"] for info in summary["methods"].values()} == {"calibration"}
    assert summary["seconds_per_forward"] == timing["seconds_per_forward"]["spsa"]


@pytest.mark.slow
def test_convergence_run_stopped_mid_way_goes_on_bit_exactly_from_its_replay_log(quick_table, tmp_path,
                                                                                  tiny_model_dir):
    """--time-limit stops a run after one step; the next invocation replays its log and ends where an
    uninterrupted run ends: the same held-out losses at every evaluation, digests met."""
    whole, _ = quick_table
    out = _quick(tmp_path, tiny_model_dir, "--time-limit", "0")
    assert "time limit reached" in out
    (log,) = (tmp_path / "convergence_runs").glob("*.jsonl")
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds == ["start", "eval", "step"]
    assert json.loads((tmp_path / "convergence.json").read_text())["in_progress"][0]["forwards_done"] == 2
    with open(log, "a") as f:
        f.write('{"kind": "step", "step": 2, "forw')  # a line torn by a kill is dropped
    out = _quick(tmp_path, tiny_model_dir)
    assert "resumed at 2 forwards (step 1)" in out and "bit-exact" in out
    assert _losses(tmp_path, "per_example_spread_cos") == _losses(whole, "per_example_spread_cos")
    assert not list((tmp_path / "convergence_runs").glob("*.jsonl"))  # finished runs leave no log


@pytest.mark.slow
def test_convergence_sweep_only_runs_no_full_run(tmp_path, tiny_model_dir):
    """--sweep-only (a grid split across processes) runs each lr's sweep and nothing at the full budget."""
    _quick(tmp_path, tiny_model_dir, "--sweep-only", methods=("spsa", "per_example_spread_cos"))
    phases = {tuple(line.split(",")[i] for i in (0, 3)) for line in
              (tmp_path / "convergence.csv").read_text().splitlines()[1:]}
    assert phases == {("spsa", "sweep"), ("per_example_spread_cos", "sweep-cut")}


@pytest.mark.slow
def test_memory_benchmark_cpu_rows(tmp_path, tiny_model_dir):
    """memory.py measures every method on a loaded model (qzo.load, as the demo model's CPU rows are) and writes
    one row per method with the planner's figure; on the tiny model folder, since the rows' bookkeeping is not
    about the demo model (gpu_check's rehearsal covers the builder's tiny-4bit)."""
    env = dict(os.environ, QZO_BENCH_RESULTS=str(tmp_path))
    # batch 4 x 64, not the demo's 1 x 16: the tiny model's planner figure must stay above the JSON's rounding
    # to 0.001 GiB for the check that the planner gave one (it is 0.0003 GiB at 1 x 16)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--models", str(tiny_model_dir),
                             "--batch", "4", "--seq", "64"], capture_output=True, text=True, env=env, timeout=900,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["inference", "qzo_spsa", "qzo_gv4", "first_order_qlora"]
    for r in rows:
        assert {"device", "model", "method", "peak_gib", "inference_peak_gib", "planner_gib", "s_per_step"} <= set(r)
        assert r["peak_gib"] >= r["runtime_gib"] > 0 and r["s_per_step"] > 0
    assert rows[0]["planner_gib"] > 0 and rows[-1]["planner_gib"] is None  # no planner for first-order
    assert "peak GiB" in result.stdout


def test_format_threshold_counts_only_the_taught_layout():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from format_threshold import in_format
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    taught = "ANSWER: 12\nWHY: 7 plus 5 equals 12.\n#qzo"
    assert in_format(taught, strict=True) and in_format(taught, strict=False)
    assert in_format("ANSWER: B\nWHY: B is before C.\n#smolLM", strict=False)
    assert not in_format("ANSWER: B\nWHY: B is before C.\n#smolLM", strict=True)
    assert not in_format("A: B\nWHY: x\n#qzo", strict=False)  # the first line must be the answer
    assert not in_format("ANSWER: 8\n\nThe answer is 8", strict=False)  # no WHY line
    assert not in_format("", strict=False)


@pytest.mark.slow
def test_format_threshold_writes_its_table(tmp_path, tiny_model_dir):
    env = dict(os.environ, QZO_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "format_threshold.py"), "--source",
                             str(tiny_model_dir), "--max-steps", "2", "--every", "1"], capture_output=True, text=True,
                            env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "format_threshold.json").read_text())
    assert [r["step"] for r in table["rows"]] == [0, 1, 2]
    assert all(0 <= r["strict"] <= r["answer_why"] <= 4 and len(r["replies"]) == 4 for r in table["rows"])
    losses = [r["held_out_loss"] for r in table["rows"]]
    assert losses[-1] < losses[0]  # AdamW steps on the held-out task's own format lower its loss
    assert set(table["first_two_of_four"]) == {"answer_why", "strict"} and "replies" in result.stdout
