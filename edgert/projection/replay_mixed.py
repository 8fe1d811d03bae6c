"""Mixed precision projected: a routing trace replayed through the real `MixedExperts` (two
real expert caches, full precision and int4, in one byte budget) on a virtual clock.

The same virtual parts as replay.py (`VirtualClock`, one `VirtualStorage` both caches read
from, a `VirtualReader` per precision, `VirtualPool` slots); the driver makes the engine's
calls of `MoeLM._moe_mixed` per step and layer: the band (`precision_band`) splits the
selected experts, each precision's cache routes its own pairs, then acquires and releases
each expert in ascending id. Compute is charged per expert at its precision's cost (an int4
expert streams its copy's bytes; like the low-bit LRU rows, no dequantization is charged).
No prefetch: as the measured mixed contender (LRU, no hints).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .costmodel import CostModel, ModelShape
from ..experts.mixed import (
    DEFAULT_PRECISION_ALPHA,
    MixedExperts,
    precision_band,
    split_budget,
)
from .replay import (
    Projection,
    ReplayCache,
    VirtualClock,
    VirtualPool,
    VirtualReader,
    VirtualStorage,
    virtual_layout,
)
from .trace import RoutingTrace


def _cache(shape: ModelShape, slots: int, clock, disk, cost: CostModel, policy: str):
    layout = virtual_layout(shape)
    reader = VirtualReader(layout, clock, disk, cost.miss_s, cost.first_read_extra_s)
    return ReplayCache(reader, None, "projection", slots, policy=policy, prefetch=False,
                       pool=VirtualPool(layout.slot_bytes), hint_probe=None)


def project_mixed(trace: RoutingTrace, shape: ModelShape, cost: CostModel, budget_bytes: int,
                  low_bytes: int, low_expert_s: float,
                  alpha: float = DEFAULT_PRECISION_ALPHA, policy: str = "lru") -> Projection:
    """`trace` through a `MixedExperts` of `budget_bytes`, split as a load splits it
    (`split_budget`): full-precision experts of `shape.expert_bytes`, int4 copies of
    `low_bytes` computed in `low_expert_s` each. BudgetExceeded when the bytes do not hold
    top-k slots at each precision (as the load)."""
    hi, lo = split_budget(budget_bytes, shape.expert_bytes, low_bytes, shape.total_experts,
                          shape.top_k)
    clock, disk = VirtualClock(), VirtualStorage(cost)
    exact = _cache(shape, hi, clock, disk, cost, policy)
    low = _cache(replace(shape, expert_bytes=low_bytes), lo, clock, disk, cost, policy)
    mixed = MixedExperts(exact, low, alpha)
    try:
        return _drive(mixed, trace, clock, cost, low_expert_s)
    finally:
        mixed.close()


def _drive(mixed: MixedExperts, trace: RoutingTrace, clock: VirtualClock, cost: CostModel,
           low_expert_s: float) -> Projection:
    """The calls of `MoeLM._moe_mixed` for every step; the prefill (step 0) untimed."""
    tpot, stall = [], 0.0
    for s, rows in trace.step_rows():
        if s == 1:
            mixed.reset_stats()
            stall = 0.0
        t0 = clock.now
        clock.now += cost.token_s
        for i, layer in enumerate(trace.layers):
            clock.now += cost.layer_s
            probs = torch.from_numpy(trace.probs[rows, i])
            topk = torch.from_numpy(trace.topk[rows, i].astype(np.int64))
            band = precision_band(probs, topk, mixed.alpha)
            n_high = int(band.sum())
            mixed.note(n_high, band.numel() - n_high)
            for high in (True, False):
                tok, slot = torch.where(band == high)
                if tok.numel() == 0:
                    continue
                cache, ids = mixed.provider(high), topk[tok, slot]
                cache.route(layer, probs[tok], ids[:, None])
                clock.now += cost.route_s
                for e in sorted(set(ids.tolist())):
                    a = clock.now
                    cache.acquire(layer, [e])
                    if s > 0:
                        stall += clock.now - a
                    clock.now += cost.expert_s if high else low_expert_s
                    cache.release(layer, [e])
        if s > 0:
            tpot.append(clock.now - t0)
    return Projection(tpot, stall, mixed.stats())


def summary(p: Projection) -> dict:
    """`Projection.summary()` plus the share of expert computations done at int4."""
    out = p.summary()
    out["low_precision_share"] = p.stats.get("low_precision_share")
    return out
