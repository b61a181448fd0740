"""``qzo plot``: loss curves of one or more runs against forward passes, as a PNG.

Reads each run's ``metrics.jsonl``: the training loss of every step (light) with its moving
average (solid), and the held-out loss of evaluation steps (markers), all against the
forward passes spent (the cost measure of ZO training, comparable across strategies).
Several runs are overlaid, one colour each, named by their folder in the legend.

Needs the optional matplotlib (``pip install matplotlib`` or ``pip install qzo[plot]``);
drawing uses the Agg canvas directly, so no GUI backend or global pyplot state is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import QzoError

__all__ = ["plot_runs", "read_metrics", "write_run_plot", "moving_average"]

MATPLOTLIB_HINT = "qzo plot needs matplotlib: pip install matplotlib (or pip install 'qzo[plot]')"


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise QzoError(MATPLOTLIB_HINT) from None
    return matplotlib, Figure, FigureCanvasAgg


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``; :class:`QzoError` when it is not a run or has none yet."""
    from ..runs.reader import is_run_dir

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise QzoError(f"{str(run_dir)!r} is not a qzo run directory (no config.yaml / steps.jsonl); "
                       "pass folders a previous `qzo train` wrote")
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not rows:
        raise QzoError(f"run {str(run_dir)!r} has no metrics yet (metrics.jsonl is missing or empty)")
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start); same length as ``values``."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in run_dirs]  # two runs of the same folder name: the paths tell them apart


def plot_runs(run_dirs, out=None) -> Path:
    """Draw the runs' training and held-out loss against forward passes into the PNG ``out``.

    ``out`` defaults to ``RUN/loss.png`` for one run and ``loss-compare.png`` (current
    directory) for several. Written atomically; returns the path. Raises :class:`QzoError`
    without matplotlib, for a folder that is not a run, or a run without metrics.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise QzoError("qzo plot needs at least one run directory")
    matplotlib, Figure, FigureCanvasAgg = _matplotlib()
    runs = [read_metrics(d) for d in run_dirs]
    if out is None:
        out = run_dirs[0] / "loss.png" if len(run_dirs) == 1 else Path("loss-compare.png")
    out = Path(out)
    if not out.parent.is_dir():
        raise QzoError(f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist")

    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for i, (label, rows) in enumerate(zip(_labels(run_dirs), runs)):
        color = colors[i % len(colors)]
        train = [(r["forwards"], r["loss"]) for r in rows if r.get("loss") is not None]
        evals = [(r["forwards"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        if train:
            xs, ys = [x for x, _ in train], [y for _, y in train]
            window = max(1, min(50, len(ys) // 10))
            if window > 1:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, moving_average(ys, window), color=color, linewidth=1.8,
                        label=f"{label}: training loss (mean of {window} steps)")
            else:
                ax.plot(xs, ys, color=color, linewidth=1.2, label=f"{label}: training loss")
        if evals:
            ax.plot([x for x, _ in evals], [y for _, y in evals], color=color, marker="o", markersize=5,
                    linestyle="--", linewidth=0.9, label=f"{label}: held-out loss")
    ax.set_xlabel("forward passes")
    ax.set_ylabel("loss (per assistant token)")
    ax.set_title("qzo: loss against forward passes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def write_run_plot(run_dir, log=print) -> Path | None:
    """``RUN/loss.png`` at the end of ``qzo train``; ``None`` (silently) when matplotlib is not installed.

    The plot is a convenience: any other failure is logged as one line, never raised, so a
    finished run is never reported as failed because of its picture.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    try:
        path = plot_runs([run_dir], Path(run_dir) / "loss.png")
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log(f"qzo: could not draw loss.png ({type(exc).__name__}: {exc})")
        return None
    log(f"qzo: loss curves in {path}")
    return path
