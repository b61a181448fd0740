"""Distributed ZO over torch.distributed (gloo, real processes on this CPU).

What crosses ranks is one all-reduce of losses per group of evaluations, so:
- candidate-parallel (each rank runs some of a step's evaluations on the whole batch) makes
  the same perturbation passes and forwards as one process: the run is **bit-exact**;
- data-parallel (each rank a shard of the batch) reduces the shards' token sums: step losses
  equal one process's to float32 rounding of the shards' means (rtol 1e-5 here) and the
  trained values are allclose (atol 5e-4 after 4 steps at lr 5e-2, where one process's
  values move by ~1e-2).
"""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from qzo.runs.checkpoint import list_checkpoints, verify_checkpoint
from qzo.zo.distributed import Distributed, DistributedError, shard_rows, trainables_checksum
from qzo.train.loop import train

from helpers import run_overrides

STEPS = 4


def _sets(model_dir, data, out, **extra) -> list[str]:
    return run_overrides(model_dir, data, out, **{"train.steps": STEPS, "train.eval_every": 2, "train.save_every": 2,
                                                   "train.check_every": 1, **extra})


def _torchrun(n: int, args: list[str], timeout: float = 900, wait: bool = True, module: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           *(["-m", "qzo"] if module else []), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _train_args(sets: list[str], resume: Path | None = None) -> list[str]:
    args = ["train", "--no-progress"]
    if resume is not None:
        return args + ["--resume", str(resume)]
    for s in sets:
        args += ["--set", s]
    return args


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


STRATEGIES = {"spsa": {}, "fzoo": {"optim.strategy": "{name: fzoo, probes: 3}"},
              "gv": {"optim.strategy": "{name: gv, pool: 2}"}, "per_example": {"optim.strategy": "per_example"}}
# (strategy, train.candidate_parallel) of the 2-rank runs: each strategy in each mode it is tested in
TWO_RANK = {"spsa-candidates": ("spsa", 2), "fzoo-candidates": ("fzoo", 2), "spsa-data": ("spsa", 1),
            "gv-data": ("gv", 1), "per_example-data": ("per_example", 1)}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The single-process reference runs, then every 2-rank run and a 2-rank resume in one torchrun job."""
    from helpers import write_code_chats

    root = tmp_path_factory.mktemp("dist")
    data = write_code_chats(root)
    one = {}
    for name, extra in STRATEGIES.items():
        one[name] = root / f"one-{name}"
        train(None, _sets(tiny_model_dir, data, one[name], **extra), log=lambda _: None, progress=False)
    two = {name: root / f"two-{name}" for name in TWO_RANK}
    jobs = {"runs": {name: _sets(tiny_model_dir, data, two[name], **STRATEGIES[strategy],
                                 **{"train.candidate_parallel": cp}) for name, (strategy, cp) in TWO_RANK.items()},
            "resume": {"from": str(two["spsa-candidates"]), "to": str(root / "resumed"), "drop_step": STEPS}}
    (root / "jobs.json").write_text(json.dumps(jobs))
    _torchrun(2, [str(Path(__file__).parents[1] / "distributed_worker.py"), str(root / "jobs.json")], module=False)
    return data, one, two, root / "resumed"


@pytest.mark.parametrize("strategy", ["spsa", "fzoo"])
def test_candidate_parallel_equals_one_process_bit_exactly(strategy, runs):
    _, one, two, _ = runs
    ref, out = one[strategy], two[f"{strategy}-candidates"]
    a_steps, b_steps = _steps(ref), _steps(out)
    assert [r["seeds"] for r in b_steps] == [r["seeds"] for r in a_steps]
    assert [r["losses"] for r in b_steps] == [r["losses"] for r in a_steps]  # bit for bit
    a, b = _adapter(ref), _adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in b_steps] == list(range(1, STEPS + 1))  # rank 0 alone wrote the log


def test_resume_of_a_two_rank_run_is_bit_exact(runs):
    _, _, two, resumed = runs
    final = _adapter(two["spsa-candidates"])
    again = _adapter(resumed)
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert [r["losses"] for r in _steps(resumed)] == [r["losses"] for r in _steps(two["spsa-candidates"])]


def test_a_two_rank_run_resumes_in_one_process(runs, tmp_path):
    # another world size: candidate-parallel numbers do not depend on who ran which forward, so bit-exact
    import shutil

    _, _, two, _ = runs
    again = tmp_path / "one-rank-resume"
    shutil.copytree(two["spsa-candidates"], again)
    shutil.rmtree(again / "checkpoints" / f"step-{STEPS:06d}")
    for name in ("adapter", "summary.json", "best", "best.json"):
        path = again / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    train(None, None, resume=again, log=lambda _: None, progress=False)
    final, resumed = _adapter(two["spsa-candidates"]), _adapter(again)
    assert all(torch.equal(final[k], resumed[k]) for k in final)


@pytest.mark.parametrize("strategy", ["spsa", "gv", "per_example"])  # per_example: each shard's rows get their seeds
def test_data_parallel_equals_one_process_to_reduction_rounding(strategy, runs):
    _, one, two, _ = runs
    ref, out = one[strategy], two[f"{strategy}-data"]
    a_steps, b_steps = _steps(ref), _steps(out)
    assert [r["seeds"] for r in b_steps] == [r["seeds"] for r in a_steps]
    for x, y in zip(a_steps, b_steps):
        assert y["losses"] == pytest.approx(x["losses"], rel=1e-5)
    a, b = _adapter(ref), _adapter(out)
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # it trained (B starts at 0)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=5e-4, rtol=0)


def test_shards_cover_the_batch_once():
    for rows in range(1, 12):
        for shards in range(1, 5):
            parts = [shard_rows(rows, shards, k) for k in range(shards)]
            covered = [i for p in parts for i in range(rows)[p]]
            assert covered == list(range(rows))
            sizes = [len(range(rows)[p]) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _faults_worker(rank: int, world: int, port: int, results):
    """Two faults in one pair of real processes: a rank whose trainables drift, then a rank that goes silent."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=30))
    dist = Distributed(candidate_parallel=1, timeout_s=4.0)
    dist.step = 7
    values = {"a.lora_A": torch.arange(6.0).reshape(2, 3), "a.lora_B": torch.zeros(3, 2)}
    dist.check(values)  # equal: passes
    if rank == 1:
        values["a.lora_B"][0, 0] += 1e-7  # one value a hair off on one rank
    try:
        dist.check(values)
        results.put((f"check{rank}", "no error"))
    except DistributedError as exc:
        results.put((f"check{rank}", str(exc)))
    if rank == 1:
        time.sleep(15)  # silent past rank 0's 4 s timeout
        return
    started = time.monotonic()
    try:
        dist.reduce_losses([(1.0, 3)])
        results.put(("hang", "no error"))
    except DistributedError as exc:
        results.put(("hang", str(exc)))
    results.put(("elapsed", time.monotonic() - started))


@pytest.fixture(scope="module")
def faults() -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_faults_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=120) for _ in range(4))
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return out


def test_checksum_check_names_the_rank_whose_trainables_differ(faults):
    for rank in (0, 1):  # both ranks stop, with the same message
        assert "rank(s) [1] differ from rank 0's after step 7" in faults[f"check{rank}"]


def test_a_silent_rank_stops_the_others_within_the_timeout(faults):
    assert faults["elapsed"] < 4.0 + 5.0 + 3.0  # the timeout, the monitored barrier that names the rank, slack
    message = faults["hang"]
    assert "rank 0 of 2: exchanging losses at step 7 failed" in message and "died or hangs" in message
    assert "did not answer: Ranks 1 failed" in message  # gloo's monitored barrier names the silent rank
    assert "--resume" in message


def test_trainables_checksum_sees_one_bit():
    a = {"x": torch.ones(4), "y": torch.zeros(2, 2)}
    b = {"x": torch.ones(4), "y": torch.zeros(2, 2)}
    assert trainables_checksum(a) == trainables_checksum(b)
    b["y"].view(torch.int32)[1, 1] ^= 1  # the smallest float change there is
    assert trainables_checksum(a) != trainables_checksum(b)


def test_a_killed_rank_stops_the_run_and_leaves_the_checkpoint_intact(tiny_model_dir, runs, tmp_path):
    data = runs[0]
    out = tmp_path / "killed"
    proc = _torchrun(2, _train_args(_sets(tiny_model_dir, data, out, **{"train.steps": 400, "train.save_every": 2,
                                                                        "train.eval_every": 1000,
                                                                        "train.dist_timeout_s": 20})),
                     wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (list_checkpoints(out) if (out / "checkpoints").is_dir() else []):
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)  # the rank started last (rank 1)
    t0 = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 60
    assert proc.returncode != 0
    assert "rank" in output and ("exitcode: -9" in output or "Signal 9" in output), output[-3000:]
    for ckpt in list_checkpoints(out):
        verify_checkpoint(ckpt)  # every checkpoint left verifies
