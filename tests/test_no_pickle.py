"""No pickle is ever loaded from a run, a checkpoint or a model folder; trust_remote_code stays off by default.

The audit (every ``torch.load`` and pickle use in the package, by the AST, so that a new one
fails here until it is looked at): qzo has no ``torch.load``, imports no pickle module, and
calls no ``numpy.load``. The one pickle use is ``torch.distributed.broadcast_object_list`` in
``qzo/zo/distributed.py`` (``Distributed.from_rank0``): rank 0 sends the other ranks of one job a
path string in memory (never a file). Then a run is resumed, evaluated and loaded with every unpickler patched to fail, so
nothing on those paths unpickles at run time either (transformers and safetensors included).
"""

import ast
import pickle
from pathlib import Path

import pytest
import torch

import qzo
from qzo.config.schema import DEFAULTS, load_config
from qzo.runs.reader import load_run_model
from qzo.train.loop import train

from helpers import run_overrides, write_code_chats

PACKAGE = Path(qzo.__file__).parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pickletools"}
OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "recv_object_list", "send_object_list"}
# the audited exceptions: file -> names, each with why it is safe
ALLOWED = {"zo/distributed.py": {"broadcast_object_list"}}  # rank 0 -> the other ranks of one job: a path string, in memory


def _uses(path: Path) -> list[str]:
    """Unsafe or pickle-backed uses in one source file: ``torch.load`` without ``weights_only=True``, pickle imports,
    ``numpy.load``, object collectives."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if name == "load" and owner == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append("torch.load without weights_only=True")
            elif name == "load" and owner in ("np", "numpy"):
                found.append("numpy.load")
            elif name in OBJECT_COLLECTIVES:
                found.append(name)
    return found


def test_the_audit_sees_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch, numpy as np\nfrom dill import loads\n"
                   "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n"
                   "np.load('x', allow_pickle=True)\ndist.all_gather_object([], 1)\n")
    assert _uses(bad) == ["pickle", "dill", "torch.load without weights_only=True",
                          "torch.load without weights_only=True", "numpy.load", "all_gather_object"]


def test_no_pickle_in_the_package_source():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    found = {str(p.relative_to(PACKAGE)): set(_uses(p)) for p in files}
    found = {k: v - ALLOWED.get(k, set()) for k, v in found.items()}
    assert {k: v for k, v in found.items() if v} == {}


def test_trust_remote_code_is_off_by_default():
    import inspect

    assert DEFAULTS["model"]["trust_remote_code"] is False
    assert load_config(None)["model"]["trust_remote_code"] is False
    assert inspect.signature(qzo.load).parameters["trust_remote_code"].default is False
    from qzo import recipes

    for name in recipes.names():  # no shipped recipe turns it on
        assert load_config(name)["model"]["trust_remote_code"] is False, name


def test_the_readme_says_a_reward_function_runs_the_users_code():
    text = " ".join((PACKAGE.parent / "README.md").read_text().split())
    assert '`"module:function"` or `"file.py:function"` (which imports and runs that code' in text


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickler fails loudly while the test runs."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError("something unpickled")

    class Refusing(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse(*args)

    for mod in (pickle, __import__("_pickle")):
        monkeypatch.setattr(mod, "load", refuse)
        monkeypatch.setattr(mod, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    monkeypatch.setattr(torch, "load", refuse)
    return calls


def test_resume_eval_and_load_of_a_run_unpickle_nothing(tiny_model_dir, tmp_path, no_unpickling):
    data = write_code_chats(tmp_path)
    out = tmp_path / "run"
    # a pickle planted where a careless reader might look: the model folder and a checkpoint
    (tiny_model_dir / "pytorch_model.bin").write_bytes(b"not read")
    try:
        train(None, run_overrides(tiny_model_dir, data, out, **{"train.steps": 3}), progress=False,
              log=lambda *_: None)
        (out / "checkpoints" / "step-000003" / "optimizer.pt").write_bytes(b"not read")
        train(None, ["train.steps=6"], resume=out, progress=False, log=lambda *_: None)
        _, _, params, _ = load_run_model(out, "best")
        assert len(params) > 0
    finally:
        (tiny_model_dir / "pytorch_model.bin").unlink()
    assert no_unpickling == []
