"""How a ZO step travels through the package: modules it enters and frames from ``ZO.step`` to the kernel launch.

Issue 30 asks for a step that goes one way (``ZO.step -> strategy -> probe -> noise passes ->
dispatch -> kernel``) with the Triton launch within 5 frames of ``ZO.step``. This measures it
on any machine: the Triton kernels run through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before triton is imported), and a profiler hook records

    modules per step     qzo source files a function of which runs during one SPSA / LDSD step
    frames to kernel     call frames between ``ZO.step`` and ``qzo_kernels.perturb.perturb_many``
                         (the first fused noise pass of the step)
    top-level files      ``*.py`` files directly in ``qzo/``
    config lines         lines of the config schema and builders: ``qzo/config.py`` + ``qzo/components.py``,
                         or ``qzo/config/*.py`` (which also holds the bounded YAML reader)

Only the public API (``qzo.ZO``, ``qzo.SPSA``, ``qzo.LDSD``, ``qzo.set_backend``) is used, so the
same script measures an older checkout: ``python benchmarks/house.py --repo OLD_CHECKOUT`` runs
it on that tree (the baseline the note compares against). Output: ``results/house.json``.

    python benchmarks/house.py [--repo PATH] [--label NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure() -> dict:
    """Run in the process whose ``qzo`` is the tree to measure."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import qzo
    import qzo_kernels.perturb as kernels

    root = Path(qzo.__file__).parent
    qzo.set_backend("triton")
    out = {"qzo": str(root)}
    for name, strategy in (("spsa", lambda: qzo.SPSA()), ("ldsd", lambda: qzo.LDSD(candidates=2))):
        x = torch.zeros(1000)
        opt = qzo.ZO([("w", x)], strategy=strategy(), rule=qzo.SGD(lr=1e-3), eps=1e-2)
        depth = {}
        launch = kernels.perturb_many

        def spy(*args, **kwargs):
            if "frames" not in depth:
                frame, n = sys._getframe(1), 0
                while frame is not None and frame.f_code.co_name != "step":
                    frame, n = frame.f_back, n + 1
                depth["frames"] = n
            return launch(*args, **kwargs)

        kernels.perturb_many = spy
        opt.step(lambda: (x * x).sum())  # warm-up: imports and compilation are not the step
        entered: set[str] = set()

        def profile(frame, event, arg):
            if event == "call":
                path = Path(frame.f_code.co_filename)
                if root in path.parents:
                    entered.add(str(path.relative_to(root)))

        depth.clear()
        sys.setprofile(profile)
        try:
            opt.step(lambda: (x * x).sum())
        finally:
            sys.setprofile(None)
            kernels.perturb_many = launch
        out[name] = {"modules_per_step": len(entered), "modules": sorted(entered),
                     "frames_to_kernel": depth.get("frames")}
    # the schema and the builders: config.py + components.py before the config/ package held both
    flat = [root / "config.py", root / "components.py"]
    config = [p for p in flat if p.is_file()] or sorted((root / "config").glob("*.py"))
    out["top_level_files"] = len(list(root.glob("*.py")))
    out["config_lines"] = sum(len(p.read_text().splitlines()) for p in config)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", help="measure another checkout's qzo (its root folder); default: this one")
    ap.add_argument("--label", default=None, help="the row's name in the JSON (default: the repo's git HEAD)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    repo = Path(args.repo).resolve() if args.repo else HERE.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    env = dict(os.environ, PYTHONPATH=str(repo), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], cwd=repo, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    label = args.label or head
    print(f"{'tree':<12} {'top-level files':>15} {'config lines':>12} {'SPSA modules':>12} {'SPSA frames':>11} "
          f"{'LDSD modules':>12} {'LDSD frames':>11}")
    print(f"{label:<12} {row['top_level_files']:>15} {row['config_lines']:>12} {row['spsa']['modules_per_step']:>12} "
          f"{row['spsa']['frames_to_kernel']:>11} {row['ldsd']['modules_per_step']:>12} "
          f"{row['ldsd']['frames_to_kernel']:>11}")
    results = Path(os.environ.get("QZO_BENCH_RESULTS", HERE / "results"))
    path = results / "house.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[label] = {k: v for k, v in row.items() if k != "qzo"}
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
