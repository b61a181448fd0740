"""The shipped training recipes: ``qzo/recipes/<model>/<card>.yaml``, named ``<model>/<card>``.

``qzo train llama-3.1-8b-instruct/gpu-24gib`` runs one by name (``qzo recipes`` lists them,
with the model each trains and the card it is sized for); a path to a YAML file works as
before and wins over a recipe of the same name. ``smollm2-135m/demo`` is what ``qzo train``
with no config runs (``qzo.config.schema.DEMO_RECIPE``).

Why the YAML files live inside the package, as package data next to this module, and not
in a top-level ``configs/`` folder mapped in some other way: a wheel carries a package's
data files and nothing else of the checkout, and :func:`importlib.resources.files` finds
them wherever and however qzo is installed (site-packages, editable, zipped), so a name
resolves the same from a wheel as from the source tree. The alternatives are worse:
``data_files`` puts them under ``sys.prefix``, outside any package, where code can only
guess at them; a second ``package-dir`` mapping of ``configs/`` would make a folder that
is not a package look like one, and the checkout would no longer show where they ship.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING

import yaml

from ..errors import ConfigError

#: the model a recipe without ``model.source`` runs (``qzo.config.schema.DEFAULTS`` takes it from here)
DEMO_MODEL = "smollm2-135m"

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.abc import Traversable

__all__ = ["Recipe", "names", "find", "recipe", "recipes", "table"]

SUFFIX = ".yaml"


@dataclass(frozen=True)
class Recipe:
    """One shipped recipe: its name, file, the model it trains and the card it is sized for."""

    name: str  # <model>/<card>, what `qzo train NAME` takes
    path: Traversable
    model: str  # model.source in the file (the default's when the file leaves it out)
    card: str  # "24 GiB GPU", "CPU": from the header's first line


def _root() -> Traversable:
    return files(__name__)


def _order(name: str) -> list:
    """Sort key: numbers by value, so 7b comes before 13b and gpu-8gib before gpu-12gib."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def names() -> list[str]:
    """Every shipped recipe's name: by model, then by card size."""
    found = []
    for folder in _root().iterdir():
        if not folder.is_dir() or folder.name.startswith(("_", ".")):
            continue
        found += [f"{folder.name}/{f.name[:-len(SUFFIX)]}" for f in folder.iterdir()
                  if f.is_file() and f.name.endswith(SUFFIX)]
    return sorted(found, key=_order)


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"no shipped recipe {name!r}; the recipes are: {', '.join(names())} "
                       f"(`qzo recipes` shows each one's model and card)")


def find(name: str) -> Traversable:
    """The file of recipe ``name`` (``<model>/<card>``, ``.yaml`` optional); unknown: a ConfigError listing them."""
    key = str(name).removesuffix(SUFFIX)
    parts = key.split("/")
    if len(parts) != 2 or key not in names():
        raise _unknown(str(name))
    return _root() / parts[0] / (parts[1] + SUFFIX)


def _card(text: str) -> str:
    first = text.split("\n", 1)[0]
    match = re.search(r"(\d+) GiB GPU", first)
    if match:
        return f"{match[1]} GiB GPU"
    return "CPU" if "CPU" in first else "?"


def recipe(name: str) -> Recipe:
    """Recipe ``name`` with its model and card."""
    path = find(name)
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    model = (data.get("model") or {}).get("source")
    if model is None:
        model = DEMO_MODEL
    return Recipe(name=str(name).removesuffix(SUFFIX), path=path, model=model, card=_card(text))


def recipes() -> list[Recipe]:
    """Every shipped recipe, in the order of :func:`names`."""
    return [recipe(n) for n in names()]


def table() -> str:
    """What ``qzo recipes`` prints: one recipe a line, name, model and card."""
    rows = [("recipe", "model", "card")] + [(r.name, r.model, r.card) for r in recipes()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    lines.append("run one with `qzo train RECIPE` (no RECIPE: smollm2-135m/demo, the CPU demo)")
    return "\n".join(lines)
