"""Every ``qzo.<name>`` the README and the examples use exists after a plain ``import qzo``.

Where names are taken from (nothing else counts, so file names and prose do not):

* README.md: its ```python blocks (parsed as Python) and its inline `code` spans in prose;
* examples/*.py: the code (parsed), and the ``literal`` spans of their docstrings.

A use is an attribute chain rooted at the name ``qzo`` (``qzo.replay.replay_sgd(...)`` is
``qzo.replay.replay_sgd``); ``from qzo.x import y`` is checked as an import. They are resolved
in a fresh interpreter that ran only ``import qzo``: in this process other tests import
submodules, which makes them attributes of the package and would hide a missing import.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"(?<!`)`((?:[^`\n]|\n(?!\n))+)`(?!`)")  # a single-backtick span (may wrap a line)
RST_LITERAL = re.compile(r"``([^`\n]+)``")
# qzo.<name>[.<name>...], not part of a longer word or path (`myqzo.x`, `dir/qzo.x`, `qzo_kernels`)
CHAIN = re.compile(r"(?<![\w./-])qzo((?:\.[A-Za-z_]\w*)+)(?![\w/-])")
FILE_SUFFIXES = {"yaml", "yml", "json", "jsonl", "py", "md", "toml", "txt", "png", "gguf", "safetensors", "log"}


def _text_chains(text: str) -> list[str]:
    """``qzo.a.b`` chains in a span of text; a file name (``qzo.yaml``) is none."""
    found = []
    for match in CHAIN.finditer(text):
        parts = match[1].lstrip(".").split(".")
        if parts[-1].lower() not in FILE_SUFFIXES:
            found.append("qzo." + ".".join(parts))
    return found


def _code_uses(source: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Attribute chains rooted at ``qzo`` and ``from qzo... import`` statements in Python code."""
    tree = ast.parse(source)
    chains, imports = [], []
    inner = set()  # the qzo.a inside qzo.a.b: only the longest chain counts
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                inner.add(id(value))
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "qzo":
                chains.append("qzo." + ".".join(reversed(parts)))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "qzo":
            imports.append((node.module, [a.name for a in node.names]))
    return chains, imports


def readme_uses(text: str):
    chains, imports = [], []
    prose = []
    last = 0
    for block in FENCE.finditer(text):
        prose.append(text[last:block.start()])
        last = block.end()
        if block[1] == "python":
            try:
                c, i = _code_uses(block[2])
            except SyntaxError:  # a sketch, not a program: its names still count
                c, i = _text_chains(block[2]), []
            chains += c
            imports += i
    prose.append(text[last:])
    for part in prose:
        for span in INLINE.finditer(part):
            chains += _text_chains(span[1])
    return chains, imports


def example_uses(source: str):
    chains, imports = _code_uses(source)
    docstrings = [ast.get_docstring(n) for n in ast.walk(ast.parse(source))
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))]
    for doc in filter(None, docstrings):
        for span in RST_LITERAL.finditer(doc):
            chains += _text_chains(span[1])
    return chains, imports


def _all_uses() -> dict[str, dict]:
    uses = {}
    for where, (chains, imports) in [("README.md", readme_uses(README.read_text()))] + [
            (f"examples/{p.name}", example_uses(p.read_text())) for p in EXAMPLES]:
        uses[where] = {"chains": sorted(set(chains)), "imports": imports}
    return uses


RESOLVE = r"""
import importlib, json, sys
import qzo
uses = json.load(sys.stdin)
bad = []
for where, u in uses.items():
    for chain in u["chains"]:
        obj = qzo
        for i, part in enumerate(chain.split(".")[1:], 1):
            if not hasattr(obj, part):
                bad.append(f"{where}: {chain}: {'.'.join(chain.split('.')[:i])} has no attribute {part!r}")
                break
            obj = getattr(obj, part)
    for module, names in u["imports"]:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            bad.append(f"{where}: from {module} import ...: {exc}")
            continue
        bad += [f"{where}: from {module} import {n}: no such name" for n in names if not hasattr(mod, n)]
print(json.dumps(bad))
"""


def test_the_scan_takes_names_and_leaves_the_rest():
    readme = (
        "Run `qzo train qzo.yaml` or `qzo.replay.replay_sgd`, `qzo_kernels.randn`, `dir/qzo.x`, `qzo.wrapped(a,\n"
        "b)`;\n"
        "```python\nimport qzo\nx = qzo.a.b(1).c + qzo.d\nfrom qzo.e import f\n```\n"
        "```bash\nqzo.bash_only\n```\n"
        "```\nqzo.output_only\n```\n"
        "plain prose qzo.not_code and ``qzo.double``\n"
    )
    chains, imports = readme_uses(readme)
    assert sorted(chains) == ["qzo.a.b", "qzo.d", "qzo.replay.replay_sgd", "qzo.wrapped"]
    assert imports == [("qzo.e", ["f"])]
    example = '"""Uses ``qzo.plan`` and qzo.prose; file ``qzo.yaml``."""\nimport qzo\nqzo.x.y()\nlocal.qzo.z\n'
    chains, _ = example_uses(example)
    assert sorted(chains) == ["qzo.plan", "qzo.x.y"]


def test_readme_and_examples_use_only_names_that_exist(tmp_path):
    uses = _all_uses()
    assert {"qzo.replay.replay_sgd", "qzo.LDSD", "qzo.objectives.RewardLoss"} <= set(uses["README.md"]["chains"])
    assert "qzo.plan" in uses["examples/offload_7b.py"]["chains"]
    assert sum(len(u["chains"]) for u in uses.values()) > 40
    # cwd outside the checkout: the names must resolve in the installed package, not in the source tree
    out = subprocess.run([sys.executable, "-c", RESOLVE], input=json.dumps(uses), capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    bad = json.loads(out.stdout.strip().splitlines()[-1])
    assert not bad, "names the docs use that `import qzo` does not provide:\n" + "\n".join(bad)
