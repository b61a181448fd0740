"""The import graph of the package: no cycle, an optimizer core that knows no model code, kernels that know no qzo.

Read from the source with ``ast`` (every import, the lazy ones inside functions included),
so a back-reference fails here the day it is written, not when it first causes an import
loop.
"""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the optimizer core: the loop, strategies, rules, the in-place passes, the noise and what they stand on
CORE = {"qzo.optim", "qzo.strategies", "qzo.rules", "qzo.perturb", "qzo.noise", "qzo.noise_native", "qzo.normalize",
        "qzo.schedule", "qzo.params", "qzo.errors", "qzo.distributed", "qzo.backend", "qzo.cache"}


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


def test_the_optimizer_core_imports_no_model_code():
    mods = _modules(ROOT / "qzo", "qzo")
    graph = _imports(mods)
    reached, todo = set(), ["qzo.optim"]
    while todo:
        for m in graph[todo.pop()]:
            if m not in reached:
                reached.add(m)
                todo.append(m)
    outside = {m for m in reached if m.startswith("qzo.") and not any(m == c or m.startswith(c + ".") for c in CORE)}
    assert outside == set(), f"qzo.optim reaches model-side modules: {sorted(outside)}"


def test_the_kernels_import_nothing_of_qzo():
    mods = _modules(ROOT / "qzo_kernels", "qzo_kernels")
    assert "qzo_kernels.perturb" in mods
    reaching = {m: sorted(t for t in targets if t.split(".")[0] == "qzo") for m, targets in _imports(mods).items()}
    assert {m: t for m, t in reaching.items() if t} == {}
