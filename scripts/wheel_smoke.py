"""Smoke test of an installed (non-editable) qzo wheel; CI runs it after the tests (.ci/run).

Run it with the Python of the venv the wheel is installed in, from a folder outside the
checkout, so the source tree cannot be imported by accident::

    cd /tmp && /tmp/wheelvenv/bin/python /path/to/checkout/scripts/wheel_smoke.py

It checks that qzo and qzo_kernels come from site-packages, that every name in
``qzo.__all__`` exists, that the wheel carries every recipe of the checkout and the demo
data, and runs the entry point: ``qzo --help``, ``qzo recipes``, the ``qzo plan`` command
of each recipe's header (its quoted total must come out), ``qzo train`` with a bad recipe
name (one error line listing the recipes). Nothing is trained and no model is read.
Prints one line per check; exits non-zero at the first failure.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
QZO = Path(sys.executable).parent / "qzo"  # the console script of this venv


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail and not ok else ""), flush=True)
    if not ok:
        sys.exit(1)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(QZO), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def main() -> None:
    here = Path.cwd().resolve()
    check(f"cwd {here} is outside the checkout {CHECKOUT}", CHECKOUT not in (here, *here.parents))

    import qzo
    import qzo_kernels

    for module in (qzo, qzo_kernels):
        where = Path(module.__file__).resolve()
        check(f"{module.__name__} is imported from the installed wheel ({where.parent})",
              CHECKOUT not in where.parents and "site-packages" in where.parts)
    missing = [name for name in qzo.__all__ if not hasattr(qzo, name)]
    check(f"every name in qzo.__all__ exists ({len(qzo.__all__)} names)", not missing, f"missing {missing}")
    for sub in ("qzo.cli.main", "qzo.train.loop", "qzo.export.formats", "qzo.runs.reader", "qzo.config.build",
                "qzo.data.dataset", "qzo.targets.files", "qzo.models.load", "qzo.zo.rules", "qzo.zo.strategies",
                "qzo.noise.passes", "qzo.recipes"):
        importlib.import_module(sub)
    check("the subpackages and modules import", True)

    from qzo.noise import contract as noise, native as noise_native

    check("the wheel's C noise generator builds and matches the reference",
          noise_native.available() and bool(torch_equal(noise.randn(3, 4, 5001, offset=9),
                                                         noise.randn_reference(3, 4, 5001, offset=9))),
          str(noise_native.load_error()))

    from qzo import recipes
    from qzo.config.schema import load_config
    from qzo.data.dataset import read_chats

    in_checkout = sorted(p.relative_to(CHECKOUT / "qzo" / "recipes").with_suffix("").as_posix()
                         for p in (CHECKOUT / "qzo" / "recipes").glob("*/*.yaml"))
    check(f"the wheel carries every recipe of the checkout ({len(in_checkout)})",
          sorted(recipes.names()) == in_checkout, f"wheel {recipes.names()}, checkout {in_checkout}")
    check("the demo recipe by name equals the defaults (what `qzo train` runs)",
          load_config("smollm2-135m/demo") == load_config(None))
    check("the demo data ships (builtin:demo_train, builtin:demo_eval)",
          len(read_chats("builtin:demo_train")) > 0 and len(read_chats("builtin:demo_eval")) > 0)

    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        out = run("--help", cwd=cwd)
        check("qzo --help", out.returncode == 0 and "recipes" in out.stdout and "train" in out.stdout, out.stderr)

        out = run("recipes", cwd=cwd)
        listed = [line.split()[0] for line in out.stdout.splitlines()[1:-1]]
        check("qzo recipes lists each recipe, one a line", out.returncode == 0 and listed == recipes.names(),
              out.stdout + out.stderr)
        print("\n".join("     " + line for line in out.stdout.splitlines()))

        # each GPU recipe's header quotes a `qzo plan` command and the total it prints: the first
        # through the console script, the rest through qzo.cli.main in this process (seconds, not minutes)
        from qzo.cli.main import main as qzo_main

        gpu = [n for n in recipes.names() if "/gpu-" in n]
        for i, name in enumerate(gpu):
            header = recipes.find(name).read_text()
            command = re.search(r"^#\s+(qzo plan .+)$", header, re.M)[1]
            quoted = re.search(r"-> total ([\d.]+) GiB", header)[1]
            if i == 0:
                out = run(*shlex.split(command)[1:], cwd=cwd)
                code, stdout, stderr = out.returncode, out.stdout, out.stderr
                print("\n".join("     " + line for line in stdout.splitlines()))
            else:
                buffer = io.StringIO()
                with contextlib.redirect_stdout(buffer):
                    code = qzo_main(shlex.split(command)[1:])
                stdout, stderr = buffer.getvalue(), ""
            printed = re.search(r"^total\s+([\d.]+) GiB", stdout, re.M)
            how = "qzo" if i == 0 else "qzo.cli.main"
            check(f"{name}: `{command}` ({how}) prints its header's total {quoted} GiB",
                  code == 0 and printed is not None and printed[1] == quoted, stdout + stderr)

        out = run("train", "no-such-model/gpu-8gib", cwd=cwd)
        check("qzo train with a bad recipe name: exit 2, one error line listing the recipes",
              out.returncode == 2 and out.stderr.count("\n") == 1 and "llama-3.1-8b-instruct/gpu-24gib" in out.stderr,
              out.stderr)
    print("wheel smoke passed")


if __name__ == "__main__":
    main()
