"""ExpertSlots: which arena slot holds which expert, pins, per-layer quotas, eviction.

Mechanism only: the cache front (`cache.py`) decides what to load and when; this table
hands out slots and takes them back. Which expert leaves is the policy's choice
(`policies.py`).

Slots are partitioned per layer (see policies.py for why): layer l owns a quota of
`num_slots // L` (the first `num_slots % L` layers one more). A load into layer l evicts one of
l's own unpinned experts once l holds its quota. When l must pin more experts at once than its
quota (a prefill step; a budget of one slot per layer with top-2 routing) it borrows: a free
slot, else a victim from the layer furthest over its quota, else from any layer with an
unpinned expert. Borrowed slots flow back because an over-quota layer always evicts its own.
`BudgetExceeded` only when every slot is pinned.

Memory: the slots are a `SlotPool` of the table's own (one expert extent each), taken at
construction (which may reclaim other models' cache). Slots beyond the *minimum* that hold
no pinned expert are cache too: the arena may take them back for another model
(`reclaimable`/`reclaim`, least recently used first); the table then runs with fewer slots
and grows back into free memory on later misses. The minimum is
``max(2 * top_k, sparse layers)`` slots (capped by the budget): a routed step and a
prefetch can always both hold their experts.

NOTE: `cv` (a Condition) guards the table and everything the cache front keeps beside it.
Every method but `reclaimable`/`reclaim`/`resident`/`close` expects the caller to hold it; the
arena's two calls only *try* it, so a busy cache is skipped. A slot being read has
`ready=False`: never an eviction or reclaim candidate.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from edgert.errors import BudgetExceeded
from edgert.experts.api import ExpertLayout, ExpertWeights
from edgert.experts.policies import EvictionPolicy
from edgert.experts.stats import LayerCounters
from edgert.memory.arena import PAGE
from edgert.memory.slots import SlotPool


@dataclass
class Slot:
    """What one slot holds. A slot being read is neither `ready` nor `failed`."""
    layer: int
    expert: int
    ready: bool = False
    failed: bool = False   # its read failed; the slot went back to the free list
    pins: int = 0
    by_prefetch: bool = False   # read for a hint (its first use counts as prefetch_used)
    used: bool = False
    last: float = 0.0      # last acquire (time.monotonic), for the arena's reclaim order


class ExpertSlots:
    """`num_slots` arena slots of one expert each, a map (layer, expert) -> slot and quotas.

    `counters` are the cache's per-layer counters (shared; this table counts evictions and
    borrowed slots). BudgetExceeded before anything is held when the slots cannot be had.
    `where`, `info`, `ready` and `loading` are for reading under `cv`; they change only
    through the methods here.
    """

    def __init__(self, arena, label: str, layout: ExpertLayout, num_slots: int,
                 policy: EvictionPolicy, counters: dict[int, LayerCounters], pool=None,
                 quota: dict[int, int] | None = None):
        self.label, self.layout, self.policy, self.counters = label, layout, policy, counters
        self.layers = layout.moe_layers
        # other models' cache gives way first. `pool`: a SlotPool-like stand-in (the
        # projection's virtual slots, projection/replay.py) instead of arena memory.
        self.pool = pool = pool if pool is not None else SlotPool(arena, label, layout.slot_bytes)
        arena = pool.arena
        pool.alloc(num_slots, reclaim=True)
        self.num_slots = num_slots
        self.minimum = min(num_slots, max(2 * layout.top_k, len(self.layers)))
        # Weights views per slot, made on first use and kept: a slot's bytes change in
        # place on reload.
        self._views: dict[int, ExpertWeights] = {}
        base, extra = divmod(num_slots, len(self.layers))
        self.quota = {l: base + (i < extra) for i, l in enumerate(self.layers)}
        if quota is not None:   # shared across layers by the caller (`share_slots`)
            if set(quota) != set(self.layers) or sum(quota.values()) != num_slots or \
                    min(quota.values()) < 1:
                raise ValueError(f"quota must give every MoE layer >= 1 slot and sum to "
                                 f"{num_slots}, got {quota}")
            self.quota = {l: int(quota[l]) for l in self.layers}
        self.cv = threading.Condition()
        self._free = sorted(pool._ids)
        self.info: dict[int, Slot] = {}                   # slot -> what it holds
        self.where: dict[tuple[int, int], int] = {}       # (layer, expert) -> slot
        self._held = {l: {} for l in self.layers}          # layer -> {expert: slot}, = `where`
        self._count = {l: 0 for l in self.layers}          # slots held (loaded or loading)
        # NOTE: mirrors of `info` for route()'s hot path: loaded / being read, per layer and expert
        self.ready = np.zeros((layout.num_layers, layout.num_experts), dtype=bool)
        self.loading = np.zeros((layout.num_layers, layout.num_experts), dtype=bool)
        self.reclaimed = 0
        arena.register(self)

    def weights(self, slot: int) -> ExpertWeights:
        v = self._views.get(slot)
        if v is None:
            v = self._views[slot] = self.layout.views(self.pool.view(slot))
        return v

    # --- allocation (caller holds `cv`) ----------------------------------------------------
    def reserve(self, layer: int, spare: frozenset, prefetch: bool = False) -> int | None:
        """A slot for a new expert of `layer`, or None when the only way is to wait for a read
        in flight. `spare`: experts of `layer` not to evict; a prefetch never evicts them (nor
        pinned or loading experts) and never borrows; a demand evicts them only when the layer
        has no other candidate."""
        if not self._free and self.pool.count < self.num_slots:
            s = self._grow(reclaim=False)         # given back earlier: take it again if free
            if s is not None:
                self._free.append(s)
        if self._count[layer] < self.quota[layer] and self._free:
            return self._free.pop()
        if prefetch:
            own = self._candidates(layer, spare)
        else:  # demand: spare this step's routed experts (maybe read ahead) while others exist
            own = self._candidates(layer, spare) or self._candidates(layer, frozenset())
        if self._count[layer] >= self.quota[layer] and own:
            return self._evict(layer, own)
        if prefetch:
            return None
        if self._free:
            self.counters[layer].borrowed += 1
            return self._free.pop()
        lenders = sorted((l for l in self.layers if l != layer),
                         key=lambda l: self.quota[l] - self._count[l])  # furthest over quota first
        for l in lenders:
            cands = self._candidates(l, frozenset())
            if cands:
                self.counters[layer].borrowed += 1
                return self._evict(l, cands)
        if own:
            return self._evict(layer, own)
        if any(not i.ready and i.pins == 0 for i in self.info.values()):
            return None                            # a prefetch read will free up a candidate
        # NOTE: every slot is pinned (or loading for a pinned demand): a slot the arena took
        # back earlier, other models' cache giving way, before refusing
        s = self._grow(reclaim=True)
        if s is not None:
            self.counters[layer].borrowed += 1
            return s
        raise BudgetExceeded(f"expert slots: all {self.pool.count} are pinned "
                             f"(layer {layer} needs one more)", self.pool.slot_size, 0)

    def claim(self, slot: int, layer: int, e: int, pins: int, by_prefetch: bool) -> None:
        """`slot` (from `reserve`) now holds expert (layer, e), not yet read."""
        # NOTE: a claimed slot counts as used now, so a fresh prefetch is not the arena's
        # oldest cache (it would be reclaimed before acquire could use it)
        self.info[slot] = Slot(layer, e, pins=pins, by_prefetch=by_prefetch,
                               last=time.monotonic())
        self.where[(layer, e)] = slot
        self._held[layer][e] = slot
        self.loading[layer, e] = True
        self._count[layer] += 1

    def unclaim(self, slot: int) -> None:
        """The read into a claimed slot failed: mark it failed, free the slot, wake waiters."""
        info = self.info.pop(slot)
        info.failed = True
        del self.where[(info.layer, info.expert)]
        del self._held[info.layer][info.expert]
        self.loading[info.layer, info.expert] = False
        self._count[info.layer] -= 1
        self._free.append(slot)
        self.cv.notify_all()

    def mark_ready(self, slot: int) -> None:
        info = self.info[slot]
        info.ready = True
        self.ready[info.layer, info.expert], self.loading[info.layer, info.expert] = True, False

    def _candidates(self, layer: int, skip: frozenset) -> list[int]:
        info = self.info
        return [e for e, s in self._held[layer].items() if info[s].ready
                and info[s].pins == 0 and e not in skip]

    def _evict(self, layer: int, candidates: list[int]) -> int:
        """The policy's victim among `candidates` leaves; its slot."""
        e = self.policy.victim(layer, candidates)
        assert e in candidates, f"policy {self.policy.name} chose {e}, not a candidate"
        return self._drop(layer, e)

    def _drop(self, layer: int, e: int) -> int:
        slot = self.where.pop((layer, e))
        del self._held[layer][e]
        del self.info[slot]
        self.ready[layer, e] = False
        self._count[layer] -= 1
        self.counters[layer].evictions += 1
        self.policy.on_evict(layer, e)
        return slot

    def _grow(self, reclaim: bool) -> int | None:
        """A slot given back to the arena earlier, taken again (never past num_slots), or
        None. ``reclaim``: other models' cache may give way."""
        if self.pool.count >= self.num_slots:
            return None
        return self.pool.try_alloc(reclaim=reclaim)

    # --- queries and teardown (take `cv` themselves) ---------------------------------------
    def resident(self, layer: int) -> set[int]:
        with self.cv:
            return {e for e, s in self._held[layer].items() if self.info[s].ready}

    def close(self) -> None:
        """Give every slot back to the arena. Idempotent."""
        with self.cv:
            self.pool.arena.unregister(self)
            self.info.clear()
            self.where.clear()
            for held in self._held.values():
                held.clear()
            self._free = []
            self.ready[:] = False
            self.loading[:] = False
            self.pool.close()

    # --- the arena takes cache back ----------------------------------------------------------
    def reclaimable(self) -> list[tuple[int, int, float]] | None:
        """Free slots, then unpinned loaded experts by last use: every candidate, so the
        arena can choose the ones that open a contiguous run; `reclaim_cap` says how many
        it may take (the table keeps `minimum` slots)."""
        if not self.cv.acquire(blocking=False):
            return None                          # busy: the arena asks again in a moment
        try:
            if self.pool.count <= self.minimum:
                return []
            if any(not i.ready and not i.pins for i in self.info.values()):
                return None                      # a prefetch read in flight: soon reclaimable
            pages = self.pool.slot_size // PAGE
            idle = sorted((i.last, s) for s, i in self.info.items() if i.ready and i.pins == 0)
            return [(s, pages, 0.0) for s in self._free] + [(s, pages, t) for t, s in idle]
        finally:
            self.cv.release()

    def reclaim_cap(self) -> int:
        """Pages the arena may take at once: the slots above the minimum."""
        return max(0, self.pool.count - self.minimum) * (self.pool.slot_size // PAGE)

    def reclaim(self, slots: list[int]) -> int:
        if not self.cv.acquire(blocking=False):
            return 0
        try:
            gone = 0
            for s in slots:
                if self.pool.count <= self.minimum:
                    break
                if s in self._free:
                    self._free.remove(s)
                else:
                    info = self.info.get(s)
                    if info is None or not info.ready or info.pins:
                        continue
                    self._drop(info.layer, info.expert)
                self._views.pop(s, None)
                self.pool.free([s])
                gone += 1
            self.reclaimed += gone
            return gone
        finally:
            self.cv.release()
