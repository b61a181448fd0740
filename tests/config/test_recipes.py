"""The shipped GPU recipes, ``qzo/recipes/<model>/gpu-<N>gib.yaml``, run as ``qzo train <model>/gpu-<N>gib``.

Each one's planned ZO-step peak fits the card its file name names, with headroom; bigger
cards buy something; every knob the peak depends on is set in the file itself (the defaults
are the CPU demo's) and commented; the header names the launch command and the ``qzo plan``
command that reproduces the memory number it quotes. All of it is planner arithmetic on
presets: no weights are read or downloaded. (That every config validates is in
test_config.py.) The recipes are read from the checkout's files here; that the package finds
the same files by name (``qzo.recipes``, ``qzo recipes``) is tested at the end.
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from qzo import recipes
from qzo.cli.main import main
from qzo.config.schema import DEFAULTS, component, load_config
from qzo.errors import ConfigError
from qzo.train.plan import PRESETS, GiB, parse_size, plan
from qzo.zo.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "qzo" / "recipes"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
GPU_RECIPES = sorted(CONFIGS.glob("*/gpu-*.yaml"))

# The planner leaves out the CUDA context and allocator slack: keep this much of the card free.
HEADROOM = GiB // 2

# Recipe folder -> the planner preset with the same shapes.
PRESET_OF = {
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama-2-7b-chat": "llama-2-7b",
    "llama-2-13b-chat": "llama-2-13b",
    "mistral-7b-instruct": "mistral-7b",
    "qwen2.5-7b-instruct": "qwen2.5-7b",
    "llama-3.1-70b-instruct": "llama-3.1-70b",
}

# What the planned peak depends on: a GPU recipe sets each of these itself, so a change of the
# (CPU demo) defaults cannot move its memory.
PLANNED_KEYS = ["model.quant", "model.double_quant", "model.dtype", "model.device_map", "model.max_memory",
                "lora.r", "lora.target_modules", "optim.strategy", "optim.rule",
                "train.batch_size", "train.max_len", "train.eval_batch_size"]
# Memory and speed knobs that must carry a comment on their line wherever a recipe sets them.
COMMENTED_KNOBS = ["batch_size", "max_len", "r", "pool", "batched", "device_map", "max_memory",
                   "double_quant", "dtype", "eval_batch_size", "quant", "strategy"]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _name(path: Path) -> str:
    """The recipe's name, what `qzo train` takes: <model>/<card>."""
    return path.relative_to(CONFIGS).with_suffix("").as_posix()


def _card(path: Path) -> int:
    match = re.fullmatch(r"gpu-(\d+)gib\.yaml", path.name)
    assert match, f"{_rel(path)}: GPU recipes are named gpu-<N>gib.yaml"
    return int(match.group(1)) * GiB


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _stacked(cfg: dict) -> int:
    """Candidates evaluated in one stacked forward (optim.batched), else 1."""
    o = cfg["optim"]
    if not o["batched"]:
        return 1
    strategy = component(STRATEGIES, o["strategy"], "optim.strategy")
    return getattr(strategy, strategy.pool_arg)


def _plan(path: Path, cfg: dict, gpu=None, evaluation=False):
    """The planned ZO step, or (``evaluation``) one held-out forward of eval_batch_size x max_len."""
    m, o, t = cfg["model"], cfg["optim"], cfg["train"]
    batch, pool = (t["eval_batch_size"], 1) if evaluation else (t["batch_size"], _stacked(cfg))
    return plan(PRESET_OF[path.parent.name], quant=m["quant"], gpu=gpu, batch=batch, seq=t["max_len"],
                lora_r=cfg["lora"]["r"], lora_targets=tuple(cfg["lora"]["target_modules"]), rule=o["rule"]["name"],
                strategy=o["strategy"]["name"], pool=pool, double_quant=m["double_quant"],
                embedding_on_cpu=m["embedding_on_cpu"], dtype=m["dtype"] or "bfloat16")  # null dtype is bfloat16 on CUDA


def _ids(paths):
    return [_rel(p) for p in paths]


def test_every_model_folder_has_gpu_recipes_and_a_preset():
    assert GPU_RECIPES
    folders = {p.parent.name for p in GPU_RECIPES}
    assert folders == set(PRESET_OF), "map each recipe folder to its planner preset in PRESET_OF"
    assert set(PRESET_OF.values()) <= set(PRESETS)
    for path in GPU_RECIPES:
        _card(path)


@pytest.mark.parametrize("path", GPU_RECIPES, ids=_ids(GPU_RECIPES))
def test_recipe_fits_its_card(path):
    cfg = load_config(path)
    card = _card(path)
    m, t = cfg["model"], cfg["train"]
    assert "/" in m["source"], "GPU recipes name a Hugging Face hub id"
    targets = cfg.get("targets", {"lora": True})
    assert targets["lora"] and not targets.get("scales") and not targets.get("dense"), \
        "the planner models LoRA trainables only"
    # Evaluation runs eval_batch_size x max_len in one plain forward, its loss a chunk at a time as in
    # training (qzo.data.dataset.eval_loss): no more rows than a training forward, and no higher planned peak
    # (a stacked pool takes its loss a candidate at a time, so all its rows in one eval forward would
    # gather more hidden states than the step does).
    assert t["eval_batch_size"] <= t["batch_size"] * _stacked(cfg)
    assert _plan(path, cfg, evaluation=True).total <= _plan(path, cfg).total
    if isinstance(m["device_map"], dict):
        assert not {"cpu", "disk"} & set(map(str, m["device_map"].values())), \
            "offload through device_map: auto + max_memory, which this test checks against the planner"
    if m["max_memory"] is None:
        p = _plan(path, cfg, gpu=card)
        assert p.fits and p.total + HEADROOM <= card, (
            f"{_rel(path)}: planned {p.total / GiB:.2f} GiB on a {card / GiB:.0f} GiB card; keep "
            f"{HEADROOM / GiB} GiB free\n{p.table()}")
        return
    # Offloading recipe: the planner (given the card less the headroom) must keep some layers on
    # the GPU, and max_memory must give at least what its advice asks for.
    assert m["device_map"] == "auto"
    assert set(m["max_memory"]) <= {0, "cpu", "disk"}, \
        "accelerate takes the GPU as the integer 0 ('cuda:0' is refused at load time)"
    p = _plan(path, cfg, gpu=card - HEADROOM)  # raises when even full offload does not fit
    if not p.fits:
        advice = re.search(r"max_memory: \{0: '([^']+)', cpu: '([^']+)'\}", p.table())
        assert advice, f"qzo.plan's offload advice changed its form; update this test:\n{p.table()}"
        assert parse_size(m["max_memory"][0]) >= parse_size(advice[1])
        assert parse_size(m["max_memory"].get("cpu", 0)) >= parse_size(advice[2])


def test_bigger_cards_buy_something():
    by_folder = {}
    for path in GPU_RECIPES:
        by_folder.setdefault(path.parent.name, []).append(path)
    for folder, paths in by_folder.items():
        paths.sort(key=_card)
        totals = [_plan(p, load_config(p)).total for p in paths]
        assert totals == sorted(set(totals)), (
            f"{folder}: each bigger card should run a bigger step; planned GiB "
            f"{[f'{x / GiB:.2f}' for x in totals]} for {[p.name for p in paths]}")


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_ids(ALL_CONFIGS))
def test_header_names_its_launch_command(path):
    assert f"qzo train {_name(path)}" in _header(path)


@pytest.mark.parametrize("path", GPU_RECIPES, ids=_ids(GPU_RECIPES))
def test_header_plan_command_reproduces_its_number(path, capsys):
    header = _header(path)
    assert re.search(rf"qzo train {re.escape(_name(path))} --set \S+=\S+", header), "an override example"
    command = re.search(r"^#\s+(qzo plan .+)$", header, re.M)
    quoted = re.search(r"-> total ([\d.]+) GiB", header)
    assert command and quoted, "the header quotes `qzo plan ...` and the total it prints"
    argv = shlex.split(command[1])[1:]
    assert main(argv) == 0
    printed = float(re.search(r"^total\s+([\d.]+) GiB", capsys.readouterr().out, re.M)[1])
    assert float(quoted[1]) == printed, f"the header says {quoted[1]} GiB; `{command[1]}` now prints {printed}"
    # ...and the command is this recipe's plan (same model, card, batch, length, r, pool, quant)
    cfg = load_config(path)
    assert f"--gpu {_card(path) // GiB}GiB" in command[1]
    assert round(_plan(path, cfg).total / GiB, 2) == printed


@pytest.mark.parametrize("path", GPU_RECIPES, ids=_ids(GPU_RECIPES))
def test_memory_knobs_are_set_and_commented(path):
    raw = yaml.safe_load(path.read_text())
    for dotted in PLANNED_KEYS:
        section, key = dotted.split(".")
        assert key in raw.get(section, {}), f"{_rel(path)} must set {dotted} itself (the defaults are the CPU demo's)"
    strategy = raw["optim"].get("strategy", "spsa")
    if strategy != "spsa":  # a pool strategy's recipe says how big the pool is and whether it is stacked
        pool_arg = STRATEGIES[strategy["name"]].pool_arg
        assert "batched" in raw["optim"] and pool_arg in strategy
    for line in path.read_text().splitlines():
        match = re.match(r"\s+(\w+):", line)
        if match and match[1] in COMMENTED_KNOBS:
            assert "#" in line, f"{_rel(path)}: explain {match[1]} in a comment on its line: {line.strip()!r}"


def test_the_package_finds_every_recipe_by_name():
    assert recipes.names() == sorted(map(_name, ALL_CONFIGS), key=recipes._order)
    for path in ALL_CONFIGS:
        found = recipes.find(_name(path))
        assert found.read_text() == path.read_text()
        assert recipes.find(_name(path) + ".yaml").read_text() == path.read_text()
        assert load_config(_name(path)) == load_config(path)  # what `qzo train NAME` loads


def test_a_file_path_wins_and_a_bad_name_lists_the_recipes(tmp_path, monkeypatch):
    # a file of the same name as a recipe, relative to cwd, is the file
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "demo").write_text("train:\n  steps: 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("smollm2-135m/demo")["train"]["steps"] == 3
    for bad in ["llama-3.1-8b-instruct/gpu-7gib", "gpu-8gib", "no/such/recipe"]:
        with pytest.raises(ConfigError, match=r"neither a file nor a shipped recipe.*llama-2-7b-chat/gpu-8gib"):
            load_config(bad)
        with pytest.raises(ConfigError, match=r"no shipped recipe.*smollm2-135m/demo"):
            recipes.find(bad)


def test_qzo_recipes_lists_name_model_and_card(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert list(rows) == recipes.names()
    for path in GPU_RECIPES:
        model, card = rows[_name(path)][0], " ".join(rows[_name(path)][1:])
        assert model == load_config(path)["model"]["source"]
        assert card == f"{_card(path) // GiB} GiB GPU"  # the header's card is the file name's
    assert rows["smollm2-135m/demo"] == [DEFAULTS["model"]["source"], "CPU"]
