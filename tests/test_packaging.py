"""What a wheel carries, checked from pyproject.toml without building one (CI builds it too).

``packages`` lists every package by name, so a new subpackage of qzo/ must be added there: these tests fail
until it is, and until every data file under qzo/ is matched by a ``package-data`` glob.
The shipped recipes are then found through the package, not through the checkout.
"""

from importlib.resources import files
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dir(package: str) -> Path:
    """Where setuptools reads ``package`` from (package-dir mappings, else its dotted path)."""
    mapping = SETUPTOOLS.get("package-dir", {})
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mapping:
            return ROOT / mapping[".".join(parts[:i])] / Path(*parts[i:])
    return ROOT / Path(*parts)


def _skipped(path: Path) -> bool:
    return "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo")


def test_every_subpackage_is_in_packages():
    packages = SETUPTOOLS["packages"]
    assert isinstance(packages, list), "packages is an explicit list (see pyproject.toml)"
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "qzo").rglob("__init__.py")
             if not _skipped(init)}
    assert {"qzo", "qzo.zo.rules", "qzo.zo.strategies", "qzo.recipes"} <= found
    missing = sorted(found - set(packages))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml, or the wheel lacks them"
    for package in packages:
        assert _package_dir(package).is_dir(), f"{package}: no folder {_package_dir(package)}"


def test_nothing_is_named_kernels():
    """A ``kernels`` package, or a ``kernels`` file or folder at the root or beside a script (each is first on
    ``sys.path`` for ``python -m`` / ``python benchmarks/X.py``), shadows Hugging Face's ``kernels``, which
    transformers imports while reading a Llama config: the GGUF conversion then fails."""
    assert "qzo_kernels" in SETUPTOOLS["packages"]
    assert not any(p == "kernels" or p.startswith("kernels.") for p in SETUPTOOLS["packages"]), \
        "a top-level `kernels` would shadow Hugging Face's kernels package"
    for folder in (ROOT, ROOT / "benchmarks", ROOT / "examples", ROOT / "scripts", ROOT / "tests"):
        clashes = [p.name for p in folder.iterdir() if p.name in ("kernels", "kernels.py")]
        assert not clashes, f"{folder}/{clashes[0]} shadows Hugging Face's kernels package for scripts run from there"


def test_the_repo_root_on_sys_path_does_not_break_transformers():
    """``python -c`` from the root (the root first on sys.path) reads a Llama config: nothing here shadows a package
    transformers needs."""
    import subprocess
    import sys

    code = "from transformers import LlamaConfig; LlamaConfig(); import qzo_kernels, qzo; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_every_data_file_under_qzo_is_package_data():
    packages = SETUPTOOLS["packages"]
    shipped = set()
    for package, patterns in SETUPTOOLS.get("package-data", {}).items():
        assert package in packages, f"package-data for {package!r}, which is not in packages"
        for pattern in patterns:  # setuptools globs them in the package's folder
            shipped |= set(_package_dir(package).glob(pattern))
    data = [p for p in (ROOT / "qzo").rglob("*") if p.is_file() and p.suffix != ".py" and not _skipped(p)]
    assert any(p.suffix == ".yaml" for p in data) and any(p.suffix == ".jsonl" for p in data)
    missing = sorted(p.relative_to(ROOT).as_posix() for p in data if p not in shipped)
    assert not missing, f"not in any package-data glob of pyproject.toml, so not in the wheel: {missing}"


def test_recipes_are_found_through_the_package():
    from qzo import recipes

    in_checkout = sorted(p.relative_to(ROOT / "qzo" / "recipes").with_suffix("").as_posix()
                         for p in (ROOT / "qzo" / "recipes").glob("*/*.yaml"))
    assert in_checkout and sorted(recipes.names()) == in_checkout
    root = files("qzo.recipes")
    for name in recipes.names():
        model, card = name.split("/")
        assert (root / model / f"{card}.yaml").read_text() == recipes.find(name).read_text()
    assert "smollm2-135m/demo" in recipes.names()
