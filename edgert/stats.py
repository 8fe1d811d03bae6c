"""Summaries of timing samples, one definition for stats() and the benchmarks."""
from __future__ import annotations

import numpy as np


def summary(xs) -> dict:
    """n, p50, p99, min, max of ``xs`` ({} when empty)."""
    if len(xs) == 0:
        return {}
    a = np.asarray(xs, dtype=float)
    return {"n": len(a), "p50": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "min": float(a.min()), "max": float(a.max())}
