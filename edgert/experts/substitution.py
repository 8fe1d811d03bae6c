"""Lossy expert substitution (SMoE's band), as a pure function of one token's routing.

With S the (k+1)-th highest router probability of the token, a *selected* expert that is
not loaded and scores below (1+alpha)S may be replaced by a loaded *unselected* expert
scoring above (1-alpha)S: missing experts highest first, each taking the highest remaining
substitute, each substitute used once. Selected experts at or above (1+alpha)S are never
replaced, and nothing is replaced when alpha = 0. The engine weights a substitute's output
with the routing weight of the expert it replaces.
"""
from __future__ import annotations

import numpy as np


def substitute(p: np.ndarray, row: np.ndarray, loaded: np.ndarray, alpha: float) -> int:
    """Apply the band to `row` (the token's k selected experts, changed in place) given its
    probabilities `p` [E] and the `loaded` mask [E] (bool); returns how many were replaced.
    Ties in probability go to the lower position (of `row` for the missing experts, of the
    expert id for substitutes)."""
    k = len(row)
    if alpha <= 0 or k >= len(p):
        return 0
    S = float(np.partition(p, -(k + 1))[-(k + 1)])
    hi, lo = (1.0 + alpha) * S, (1.0 - alpha) * S
    pr = p[row]
    order = np.argsort(-pr, kind="stable")                       # selected, highest first
    missing = order[~loaded[row[order]] & (pr[order] < hi)]
    if missing.size == 0:
        return 0
    cand = loaded & (p > lo)
    cand[row] = False                                            # unselected only
    subs = np.flatnonzero(cand)
    if subs.size == 0:
        return 0
    subs = subs[np.argsort(-p[subs], kind="stable")]             # highest first
    n = min(missing.size, subs.size)
    row[missing[:n]] = subs[:n]
    return int(n)
