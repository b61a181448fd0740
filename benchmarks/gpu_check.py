"""One prepared GPU check (issue 15, section 4): every GPU row qzo owes, in one command of at most 8 minutes.

A lent GPU comes with 15 minutes of device time in all, machine start included, so this runs
everything that needs a GPU in one go, each stage in its own process with its own time
budget (a crash, an out-of-memory or a hang costs that stage only), under one deadline:

  stage          what                                                      budget  expected
  kernel-tests   tests/noise/test_kernels.py + the Triton randn test, compiled on CUDA     120 s   40-70 s
  memory         benchmarks/memory.py GPU rows: Llama-2-7B, Llama-3.1-8B,            150 s   60-80 s
                 Llama-2-13B shapes, 8 x 512, LoRA r 8 on q,v, NF4, built directly
                 in 4-bit on the GPU (benchmarks/_build4bit.py); inference, SPSA,
                 GV pool 4, first-order QLoRA; the planner beside every peak
  streaming-70b  a Llama-3.1-70B shape at a 20 GiB GPU budget through qzo.models.streaming  150 s   50-90 s
                 (the planner's max_memory -> accelerate's map -> plan_streaming;
                 streamed layers' codes built straight into pinned host RAM):
                 peak, s/step, bytes streamed and their PCIe time
  pool-batched   benchmarks/pool_batched.py GPU mode (7B shape, K = 2, 4, 8)          75 s   25-40 s
  kernels        benchmarks/kernel_throughput.py (perturb vs copy bandwidth and MeZO, LoRA)     75 s   30-50 s
  levers         memory rows again with double quantization + the embedding on the  120 s   40-60 s
                 CPU (model.double_quant, model.embedding_on_cpu), inference + SPSA

The expected times are estimates, nothing here has run on a GPU yet: each stage's process
start (~10 s of imports), ~40 Triton compilations, a 7B-13B built in 4-bit in seconds (one
random normal and one quantize_4bit per linear), a 70B's 57 streamed layers (22.7 GiB of
codes) written into pinned host RAM, and forwards of 8 x 512 tokens (a 70B forward is about
5.6e14 FLOP, ~1 s at the measured 790 TFLOP/s bf16, its 22.7 GiB streamed in ~0.5-0.9 s at
25-50 GB/s, overlapped). Together 250-400 s, inside the deadline.

The deadline (``--deadline``, 465 s) caps every stage's budget by what is left; a stage
with less than its minimum left is skipped and says so. If the kernel tests fail, the
later stages run with ``QZO_BACKEND=torch`` (the reference path) so their memory rows still
come, and the table says so. Results (``--results``, default ``benchmarks/results/gpu/``,
the device named in each): gpu_check.json (every stage's status, time and the one table),
stages.log (each stage's output), kernel_tests.log, memory.json, pool_batched.json,
kernels.json; with ``--copy-to DIR`` they are copied there after every stage (6 files; a device call returns at most 8).

How to run it on the lent machine (one H200; its image has torch 2.11, triton 3.6,
transformers, accelerate, peft, psutil, pyyaml, safetensors; no bitsandbytes, no network):

1. Here, once, in the repo root: the bitsandbytes wheel (43 MB; it holds the CUDA 13.0
   library the machine's torch needs), in a folder git ignores::

       echo /.whl/ >> .git/info/exclude
       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
           --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2

2. One device call, ``carry: [".whl"]``, ``timeout_s: 540``::

       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
       && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --copy-to $OUT

   qzo itself is not installed there: this script links ``qzo`` and ``qzo_kernels`` into a
   temporary folder on every stage's PYTHONPATH. The files come back under the call's files_at; copy them to
   benchmarks/results/gpu/ and commit them.

Rehearsal, on any machine (what CI runs, ``tests/test_gpu_check.py``): ``--rehearse`` runs
every stage that has a CPU form at tiny sizes, the same scripts with the same code paths:
the kernel tests' command (one test; the compiled-kernel test skips without CUDA),
kernel_throughput.py ``--quick``, memory.py on ``tiny-4bit`` (a small Llama built by the same 4-bit
builder, on the CPU), the streaming stage with ``--budget half`` (half the layers stream,
from disk on a CPU), pool_batched.py ``--tiny`` and the levers. Its results go to a
temporary folder and are marked ``"rehearsal": true``::

    python benchmarks/gpu_check.py --rehearse [--results /tmp/rehearsal]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEADLINE_S = 465  # of the 8 minutes: the pip install before it and the copies after it take the rest
RESULT_FILES = ("gpu_check.json", "stages.log", "kernel_tests.log", "memory.json", "pool_batched.json", "kernels.json")
GPU_MODELS = "llama-2-7b,llama-3.1-8b,llama-2-13b"
STREAMED_70B = "llama-3.1-70b"


@dataclass
class Stage:
    """One step of the check: a script (or pytest) with its arguments, a time budget and a floor."""

    name: str
    argv: list[str]  # after the interpreter: a script path or ["-m", "pytest", ...]
    budget_s: float
    min_s: float  # skipped when less than this is left before the deadline
    what: str
    log: str | None = None  # its own log file besides stages.log
    in_process: bool = False  # rehearsal: run the script in this process (no second interpreter start)
    background: bool = False  # rehearsal: a subprocess started first and joined last, beside the others


def kernel_test_argv(rehearse: bool) -> list[str]:
    argv = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/noise/test_kernels.py",
            "tests/noise/test_noise.py::test_matches_triton_tl_randn"]
    return argv + (["-k", "where_differ or compiled_kernel"] if rehearse else [])


def gpu_stages() -> list[Stage]:
    mem = str(HERE / "memory.py")
    return [
        Stage("kernel-tests", kernel_test_argv(False), 120, 30, "Triton kernels vs torch reference, compiled on CUDA",
              log="kernel_tests.log"),
        Stage("memory", [mem, "--models", GPU_MODELS], 150, 60,
              "7B/8B/13B shapes built in 4-bit on the GPU, 8 x 512: peaks vs planner"),
        Stage("streaming-70b", [mem, "--models", STREAMED_70B, "--budget", "20GiB", "--methods", "inference,qzo_spsa"],
              150, 75, "70B shape at a 20 GiB budget through qzo.models.streaming: peak, s/step vs PCIe time"),
        Stage("pool-batched", [str(HERE / "pool_batched.py"), "--repeats", "3"], 75, 40,
              "a pool of K candidates in one stacked forward vs K forwards (7B shape)"),
        Stage("kernels", [str(HERE / "kernel_throughput.py")], 75, 30, "perturb throughput vs copy bandwidth and MeZO"),
        Stage("levers", [mem, "--models", GPU_MODELS, "--methods", "inference,qzo_spsa", *_levers()], 120, 45,
              "7B/8B/13B with double quant + embedding on the CPU"),
    ]


def _levers() -> list[str]:
    """The lever flags this checkout has: double quantization always, the host embedding where qzo has it."""
    return ["--double-quant"] + (["--embedding-on-cpu"] if _has_host_embedding() else [])


def rehearsal_stages() -> list[Stage]:
    mem = str(HERE / "memory.py")
    tiny = ["--models", "tiny-4bit", "--batch", "2", "--seq", "32"]
    stages = [
        Stage("kernel-tests", kernel_test_argv(True), 120, 0, "the kernel tests' command (one test)",
              log="kernel_tests.log", background=True),
        Stage("memory", [mem, *tiny], 120, 0, "tiny-4bit built by the 4-bit builder: every method", in_process=True),
        Stage("streaming-70b", [mem, *tiny, "--budget", "half", "--methods", "inference,qzo_spsa"], 120, 0,
              "tiny-4bit, half its layers streamed (from disk on a CPU)", in_process=True),
        Stage("pool-batched", [str(HERE / "pool_batched.py"), "--tiny", "--gpu-layers", "2", "--gpu-batch", "2",
                               "--gpu-seq", "16", "--ks", "2", "--repeats", "1"], 120, 0,
              "the GPU mode's code path at a tiny shape", in_process=True),
        Stage("kernels", [str(HERE / "kernel_throughput.py"), "--max-numel", "1e5", "--repeats", "1", "--quick"], 120, 0,
              "kernel_throughput.py at tiny sizes (torch reference on CPU)", in_process=True),
    ]
    stages.append(Stage("levers", [mem, *tiny, "--methods", "inference,qzo_spsa", *_levers()], 120, 0,
                        "tiny-4bit with the levers", in_process=True))
    return stages


def _has_host_embedding() -> bool:
    import importlib.util
    import inspect

    from qzo.train.plan import plan

    return (importlib.util.find_spec("qzo.models.host_embedding") is not None
            and "embedding_on_cpu" in inspect.signature(plan).parameters)


def import_shim() -> Path:
    """A folder holding links ``qzo`` and ``qzo_kernels`` to this checkout's packages, for PYTHONPATH.

    The lent machine has no network and qzo is not installed there; this makes both import
    names resolve to this checkout without putting the whole repo root (benchmarks, tests)
    on the path.
    """
    shim = Path(tempfile.mkdtemp(prefix="qzo-shim-"))
    (shim / "qzo").symlink_to(ROOT / "qzo", target_is_directory=True)
    (shim / "qzo_kernels").symlink_to(ROOT / "qzo_kernels", target_is_directory=True)
    return shim


def start_subprocess(stage: Stage, env: dict) -> subprocess.Popen:
    python = [sys.executable] + (["-P"] if sys.version_info >= (3, 11) else [])  # -P: no cwd on sys.path
    return subprocess.Popen(python + stage.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_subprocess(stage: Stage, timeout: float, env: dict, proc: subprocess.Popen | None = None):
    """``(returncode or "timeout", output)``; the whole process group is killed at the timeout."""
    proc = proc or start_subprocess(stage, env)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", out


def run_in_process(stage: Stage) -> tuple[int | str, str]:
    """The rehearsal's way: ``runpy`` the script with its argv in this process, its output captured."""
    buf = io.StringIO()
    argv = sys.argv
    code: int | str = 0
    sys.argv = [stage.argv[0], *stage.argv[1:]]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(stage.argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            buf.write(f"{exc.code}\n")
    except Exception:  # noqa: BLE001 - a stage's failure is its row, not the check's end
        buf.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
    return code, buf.getvalue()


def run_stages(stages: list[Stage], results: Path, deadline_s: float, copy_to: Path | None, meta: dict) -> dict:
    env = dict(os.environ, QZO_BENCH_RESULTS=str(results), PYTHONUNBUFFERED="1")
    shim = import_shim()
    env["PYTHONPATH"] = os.pathsep.join([str(shim)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    start = time.perf_counter()
    log = results / "stages.log"
    log.write_text("")
    summary = {**meta, "stages": []}
    started = {s.name: (start_subprocess(s, env), time.perf_counter()) for s in stages if s.background}
    try:
        for stage in [s for s in stages if not s.background] + [s for s in stages if s.background]:
            left = deadline_s - (time.perf_counter() - start)
            timeout = min(stage.budget_s, left)
            row = {"stage": stage.name, "what": stage.what, "argv": stage.argv, "budget_s": stage.budget_s}
            if timeout < max(stage.min_s, 1) and stage.name not in started:
                row.update(status="skipped", why=f"{left:.0f} s left before the deadline, it needs {stage.min_s:.0f}")
            else:
                print(f"== {stage.name} (budget {timeout:.0f} s): {stage.what}", flush=True)
                proc, t0 = started.get(stage.name, (None, time.perf_counter()))
                if stage.in_process:
                    code, out = run_in_process(stage)
                else:
                    code, out = run_subprocess(stage, max(timeout, 1), env, proc)
                wall = time.perf_counter() - t0
                status = "ok" if code == 0 else "timeout" if code == "timeout" else "failed"
                row.update(status=status, returncode=code, wall_s=round(wall, 1), tail=out[-1500:])
                with open(log, "a") as f:
                    f.write(f"===== {stage.name}: {status} in {wall:.1f} s (budget {timeout:.0f} s)\n{out}\n")
                if stage.log:
                    (results / stage.log).write_text(out)
                print(out[-800:] if status != "ok" else _last_lines(out, 3), flush=True)
                print(f"== {stage.name}: {status} in {wall:.1f} s", flush=True)
                if stage.name == "kernel-tests" and status != "ok" and env.get("QZO_BACKEND") != "torch":
                    env["QZO_BACKEND"] = "torch"  # the memory rows still come, on the reference path
                    os.environ["QZO_BACKEND"] = "torch"
                    summary["backend_fallback"] = "kernel tests failed: later stages ran with QZO_BACKEND=torch"
            summary["stages"].append(row)
            summary["wall_s"] = round(time.perf_counter() - start, 1)
            summary["table"] = table_rows(results)
            (results / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
            if copy_to is not None:
                copy_results(results, copy_to)
    finally:
        shutil.rmtree(shim, ignore_errors=True)
    return summary


def _last_lines(text: str, n: int) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def copy_results(results: Path, to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (results / name).is_file():
            shutil.copy2(results / name, to / name)


def _read(results: Path, name: str) -> dict | None:
    try:
        return json.loads((results / name).read_text())
    except (OSError, ValueError):
        return None


def table_rows(results: Path) -> list[dict]:
    """The one table: every measured row that has a target or a planner figure, from the stages' result files."""
    rows = []
    memory = _read(results, "memory.json") or {}
    for r in memory.get("rows", []):
        rows.append({"what": "memory", "model": r["model"], "lever": r.get("lever", "none"), "method": r["method"],
                     "peak_gib": r.get("peak_gib"), "planner_gib": r.get("planner_gib"),
                     "planner_error": r.get("planner_error"), "within_10pct": r.get("within_10pct"),
                     "target_gib": r.get("target_gib"), "s_per_step": r.get("s_per_step"),
                     "streamed_layers": r.get("streamed_layers"),
                     "streamed_gib_per_step": r.get("streamed_gib_per_step"),
                     "pcie_s_at_25GBps": r.get("pcie_s_at_25GBps"), "pcie_s_at_link": r.get("pcie_s_at_link"),
                     "link_gb_per_s": r.get("link_gb_per_s"), "budget_gib": r.get("budget_gib"),
                     "within_budget": r.get("within_budget"), "error": r.get("error") or r.get("skipped")})
    pool = _read(results, "pool_batched.json") or {}
    for r in pool.get("rows", []):
        rows.append({"what": "pool-batched", "model": r.get("model"), "K": r["K"], "one_forward_s": r["one_forward_s"],
                     "batched_s": r["batched_s"], "batched_over_one": r["batched_over_one"],
                     "sequential_over_batched": r["sequential_over_batched"]})
    kern = _read(results, "kernels.json") or {}
    for r in kern.get("rows", []):
        if r.get("op") in ("perturb", "lora-7b"):
            rows.append({"what": "kernels", "op": r["op"], "numel": r["numel"], "pool": r["pool"],
                         "qzo_ms": round(r["qzo_s"] * 1e3, 3), "fraction_of_copy": r.get("fraction_of_copy"),
                         "speedup_vs_mezo": r.get("speedup_vs_mezo")})
    return rows


def print_table(summary: dict) -> None:
    fmt = lambda v, spec="": "-" if v is None else format(v, spec)
    print(f"\n{'=' * 30} GPU check{' REHEARSAL (CPU, tiny sizes)' if summary.get('rehearsal') else ''}: "
          f"{summary['device']} {'=' * 30}")
    print(f"{'stage':15}{'status':>9}{'wall s':>8}{'budget':>8}  what")
    for s in summary["stages"]:
        print(f"{s['stage']:15}{s['status']:>9}{fmt(s.get('wall_s'), '.1f'):>8}{s['budget_s']:>8.0f}  "
              f"{s.get('why') or s['what']}")
    if summary.get("backend_fallback"):
        print(summary["backend_fallback"])
    table = summary.get("table", [])
    mem = [r for r in table if r["what"] == "memory"]
    if mem:
        print(f"\n{'model':14}{'lever':17}{'method':18}{'peak GiB':>9}{'planner':>9}{'error':>8}{'<=10%':>6}"
              f"{'target':>7}{'s/step':>8}")
        for r in mem:
            err = r["planner_error"]
            ok = {True: "yes", False: "NO", None: "-"}[r["within_10pct"]]
            print(f"{r['model']:14}{r['lever']:17}{r['method']:18}{fmt(r['peak_gib'], '.3f'):>9}"
                  f"{fmt(r['planner_gib'], '.3f'):>9}{'-' if err is None else f'{100 * err:+.1f}%':>8}{ok:>6}"
                  f"{fmt(r['target_gib'], 'g'):>7}{fmt(r['s_per_step'], '.2f'):>8}"
                  + (f"  {r['error'][:60]}" if r.get("error") else ""))
            if r.get("streamed_layers"):
                link = r.get("pcie_s_at_link")
                kept = {True: "kept", False: "EXCEEDED", None: "not checked"}[r.get("within_budget")]
                print(f"{'':14}{r['streamed_layers']} layers streamed, {fmt(r['streamed_gib_per_step'], '.2f')} GiB "
                      f"a step: PCIe {fmt(r['pcie_s_at_25GBps'], '.2f')} s at 25 GB/s"
                      + (f", {link:.2f} s at the measured {r['link_gb_per_s']} GB/s" if link is not None else "")
                      + f"; budget {r['budget_gib']} GiB {kept}")
        checked = [r for r in mem if r["within_10pct"] is not None]
        if checked:
            print(f"planner within 10% of the measured peak: {sum(r['within_10pct'] for r in checked)} of "
                  f"{len(checked)} rows")
        elif summary.get("rehearsal"):
            print("planner vs peak: not compared on a CPU (peaks are process RSS, the planner estimates GPU bytes)")
    pool = [r for r in table if r["what"] == "pool-batched"]
    if pool:
        print(f"\npool-batched ({pool[0]['model']}): " + "; ".join(
            f"K={r['K']} batched/one {r['batched_over_one']:.2f} (target K=4 <= 1.6), seq/batched "
            f"{r['sequential_over_batched']:.2f}" for r in pool))
    kern = [r for r in table if r["what"] == "kernels"]
    if kern:
        print("\nkernels: " + "; ".join(
            f"{r['op']} {r['numel']:.0e} pool {r['pool']}: {r['qzo_ms']:.3f} ms"
            + (f", {r['fraction_of_copy']:.0%} of copy" if r.get("fraction_of_copy") is not None else "")
            + f", {fmt(r['speedup_vs_mezo'], '.1f')}x MeZO" for r in kern))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rehearse", action="store_true", help="every stage with a CPU form, at tiny sizes")
    ap.add_argument("--results", help="where the result files go (default benchmarks/results/gpu/, or a "
                    "temporary folder when rehearsing)")
    ap.add_argument("--copy-to", help="also copy the result files here after every stage (the device's $OUT)")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help=f"seconds for all stages (default {DEADLINE_S})")
    ap.add_argument("--only", help="comma-separated stage names (default: all)")
    args = ap.parse_args(argv)

    import torch

    if not args.rehearse and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on the lent GPU machine (see the docstring), or --rehearse here")
    results = Path(args.results) if args.results else (
        Path(tempfile.mkdtemp(prefix="qzo-gpu-check-rehearsal-")) if args.rehearse else HERE / "results" / "gpu")
    results.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("QZO_BENCH_RESULTS")
    os.environ["QZO_BENCH_RESULTS"] = str(results)  # before _common is imported (in-process stages read it)
    sys.path.insert(0, str(HERE))
    import _common

    if previous is None:
        del os.environ["QZO_BENCH_RESULTS"]  # subprocesses get it through run_stages' env
    else:
        os.environ["QZO_BENCH_RESULTS"] = previous
    stages = rehearsal_stages() if args.rehearse else gpu_stages()
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in stages})
        if unknown:
            raise SystemExit(f"unknown stages {unknown}; choose from {', '.join(s.name for s in stages)}")
        stages = [s for s in stages if s.name in names]
    meta = {"device": _common.device_name(), "rehearsal": args.rehearse, "deadline_s": args.deadline,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "versions": _versions()}
    if args.rehearse:
        meta["note"] = "CPU rehearsal at tiny sizes: checks that every stage runs, measures nothing owed"
    print(f"device: {meta['device']}; results: {results}; deadline {args.deadline:.0f} s", flush=True)
    copy_to = Path(args.copy_to) if args.copy_to else None
    if args.rehearse:
        with _process_state_restored(results):
            _common.RESULTS = results  # in-process stages: a process that imported _common before keeps its own
            # tiny shapes on a shared CPU: OpenMP's spin-waiting threads cost more than they give
            torch.set_num_threads(1)
            os.environ["OMP_NUM_THREADS"] = "1"
            summary = run_stages(stages, results, args.deadline, copy_to, meta)
    else:
        summary = run_stages(stages, results, args.deadline, copy_to, meta)
    print_table(summary)
    print(f"\nwrote {results / 'gpu_check.json'} in {summary.get('wall_s', 0):.0f} s")
    return summary


@contextlib.contextmanager
def _process_state_restored(results: Path):
    """What in-process stages change in this process (threads, environment, qzo's switches), put back after."""
    import torch

    import _common
    from qzo.noise import dispatch as backend
    from qzo.noise.passes import noise_cache

    threads, env, backend_name = torch.get_num_threads(), dict(os.environ), backend.get_backend()
    cache_bytes, common_results = noise_cache.max_bytes, _common.RESULTS
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(env)
        backend.set_backend(backend_name)
        noise_cache.max_bytes = cache_bytes
        _common.RESULTS = common_results


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "bitsandbytes", "transformers", "accelerate", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
