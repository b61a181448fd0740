"""Throughput of qzo's in-place noise ops against memory bandwidth and against MeZO's approach.

Rows, each naming its device and backend:

* perturb    ``x += sum_j a_j z(s_j)`` over one tensor of 1e5 .. 1e9 elements, pool 1 and 4:
             GB/s (bytes of x read and written / time) and the fraction of the device's
             copy bandwidth (a same-size ``y.copy_(x)``, measured in the same run).
* mezo       MeZO's own code for the same pool: per seed ``torch.manual_seed`` +
             ``torch.normal`` into a temporary + ``add_`` (what MeZO and its forks do per
             parameter); speedup = mezo time / qzo time.
* lora-7b    every LoRA A/B of Llama-2-7B (r 8 on q,v: 128 tensors of 32,768 values)
             perturbed with a pool of 4: qzo's one multi-tensor launch vs one launch per
             tensor vs MeZO's per-parameter loop; wall time per call, host work included.

* noise-cpu  generating ``n`` values of the contract's noise on the CPU: the compiled
             generator (``qzo.noise.randn``), the pure-torch reference
             (``qzo.noise.randn_reference``) and ``torch.normal`` (what the target is
             measured against: issue 15 asks for at most 2x its time per value), at torch's
             default thread count and at 1 thread. Runs on every machine.

Targets (issue 5, GPU): perturb >= 80% of copy bandwidth on large tensors; >= 5x MeZO for
a pool of 4; the 7B LoRA launch under 1 ms. On a machine without CUDA the same rows
measure the torch reference (the CPU path; the kernels only run there through Triton's
interpreter, which says nothing about speed), so the GPU rows stay owed until a GPU run.

    python benchmarks/kernel_throughput.py [--max-numel 1e9] [--repeats 5]

Prints the table and writes benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import device_name, write_result  # noqa: E402

from qzo.noise import dispatch as backend  # noqa: E402
from qzo.noise.passes import noise_cache, perturb_, perturb_params_  # noqa: E402
from qzo.zo.params import ParamSet  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SEEDS = [11, 22, 33, 44]
COEFS = [0.5, 0.5, -0.5, -0.5]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mezo_perturb(tensors: list[torch.Tensor], seeds, coefs) -> None:
    """MeZO's perturbation: reseed torch's global generator and draw a dense z per parameter."""
    for seed, coef in zip(seeds, coefs):
        torch.manual_seed(seed)
        for x in tensors:
            z = torch.normal(mean=0, std=1, size=x.size(), device=x.device, dtype=x.dtype)
            x.data.add_(z, alpha=coef)


def backend_label() -> str:
    if CUDA:
        return "triton"
    from qzo.noise import native as noise_native

    return "cpu (compiled noise)" if noise_native.available() else "torch-reference"


def single_tensor_rows(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for numel in sizes:
        x = torch.zeros(numel, device=DEVICE)
        y = torch.empty_like(x)
        copy_s = timed(lambda: y.copy_(x), repeats)
        copy_gbs = 2 * x.numel() * 4 / copy_s / 1e9
        for pool in (1, 4):
            seeds, coefs = SEEDS[:pool], COEFS[:pool]
            qzo_s = timed(lambda: perturb_(x, 7, seeds, coefs), repeats)
            mezo_s = timed(lambda: mezo_perturb([x], seeds, coefs), repeats)
            gbs = 2 * numel * 4 / qzo_s / 1e9
            rows.append(dict(device=device_name(), backend=backend_label(), op="perturb", numel=numel, pool=pool,
                             dtype="float32", qzo_s=qzo_s, gb_per_s=round(gbs, 2),
                             copy_gb_per_s=round(copy_gbs, 2), fraction_of_copy=round(gbs / copy_gbs, 3),
                             mezo_s=mezo_s, speedup_vs_mezo=round(mezo_s / qzo_s, 2)))
            print_row(rows[-1])
        del x, y
    return rows


def lora_7b_rows(repeats: int, layers: int = 32) -> list[dict]:
    """All LoRA tensors of Llama-2-7B with r 8 on q_proj and v_proj: 32 layers x 2 modules x (A, B)."""
    hidden, r = 4096, 8
    tensors = []
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors.append((f"{prefix}.lora_A.weight", torch.zeros(r, hidden, device=DEVICE)))
            tensors.append((f"{prefix}.lora_B.weight", torch.zeros(hidden, r, device=DEVICE)))
    params = ParamSet(tensors)
    seeds, coefs = SEEDS, COEFS
    one_launch_s = timed(lambda: perturb_params_(params, seeds, coefs), repeats)
    per_tensor_s = timed(lambda: [perturb_(t.tensor, t.stream, seeds, coefs) for t in params], repeats)
    mezo_s = timed(lambda: mezo_perturb([t.tensor for t in params], seeds, coefs), repeats)
    row = dict(device=device_name(), backend=backend_label(), op="lora-7b", numel=params.numel, pool=4,
               tensors=len(params), dtype="float32", qzo_s=one_launch_s, per_tensor_launches_s=per_tensor_s,
               mezo_s=mezo_s, speedup_vs_mezo=round(mezo_s / one_launch_s, 2), target_s=1e-3)
    print_row(row)
    return [row]


HEADER = f"{'op':9}{'numel':>12}{'pool':>5}{'qzo ms':>10}{'GB/s':>9}{'copy GB/s':>11}{'of copy':>9}{'MeZO ms':>10}{'x MeZO':>8}"


def print_row(r: dict) -> None:
    gbs = f"{r['gb_per_s']:.2f}" if "gb_per_s" in r else "-"
    copy = f"{r['copy_gb_per_s']:.1f}" if "copy_gb_per_s" in r else "-"
    frac = f"{r['fraction_of_copy']:.0%}" if "fraction_of_copy" in r else "-"
    print(f"{r['op']:9}{r['numel']:>12,}{r['pool']:>5}{r['qzo_s'] * 1e3:>10.3f}{gbs:>9}{copy:>11}{frac:>9}"
          f"{r['mezo_s'] * 1e3:>10.3f}{r['speedup_vs_mezo']:>8.1f}", flush=True)
    if "per_tensor_launches_s" in r:
        print(f"{'':9}one launch per tensor instead: {r['per_tensor_launches_s'] * 1e3:.3f} ms "
              f"({r['tensors']} tensors); target {r['target_s'] * 1e3:g} ms", flush=True)


def noise_rows(repeats: int, numels=(10**6, 10**7)) -> list[dict]:
    """CPU noise generation: compiled vs reference vs ``torch.normal``, ns per value."""
    from qzo.noise import contract as noise, native as noise_native

    compiled = noise_native.available()
    rows = []
    default_threads = torch.get_num_threads()
    print(f"\nCPU noise (compiled generator {'in use' if compiled else 'UNAVAILABLE: ' + str(noise_native.load_error())})")
    print(f"{'threads':>8}{'numel':>12}{'compiled ns':>13}{'reference ns':>14}{'torch.normal ns':>17}"
          f"{'x normal':>10}{'ref/compiled':>14}")
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for numel in numels:
            normal_s = timed(lambda: torch.normal(0.0, 1.0, size=(numel,)), repeats)
            fast_s = timed(lambda: noise.randn(7, 3, numel), repeats) if compiled else float("nan")
            ref_s = timed(lambda: noise.randn_reference(7, 3, numel), max(1, repeats // 3))
            row = dict(device=device_name(), backend="cpu-compiled" if compiled else "torch-reference", op="noise-cpu",
                       threads=threads, numel=numel, compiled_s=fast_s, reference_s=ref_s, torch_normal_s=normal_s,
                       compiled_ns_per_value=round(fast_s / numel * 1e9, 3),
                       reference_ns_per_value=round(ref_s / numel * 1e9, 3),
                       torch_normal_ns_per_value=round(normal_s / numel * 1e9, 3),
                       ratio_to_torch_normal=round(fast_s / normal_s, 3), target_ratio=2.0,
                       reference_over_compiled=round(ref_s / fast_s, 1))
            rows.append(row)
            print(f"{threads:>8}{numel:>12,}{row['compiled_ns_per_value']:>13.2f}{row['reference_ns_per_value']:>14.2f}"
                  f"{row['torch_normal_ns_per_value']:>17.2f}{row['ratio_to_torch_normal']:>10.2f}"
                  f"{row['reference_over_compiled']:>14.1f}", flush=True)
    torch.set_num_threads(default_threads)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-numel", type=float, default=1e9 if CUDA else 1e7,
                    help="largest tensor (default 1e9 on CUDA, 1e7 on CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="rehearsal sizes (benchmarks/gpu_check.py --rehearse): one layer's LoRA, 1e4 noise values")
    args = ap.parse_args()
    backend.set_backend("auto")
    # every call regenerates its noise, as the kernels do: the CPU path's per-step noise cache
    # would otherwise serve repeats of the same seeds from memory
    noise_cache.max_bytes = 0
    sizes = [n for n in (10**5, 10**6, 10**7, 10**8, 10**9) if n <= args.max_numel]
    print(f"device: {device_name()}  backend: {backend_label()}  (float32, median of {args.repeats})")
    print(HEADER)
    rows = (single_tensor_rows(sizes, args.repeats) + lora_7b_rows(args.repeats, 1 if args.quick else 32)
            + noise_rows(args.repeats, (10**4,) if args.quick else (10**6, 10**7)))
    write_result("kernels.json", {"device": device_name(), "backend": backend_label(), "rows": rows,
                                  "targets": {"fraction_of_copy": 0.8, "speedup_vs_mezo_pool4": 5.0,
                                              "lora_7b_s": 1e-3, "noise_cpu_ratio_to_torch_normal": 2.0},
                                  "note": "CPU perturb rows measure the CPU path (compiled noise + torch); GPU rows need a CUDA run"
                                  if not CUDA else "Triton kernels on CUDA"})
    print("wrote benchmarks/results/kernels.json")


if __name__ == "__main__":
    main()
