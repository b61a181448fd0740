"""Resources checked before they are spent (issue 32): settings no machine's memory can hold are refused by
``qzo train`` naming the key and the number, before anything is allocated and before the run folder exists; a
system prompt longer than ``train.max_len`` is refused before the tokenizer sees it.

The sizes are far past any machine (terabytes), so the outcome does not depend on this one; the case that only the
tokenized data reveals is sized from this machine's memory and runs in a subprocess capped below it, so a
regression fails on an allocation error instead of filling the machine.
"""

import os
import subprocess
import sys
import time

import pytest

from qzo.errors import ConfigError
from qzo.train.loop import train

from helpers import run_overrides

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.mark.parametrize("sets,message", [
    ({"lora.r": 1_000_000_000}, r"^lora.r=1,000,000,000 cannot fit: a training step \(4 rows of any length, LoRA r "
                                r"1,000,000,000\) needs about [\d.,]+ TiB besides the weights"),
    ({"train.max_len": 10**7, "data.packing": "true"},
     r"^train.max_len=10,000,000 cannot fit: a training step \(4 rows x 10,000,000 tokens, LoRA r 4\)"),
    ({"train.batch_size": 10**9}, r"^train.batch_size=1,000,000,000 cannot fit"),
    ({"optim.strategy": "{name: gv, pool: 100000000}", "optim.batched": "true"},
     r"^optim.strategy.pool=100,000,000 cannot fit"),
])
def test_settings_no_machine_can_hold_are_refused_before_the_model_loads(tiny_model_dir, code_chats, tmp_path, sets,
                                                                          message):
    out = tmp_path / "run"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as info:
        train(None, run_overrides(tiny_model_dir, code_chats, out, **sets), **QUIET)
    assert time.perf_counter() - start < 30
    assert "qzo plan's estimate" in str(info.value) and "fits with the other settings as they are" in str(info.value)
    assert not out.exists()  # refused before the run folder was made


def test_a_system_prompt_longer_than_max_len_is_refused_before_tokenizing(tiny_model_dir, code_chats, tmp_path):
    prompt = "Be nice." * 112_500  # 900 KB: rendered three times into every example it would cost minutes
    sets = run_overrides(tiny_model_dir, code_chats, tmp_path / "run")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^data.system_prompt is 900,000 characters, at least 878 tokens: over "
                                          r"train.max_len=48 before any example begins"):
        train(None, [*sets, f"data.system_prompt={prompt}"], **QUIET)
    assert time.perf_counter() - start < 30


# A batch wide only once the data is tokenized: narrow rows fit (the look before the model loads sees rows of 2
# tokens), the data's rows do not. The batch is sized from this machine's memory.
WIDE = """
import resource, sys
from qzo.train.budget import machine_memory
from qzo.train.loop import train
memory, _ = machine_memory()
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a regression fails to allocate, not fills the machine
rows = memory // (2 * 768 * 4 * 4)  # the tiny model's 6 h + 3 i activations a token in float32: a 2-token row
try:
    train(None, sys.argv[1:] + [f"train.batch_size={rows}"], progress=False, log=lambda *_: None)
except Exception as exc:
    print(type(exc).__name__, exc, flush=True)
"""


def test_a_batch_the_tokenized_data_makes_too_wide_is_refused_before_a_step(tiny_model_dir, code_chats, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", WIDE, *run_overrides(tiny_model_dir, code_chats, out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # CUDA reserves more than the cap
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ConfigError train.batch_size="), done.stdout[-2000:]
    assert "cannot fit: a training step (" in done.stdout and " tokens, LoRA r 4)" in done.stdout
    assert not out.exists()


def test_an_ordinary_run_passes_the_check(tiny_model_dir, code_chats, tmp_path):
    summary = train(None, run_overrides(tiny_model_dir, code_chats, tmp_path / "run", **{"train.steps": 1}), **QUIET)
    assert summary["steps"] == 1
