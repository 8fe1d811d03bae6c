"""Cross-layer budget sharing: how many of the cache's slots each MoE layer gets.

An even split gives every layer the same number of slots, but layers do not route alike:
one spreads its tokens over many experts, another reuses a few. `share_slots` replays a
calibration trace (replay.py, hit counts only) at a few even quotas, reads each layer's
misses per quota (its miss curve) and hands the slots out one at a time to the layer whose
next slot saves the most misses (on each curve's lower convex hull, where handing out
slots one at a time is optimal). Each layer keeps at least top-k slots (a decode step
pins k experts of a layer at once).
"""
from __future__ import annotations

import heapq

import numpy as np

from edgert.projection.costmodel import CostModel, ModelShape
from edgert.projection.trace import RoutingTrace

_COUNT_ONLY = CostModel(read_latency_s=0.0, read_Bps=float("inf"), token_s=0.0, layer_s=0.0,
                        expert_s=0.0, hint_s=0.0)
GRID = 9    # even quotas replayed between top-k and all experts


def miss_curves(trace: RoutingTrace, shape: ModelShape, policy="lru",
                policy_options: dict | None = None, grid: int = GRID):
    """(quotas [G], misses [L, G]): each layer's demand misses at each even quota."""
    from edgert.projection.replay import project
    qs = sorted({int(q) for q in np.linspace(shape.top_k, shape.experts, grid).round()})
    misses = np.zeros((shape.layers, len(qs)))
    for j, q in enumerate(qs):
        st = project(trace, shape, _COUNT_ONLY, q * shape.layers, policy=policy,
                     policy_options=policy_options).stats["layers"]
        for i, l in enumerate(trace.layers):
            misses[i, j] = st[l]["misses"]
    return np.array(qs), np.minimum.accumulate(misses, axis=1)   # more slots never miss more


def share_slots(trace: RoutingTrace, shape: ModelShape, num_slots: int, policy="lru",
                policy_options: dict | None = None, grid: int = GRID) -> dict[int, int] | None:
    """Slots per layer summing to `num_slots`, or None when an even split is all there is
    (fewer than top-k slots per layer, or every expert fits)."""
    L, k, E = shape.layers, shape.top_k, shape.experts
    if num_slots < k * L or num_slots >= E * L:
        return None
    qs, misses = miss_curves(trace, shape, policy, policy_options, grid)
    full = np.arange(k, E + 1)
    # NOTE: greedy is optimal on convex curves; a flat stretch before a drop would stop it,
    # so each curve is replaced by its lower convex hull
    curve = np.stack([np.interp(full, *_lower_hull(qs, m)) for m in misses])   # [L, E - k + 1]
    gain = curve[:, :-1] - curve[:, 1:]                                 # saved by slot q+1
    alloc = [k] * L
    heap = [(-gain[i, 0], i) for i in range(L)]
    heapq.heapify(heap)
    for _ in range(num_slots - k * L):
        _, i = heapq.heappop(heap)
        alloc[i] += 1
        if alloc[i] < E:
            heapq.heappush(heap, (-gain[i, alloc[i] - k], i))
    return {l: a for l, a in zip(trace.layers, alloc)}


def _lower_hull(x: np.ndarray, y: np.ndarray):
    """The lower convex hull of the points (x, y), x ascending: its vertices' x and y."""
    hull: list[tuple[float, float]] = []
    for p in zip(x.tolist(), y.tolist()):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) <= 0:   # hull[-1] above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    hx, hy = zip(*hull)
    return np.array(hx), np.array(hy)
