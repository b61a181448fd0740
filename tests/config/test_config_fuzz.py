"""Config fuzzing: every key set to hostile values ends in a ConfigError naming the key, never a traceback.

Each key is given values of the wrong type, out of range, empty, huge and odd (through
``--set``, parsed as YAML as the CLI does), and every unknown neighbour of a key name is
refused. A value either validates (it is a legal value of that key) or raises
:class:`qzo.errors.ConfigError` whose message names the key; anything else is a bug.
"""

import pytest

from qzo.config.schema import flat_keys, load_config
from qzo.errors import ConfigError

HOSTILE = ["abc", "''", "[]", "{}", "-1", "0", "1e30", "-1e30", ".nan", ".inf", "null", "true", "[1, x]",
           "{a: 1}", "99999999999999999999", "' '", "[[]]"]
# keys whose legal values include arbitrary strings or mappings: a string there is a value, not an error
FREE_TEXT = {"model.source", "data.train", "data.eval", "data.system_prompt", "out_dir", "model.offload_folder",
             "model.device_map", "objective.reward", "model.max_memory"}


@pytest.mark.parametrize("key", flat_keys())
def test_every_key_refuses_hostile_values_by_name(key):
    outcomes = []
    for raw in HOSTILE:
        try:
            load_config(None, [f"{key}={raw}"])
            outcomes.append("ok")
        except ConfigError as exc:
            # the key itself, or its section's rule (e.g. optim.split's range names all three keys)
            assert key in str(exc) or key.split(".")[-1] in str(exc), (key, raw, str(exc))
            outcomes.append("refused")
    if key not in FREE_TEXT:
        assert "refused" in outcomes, key  # a typed key takes not every one of these
    for raw in (".nan", ".inf", "-.inf"):  # no key takes a non-finite number
        if key not in FREE_TEXT:
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                load_config(None, [f"{key}={raw}"])


def test_unknown_neighbours_are_refused_with_the_valid_keys():
    for key in flat_keys():
        section, _, name = key.rpartition(".")
        for wrong in (f"{key}s", f"{key[:-1]}", f"{section}.{name.upper()}" if section else name.upper()):
            if wrong in flat_keys():
                continue
            with pytest.raises(ConfigError, match="unknown config key"):
                load_config(None, [f"{wrong}=1"])


def test_a_value_without_key_and_a_section_given_a_scalar():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="unknown config key 'optim'"):
        load_config(None, ["optim=3"])


def _component_settings():
    import inspect

    from qzo.config.schema import _GIVEN, COMPONENTS

    for where, family in COMPONENTS.items():
        for name, cls in family.items():
            for arg, p in inspect.signature(cls.__init__).parameters.items():
                if arg != "self" and arg not in _GIVEN.get(where, {}) and p.default is not inspect.Parameter.empty:
                    yield where, name, arg


@pytest.mark.parametrize("where,name,arg", list(_component_settings()))
def test_every_component_setting_refuses_hostile_values_by_name(where, name, arg):
    """A strategy's or rule's own settings (``optim.strategy.pool``) go through the same one error path."""
    for raw in HOSTILE:
        try:
            load_config(None, [f"{where}={name}", f"{where}.{arg}={raw}", "optim.noise_scale=null"])
        except ConfigError as exc:
            assert where in str(exc), (where, name, arg, raw, str(exc))
