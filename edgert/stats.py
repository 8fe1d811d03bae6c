"""Summaries of timing samples, one definition for stats() and the benchmarks."""
from __future__ import annotations

import numpy as np


def summary(xs) -> dict:
    """n, p10, p50, p90, p99, min, max of ``xs`` ({} when empty)."""
    if len(xs) == 0:
        return {}
    a = np.asarray(xs, dtype=float)
    p10, p50, p90, p99 = (float(v) for v in np.percentile(a, [10, 50, 90, 99]))
    return {"n": len(a), "p10": p10, "p50": p50, "p90": p90, "p99": p99,
            "min": float(a.min()), "max": float(a.max())}
