"""What every benchmark does with its result: JSON for `--json`, a plot outside `--quick`."""
from __future__ import annotations

import json
import os


def write_json(result: dict, path: str | None) -> None:
    """The raw figures (BENCHMARKS.md: per-repeat values) to ``path``, when asked."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


def pyplot():
    """matplotlib's pyplot on a file backend, or None (said once) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install edgert[plot]); no plot")
        return None
    return plt


def save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
