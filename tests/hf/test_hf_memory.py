"""A ZOTrainer step's peak memory is the inference peak: measured as peak RSS on the CPU, in a process of its own.

What is measured (``memory_probe.py``): the rise of the resident set (VmHWM after ``/proc/self/clear_refs`` reset
it) during one no-grad forward of the trainer's loss, during one ZO training step on the same batch, and during
one first-order step (backward on the same LoRA adapters) for contrast. glibc's mmap threshold is pinned so that
freed tensors leave the resident set; without that, a phase after the first reads about 0 whatever it does. A
model a little larger than the tiny one (hidden 256, 4 layers, a batch of 8 x 256 tokens) makes the activations
tens of MiB, well above the noise of a Python process. Linux only (``/proc``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")


def test_a_zo_step_peaks_where_a_forward_does_and_a_backward_does_not(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer),
                         **{**TINY, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "memory_probe.py"), str(tmp_path / "model"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    mib = json.loads(out.stdout.strip().splitlines()[-1])
    assert mib["forward"] > 8, mib  # the probe sees a forward's activations (about 32 MiB here)
    # the ZO step: two forwards one after the other, the in-place passes, the step's noise (trainables-sized)
    assert mib["zo_step"] <= mib["forward"] + 2 * mib["trainables"] + 1.0, mib
    assert mib["first_order"] > 2 * mib["forward"], mib  # a backward keeps activations: the measure can tell
    assert mib["grads_left"] == 0 and mib["requires_grad"] == 0, mib
