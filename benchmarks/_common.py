"""Shared helpers for benchmarks: naming the machine, peak memory, writing results."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

# QZO_BENCH_RESULTS redirects results (dry runs of a benchmark must not touch the committed files).
RESULTS = Path(os.environ.get("QZO_BENCH_RESULTS", Path(__file__).parent / "results"))


def device_name() -> str:
    """A readable description of where the numbers were measured."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


class PeakMemory:
    """Peak memory inside a ``with`` block: CUDA peak allocated, or peak RSS on CPU.

    On Linux the kernel's own high-water mark is reset (``/proc/self/clear_refs`` = 5) and
    read back (``VmHWM``), which sees every page, including short spikes a sampler misses.
    Elsewhere a 1 ms sampling thread is the fallback.
    """

    def __enter__(self):
        self.peak_bytes = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self._hwm = _reset_hwm()
        if not self._hwm:
            import psutil

            self._stop = False
            proc = psutil.Process()

            def sample():
                while not self._stop:
                    self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self._hwm:
            self.peak_bytes = _read_hwm()
        else:
            self._stop = True
            self._thread.join()
        return False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _read_hwm() > 0
    except OSError:
        return False


def _read_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def first_order_adam(lora_params, lr: float) -> "torch.optim.AdamW":
    """AdamW over a ``qzo.lora`` set's factors for a first-order (QLoRA-way) baseline: ``qzo.lora`` freezes
    them, since ZO never needs autograd, so this switches their gradients back on."""
    trainable = [p.requires_grad_(True) for n, p in lora_params.peft_model.named_parameters() if "lora_" in n]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
