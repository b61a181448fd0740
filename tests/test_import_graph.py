"""The import graph of the package: the folder rules of the house, no cycle, kernels that know no qzo.

Read from the source with ``ast`` (every import, the lazy ones inside functions included),
so a back-reference fails here the day it is written, not when it first causes an import
loop. The rules are the ones ``qzo/__init__.py``'s docstring draws.
"""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: package -> the qzo packages it must never import (lazily or not)
FORBIDDEN = {
    "zo": {"models", "data", "train", "runs", "cli", "config", "targets", "export", "hf"},
    "noise": {"zo", "models", "data", "train", "runs", "cli", "config", "targets", "export", "hf"},
    "train": {"cli", "hf"},
    "runs": {"train", "cli", "hf"},
    "models": {"train", "cli", "runs", "config", "export", "hf"},
    "config": {"train", "cli", "runs", "export", "hf"},
    "data": {"train", "cli", "runs", "hf"},
    "targets": {"train", "cli", "config", "export", "runs", "hf"},
    "export": {"train", "cli", "hf"},
    "hf": {"cli"},  # the Trainer bridge may use any part; only the CLI (and nothing below it) may use it
    "qzo": {"hf"},  # qzo/__init__.py: `import qzo` never imports the bridge (nor TRL through it)
}


def _modules(package_dir: Path, package: str) -> dict[str, Path]:
    mods = {}
    for path in package_dir.rglob("*.py"):
        parts = (package, *path.relative_to(package_dir).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the qzo modules it imports anywhere in its source."""
    graph = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                targets = subs if (node.module is None or subs) else [module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t.split(".")[0] in ("qzo", "qzo_kernels") and t != name}
    return graph


def _cycles(graph: dict[str, set[str]], nodes) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v in nodes and not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for n in sorted(nodes):
        if not state.get(n):
            visit(n)
    return found


def test_no_module_of_qzo_imports_one_that_imports_it_back():
    mods = _modules(ROOT / "qzo", "qzo")
    assert len(mods) > 40
    cycles = _cycles(_imports(mods), set(mods))
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "qzo" else parts[0]


def test_each_package_imports_only_what_lies_below_it():
    mods = _modules(ROOT / "qzo", "qzo")
    broken = sorted(f"{m} -> {t}" for m, targets in _imports(mods).items() for t in targets
                    if _package(t) in FORBIDDEN.get(_package(m), ()))
    assert broken == [], "\n".join(broken)


def test_the_folder_rules_catch_a_planted_back_reference(tmp_path):
    """The rule test reads real folders: a zo module that imports the loop is reported."""
    pkg = tmp_path / "qzo"
    (pkg / "zo").mkdir(parents=True)
    (pkg / "train").mkdir()
    (pkg / "zo" / "optim.py").write_text("def f():\n    from ..train.loop import train\n")
    (pkg / "train" / "loop.py").write_text("def train():\n    pass\n")
    graph = _imports(_modules(pkg, "qzo"))
    assert graph["qzo.zo.optim"] == {"qzo.train.loop"}
    assert _package("qzo.train.loop") in FORBIDDEN[_package("qzo.zo.optim")]


def test_only_the_noise_dispatch_imports_the_kernels():
    mods = _modules(ROOT / "qzo", "qzo")
    importers = sorted(m for m, targets in _imports(mods).items() if any(_package(t) == "qzo_kernels" for t in targets))
    assert importers == ["qzo.noise.dispatch"]


def test_the_top_level_holds_only_the_entry_points_and_the_leaves():
    files = sorted(p.name for p in (ROOT / "qzo").glob("*.py"))
    assert files == ["__init__.py", "__main__.py", "cache.py", "errors.py"]


def test_the_kernels_import_nothing_of_qzo():
    mods = _modules(ROOT / "qzo_kernels", "qzo_kernels")
    assert "qzo_kernels.perturb" in mods
    reaching = {m: sorted(t for t in targets if t.split(".")[0] == "qzo") for m, targets in _imports(mods).items()}
    assert {m: t for m, t in reaching.items() if t} == {}


def test_the_loop_knows_no_terminal_and_no_plot():
    """train/ draws no bar, no plot and prints nothing: the CLI passes a Progress and draws loss.png."""
    for path in sorted((ROOT / "qzo" / "train").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not imported & {"tqdm", "matplotlib"}, (path.name, imported & {"tqdm", "matplotlib"})
        prints = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print"]
        assert prints == [], f"{path.name} calls print at lines {prints}: pass a log callable"
