"""One name -> class table per component kind: the config, the CLI and the planner read the same names."""

import pytest

import copy

from qzo.cli.main import _parser as build_parser
from qzo.config.schema import DEFAULTS, merge_config, validate
from qzo.errors import ConfigError
from qzo.train.plan import plan
from qzo.zo.rules import RULES, state_copies
from qzo.zo.strategies import STRATEGIES


def _plan_choices(dest: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["plan"]
    return list(next(a for a in sub._actions if a.dest == dest).choices)


def test_cli_offers_exactly_the_registered_names():
    assert _plan_choices("rule") == list(RULES)
    assert _plan_choices("strategy") == list(STRATEGIES)


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_is_a_config_value_and_planned_with_its_state(name):
    cfg = copy.deepcopy(DEFAULTS)
    merge_config(cfg, {"optim": {"rule": name}})
    cfg = validate(cfg)
    assert cfg["optim"]["rule"] == name
    base, with_rule = plan("llama-2-7b"), plan("llama-2-7b", rule=name)
    assert with_rule.state == base.trainables * state_copies(name)
    assert state_copies(name) == {"sgd": 0, "sign": 0, "momentum": 1, "adam": 2}[name]


def test_an_unregistered_rule_is_refused_by_key():
    with pytest.raises(ConfigError, match="optim.rule"):
        cfg = copy.deepcopy(DEFAULTS)
        merge_config(cfg, {"optim": {"rule": "lion"}})
        validate(cfg)


def test_quant_names_live_in_one_place():
    import importlib

    from qzo.models import bnb

    assert importlib.import_module("qzo.models.load").QUANTS is bnb.QUANTS  # qzo.models.load's public name is the same tuple
    assert _plan_choices("quant") == list(bnb.QUANTS)
    with pytest.raises(Exception, match="nf4, fp4, int8, none"):
        plan("llama-2-7b", quant="q4_k")


@pytest.mark.parametrize("table,kind", [(STRATEGIES, "strategy"), (RULES, "rule")])
def test_the_config_builds_each_component_from_its_config_keys(table, kind):
    """Every constructor argument a class names comes from an optim key, and the defaults build every class."""
    import inspect

    from qzo.config.build import build_strategy

    for name, cls in table.items():
        assert set(cls.config_keys.values()) <= set(DEFAULTS["optim"]), name
        assert set(cls.config_keys) <= set(inspect.signature(cls.__init__).parameters), name
        cfg = copy.deepcopy(DEFAULTS)
        merge_config(cfg, {"optim": {kind: name, "pool": 4}})
        built = build_strategy(cfg) if kind == "strategy" else cls.from_config(cfg["optim"])
        assert type(built) is cls


def test_a_constructor_refusal_is_reported_by_its_config_keys(monkeypatch):
    class Picky(STRATEGIES["fzoo"]):
        def __init__(self, probes=4, baseline="theta", batched=False):
            raise ValueError(f"probes {probes} is not to my liking")

    monkeypatch.setitem(STRATEGIES, "fzoo", Picky)
    cfg = copy.deepcopy(DEFAULTS)
    merge_config(cfg, {"optim": {"strategy": "fzoo"}})
    with pytest.raises(ConfigError, match=r"config keys 'optim.probes', 'optim.baseline', 'optim.batched' \(fzoo\): "
                                          r"probes 4 is not to my liking"):
        validate(cfg)
