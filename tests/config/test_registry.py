"""One name -> class table per component kind: the config, the CLI and the planner read the same names."""

import pytest

import copy

from qzo.cli.main import _parser as build_parser
from qzo.config.schema import DEFAULTS, apply_overrides, component, merge_config, validate
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
    assert cfg["optim"]["rule"] == {"name": name}  # the name alone is the mapping with the name
    base, with_rule = plan("llama-2-7b"), plan("llama-2-7b", rule=name)
    assert with_rule.state == base.trainables * state_copies(name)
    assert state_copies(name) == {"sgd": 0, "sign": 0, "momentum": 1, "adam": 2, "sign_momentum": 1}[name]


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


@pytest.mark.parametrize("table,where", [(STRATEGIES, "optim.strategy"), (RULES, "optim.rule")])
def test_each_class_builds_from_its_name_and_takes_its_constructor_arguments_as_settings(table, where):
    """The constructor is the schema: every argument (but the rule's lr, optim.lr) is a setting, nothing else."""
    import inspect

    given = {"lr": 1e-3} if where == "optim.rule" else {}
    for name, cls in table.items():
        assert cls.name == name
        assert type(component(table, name, where, **given)) is cls
        defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                    if n not in ("self", *given) and p.default is not inspect.Parameter.empty}
        assert type(component(table, {"name": name, **defaults}, where, **given)) is cls
        with pytest.raises(ConfigError, match=rf"config key '{where}.no_such' is not a setting of {name}; its settings:"):
            component(table, {"name": name, "no_such": 1}, where, **given)


def test_a_class_registers_itself_under_its_name(monkeypatch):
    from qzo.zo.strategies.base import Strategy

    monkeypatch.setattr(Strategy, "registry", dict(Strategy.registry))  # leave the real table as it was

    class Mine(Strategy):
        name = "mine"

        def __init__(self, width: int = 2):
            self.width = width

    assert Strategy.registry["mine"] is Mine
    assert component(Strategy.registry, {"name": "mine", "width": 3}, "optim.strategy").width == 3
    with pytest.raises(ConfigError, match=r"'optim.strategy.width' must be a int \(like its default 2\), got 'x'"):
        component(Strategy.registry, {"name": "mine", "width": "x"}, "optim.strategy")


def test_a_flat_key_of_the_old_layout_names_its_new_spelling():
    for old, new in (("optim.pool", "optim.strategy.pool"), ("optim.cone_theta", "optim.strategy.theta"),
                     ("optim.momentum", "optim.rule.beta")):
        with pytest.raises(ConfigError, match=rf"config key '{old}' is now '{new}'"):
            apply_overrides(copy.deepcopy(DEFAULTS), [f"{old}=1"])
        section, key = old.split(".")
        with pytest.raises(ConfigError, match=rf"config key '{old}' is now '{new}'"):
            merge_config(copy.deepcopy(DEFAULTS), {section: {key: 1}})


def test_a_setting_can_be_set_on_a_component_named_by_a_string():
    cfg = apply_overrides(copy.deepcopy(DEFAULTS), ["optim.strategy=gv", "optim.strategy.pool=6"])
    assert validate(cfg)["optim"]["strategy"] == {"name": "gv", "pool": 6}


def test_a_constructor_refusal_is_reported_by_its_config_keys(monkeypatch):
    class Picky(STRATEGIES["fzoo"]):
        def __init__(self, probes=4, baseline="theta", batched=False):
            raise ValueError(f"probes {probes} is not to my liking")

    monkeypatch.setitem(STRATEGIES, "fzoo", Picky)
    cfg = copy.deepcopy(DEFAULTS)
    merge_config(cfg, {"optim": {"strategy": "fzoo"}})
    with pytest.raises(ConfigError, match=r"config key 'optim.strategy' \(fzoo\): probes 4 is not to my liking"):
        validate(cfg)


def test_optim_subsample_reaches_the_optimizer_and_is_checked():
    import qzo
    from qzo.config.build import build_optimizer
    from qzo.config.schema import load_config

    cfg = load_config(None, ["optim.subsample=0.25", "optim.noise_scale=null"])
    opt = build_optimizer(cfg, qzo.ParamSet([("w", __import__("torch").zeros(3))]))
    assert opt.subsample == 0.25
    with pytest.raises(ConfigError, match="optim.subsample"):
        load_config(None, ["optim.subsample=1.5"])
