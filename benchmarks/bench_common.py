"""What the benchmark scripts share: how they name the machine and how they end (JSON, table, PNG)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any
from pathlib import Path


def machine() -> str:
    """The CPU's model name and how many CPUs this process sees (each figure is stated with it)."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} CPUs"


def pyplot():
    """matplotlib's pyplot on the file-only backend (these machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(res: dict, out: Path, report: Callable[[dict], None], plot: Callable[[dict], Any],
           save: bool = True) -> None:
    """Save `res` as JSON at `out` (unless re-reading it), print the table, and save the figure
    `plot` draws as the PNG beside it."""
    if save:
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    report(res)
    fig = plot(res)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def on_off_plot(rows: list[dict], ylabel: str, title: str):
    """Rows of {"what", "batch", "on_over_off"} from an on/off A/B in one process: a line per
    "decode ..." series against the batch, a square for every other row (a single layer)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for what in sorted({r["what"] for r in rows if r["what"].startswith("decode")}):
        rs = [r for r in rows if r["what"] == what]
        ax.plot([r["batch"] for r in rs], [r["on_over_off"] for r in rs], "o-", label=what)
    for r in rows:
        if not r["what"].startswith("decode"):
            ax.plot([r["batch"]], [r["on_over_off"]], "s", label=f"{r['what']} layer")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="batch", ylabel=ylabel, title=f"{title} (lower is better)")
    ax.legend(fontsize=7)
    return fig
