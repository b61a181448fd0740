"""Configs that would spend minutes and gigabytes before any check (issue 32): YAML aliases that expand to hundreds
of millions of values, nesting past the recursion limit, integers past Python's digit limit, files of tens of
megabytes. Each is refused in milliseconds with one short ``error:`` line; no error prints more than a line of a bad
value, whatever the key and however large the value.
"""

import copy
import subprocess
import sys
import time

import pytest

from qzo.config.schema import DEFAULTS, _set, apply_overrides, flat_keys, load_config, merge_config, validate
from qzo.errors import ConfigError


def _bomb(levels: int = 9) -> str:
    """A nest of YAML aliases: each level repeats the one before 9 times (9**levels values in ~32 bytes a level)."""
    names = "abcdefghijklmnop"
    nest = ["&a [x,x,x,x,x,x,x,x,x]"]
    nest += [f"&{names[i]} [{','.join([f'*{names[i - 1]}'] * 9)}]" for i in range(1, levels)]
    return "[" + ",".join(nest) + "]"


ISSUE_BOMB = f"train:\n  steps: {_bomb()}\n"  # the issue's: 9**9 values in about 300 bytes


def test_the_alias_bomb_of_the_issue_is_refused_at_once_by_the_cli(tmp_path):
    assert len(ISSUE_BOMB) < 341
    config = tmp_path / "bomb.yaml"
    config.write_text(ISSUE_BOMB)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qzo", "train", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {config}: its YAML stands for over 10,000 values once its aliases (*name) "
                                   "are expanded (a config holds a few hundred); write the values out instead of "
                                   "nesting aliases")
    assert time.perf_counter() - start < 60  # the interpreter's start; the refusal itself takes milliseconds


def test_the_alias_bomb_in_a_set_value_is_refused_too():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="^--set train.steps: its YAML stands for over 10,000 values"):
        load_config(None, [f"train.steps={_bomb(9)}"])
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("text,message", [
    ("train: {steps: &a [1, *a]}", "stands for over 10,000 values"),  # an alias inside its own anchor
    ("train: {steps: " + "[" * 5000 + "]" * 5000 + "}", "nests too deep for qzo to read"),
    ("train: {steps: " + "7" * 5000 + "}", "no config value needs a number that long"),
    ("optim: {lr: " + "7" * 400 + "}", "no config value needs a number that long"),  # float() of it would overflow
    ("train: {steps: [" + ", ".join(["&x " + "y" * 100] + ["*x"] * 200) + "]}", "config key 'train.steps' must be int"),
])
def test_hostile_yaml_is_one_short_error(tmp_path, text, message):
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(config)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


def test_a_50_mb_system_prompt_is_refused_before_it_is_parsed_naming_the_key(tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text("data:\n  system_prompt: " + "You are nice. " * (50 * 2**20 // 14) + "\ntrain:\n  steps: 3\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"over the 1 MiB qzo reads \(a config is a few KB\): its value "
                                          r"data.system_prompt alone is 52,428,\d+ characters; shorten it"):
        load_config(config)
    assert time.perf_counter() - start < 10  # the pure-Python parser took 35 s on it
    with pytest.raises(ConfigError, match="^--set data.system_prompt: the value is 2,097,152 characters"):
        apply_overrides(copy.deepcopy(DEFAULTS), ["data.system_prompt=" + "x" * 2**21])


HUGE = {"a string": "x" * 10**6, "a list": ["x"] * 10**6, "a dict": {f"k{i}": [i] for i in range(10**5)},
        "a nested list": [[[["deep"] * 1000] * 1000]], "a list of big ints": [10**5000] * 3}


@pytest.mark.parametrize("what", list(HUGE))
def test_no_error_prints_more_than_a_line_of_a_bad_value(what):
    """Every key of the schema given a huge value: whatever the check that refuses it, its message is short."""
    value = HUGE[what]
    refused = 0
    for key in flat_keys():
        cfg = copy.deepcopy(DEFAULTS)
        _set(cfg, key, value)
        try:
            validate(cfg)
        except ConfigError as exc:
            refused += 1
            assert "\n" not in str(exc) and len(str(exc)) < 700, (key, str(exc)[:300])
    assert refused > 10
    for bad in ({"x" * 10**6: 1}, {"train": value}, {"optim": {"strategy": {"name": "gv", "pool": value}}}):
        with pytest.raises(ConfigError) as info:
            cfg = copy.deepcopy(DEFAULTS)
            merge_config(cfg, bad)
            validate(cfg)
        assert "\n" not in str(info.value) and len(str(info.value)) < 700
