"""Arena: extents, slot pools, leases, reclaim of cache, and the budget never passed."""
import gc
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert import BudgetExceeded
from edgert.config import DeviceConfig
from edgert.memory import Arena, Lease, SlotPool
from edgert.memory.arena import PAGE
from conftest import small_config

MiB = 1 << 20


def test_arena_is_total_minus_engine():
    cfg = small_config()                        # 4 MiB total, arena 2.25 MiB
    a = Arena(cfg)
    assert a.mapped == cfg.budget.total - cfg.budget.engine == 2 * MiB + 256 * 1024
    assert a.extra_allowance == cfg.budget.engine
    assert a.stats()["free_bytes"] == a.mapped


def test_slot_pools_of_different_geometry_do_not_overlap():
    a = Arena(small_config())
    small, big = SlotPool(a, "m1: blocks", 4096), SlotPool(a, "m2: experts", 3 * 4096 + 100)
    assert big.slot_size == 4 * 4096                       # rounded up to whole pages
    ids = small.alloc(3) + big.alloc(2) + small.alloc(1)
    views = [small.view(i) if i in small else big.view(i) for i in ids]
    for k, v in enumerate(views):
        assert v.ctypes.data % 4096 == 0
        v[:] = k + 1
    assert [int(v[0]) for v in views] == [1, 2, 3, 4, 5, 6]
    assert [int(v[-1]) for v in views] == [1, 2, 3, 4, 5, 6]      # no slot overlaps another
    st = a.stats()
    assert st["holders"]["m1: blocks"]["bytes"] == 4 * 4096
    assert st["holders"]["m2: experts"]["bytes"] == 8 * 4096
    assert st["in_use_bytes"] == 12 * 4096


def test_budget_exceeded_changes_nothing_and_names_holders():
    a = Arena(small_config())
    held = Lease(a, "tasks: task weights", 2 * MiB)
    p = SlotPool(a, "lm: kv pages", 64 * 1024)
    p.alloc(3)
    before = a.stats()["in_use_bytes"]
    with pytest.raises(BudgetExceeded) as e:
        p.alloc(2)                                # 1 fits, 2 do not: neither is kept
    assert a.stats()["in_use_bytes"] == before and p.count == 3
    assert "tasks: task weights 2.0 MiB" in str(e.value) and "lm: kv pages" in str(e.value)
    held.close()
    held.close()                                  # idempotent
    assert a.stats()["in_use_bytes"] == 3 * 64 * 1024


def test_free_runs_coalesce():
    a = Arena(small_config())
    leases = [Lease(a, "x", 256 * 1024) for _ in range(9)]        # the whole arena
    with pytest.raises(BudgetExceeded):
        Lease(a, "y", PAGE)
    for le in leases[2:5]:
        le.close()
    big = Lease(a, "y", 3 * 256 * 1024)           # three freed neighbours make one run
    assert big.first == leases[2].first


def test_cap_bounds_a_pool():
    a = Arena(small_config())
    p = SlotPool(a, "kv", 4096, cap=3 * 4096)
    p.alloc(3)
    with pytest.raises(BudgetExceeded, match="cap"):
        p.alloc(1)
    assert p.try_alloc() is None


def test_collected_pool_and_lease_give_memory_back():
    a = Arena(small_config())
    p = SlotPool(a, "p", 8192)
    p.alloc(5)
    le = Lease(a, "l", MiB)
    assert a.stats()["in_use_bytes"] == 5 * 8192 + MiB
    del p, le
    gc.collect()
    assert a.stats()["in_use_bytes"] == 0 and a.stats()["holders"] == {}


def test_charges_outside_the_arena():
    a = Arena(small_config())
    allowance = a.extra_allowance
    a.charge("session", allowance - 10)
    with pytest.raises(BudgetExceeded, match="memory.engine"):
        a.charge("other", 11)
    a.discharge("session")
    a.charge("other", 11)
    assert a.extra_in_use == 11 and a.extra_peak == allowance - 10


class ToyCache:
    """A reclaimable consumer: slots of one size, each with a last-use time."""

    def __init__(self, arena, label, slot, n):
        self.label, self.pool = label, SlotPool(arena, label, slot)
        self.last = {s: time.monotonic() for s in self.pool.alloc(n)}
        self.pinned: set[int] = set()
        arena.register(self)

    def reclaimable(self):
        pages = self.pool.slot_size // PAGE
        return [(s, pages, t) for s, t in self.last.items() if s not in self.pinned]

    def reclaim(self, slots):
        gone = [s for s in slots if s in self.last and s not in self.pinned]
        for s in gone:
            del self.last[s]
        self.pool.free(gone)
        return len(gone)


def test_reclaim_takes_least_recently_used_cache_first():
    a = Arena(small_config(weights="0 MiB", experts="1 MiB", kv="0 MiB", total="2 MiB"))
    old = ToyCache(a, "old", 64 * 1024, 8)            # 512 KiB, used first
    new = ToyCache(a, "new", 64 * 1024, 8)            # 512 KiB, used after
    p = SlotPool(a, "kv", 64 * 1024)
    p.alloc(3, reclaim=True)                          # arena full: takes 3 of old's slots
    assert len(old.last) == 5 and len(new.last) == 8
    with pytest.raises(BudgetExceeded):
        p.alloc(1, reclaim=False)                     # without reclaim: refused


def test_large_request_evicts_a_window_and_never_held_memory():
    a = Arena(small_config(weights="0 MiB", experts="1 MiB", kv="0 MiB", total="2 MiB"))
    c = ToyCache(a, "blocks", 4096, 256)              # the whole 1 MiB arena in 4 KiB slots
    c.pinned = set(list(c.last)[100:102])             # two held slots in the middle
    run = Lease(a, "weights", 512 * 1024)             # fits only beside the pinned ones
    assert not (run.first <= min(c.pinned) < run.first + 128)
    assert all(s in c.last for s in c.pinned)
    assert a.stats()["in_use_bytes"] <= a.mapped
    with pytest.raises(BudgetExceeded):               # no window without held pages
        Lease(a, "weights 2", 512 * 1024)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["slot", "lease", "free", "reclaim-lease"]),
                              st.integers(1, 40)), max_size=60))
def test_never_past_the_budget(ops):
    cfg = small_config()
    a = Arena(cfg)
    cache = ToyCache(a, "cache", 16384, 10)
    p = SlotPool(a, "p", 16384)
    leases = []
    for op, n in ops:
        try:
            if op == "slot":
                p.alloc(n % 7 + 1, reclaim=False)
            elif op == "lease":
                leases.append(Lease(a, "l", n * 4096, reclaim=False))
            elif op == "reclaim-lease":
                leases.append(Lease(a, "l", n * 16384, reclaim=True))
            elif p.count:
                p.free(list(p._ids)[: n % 5 + 1])
            elif leases:
                leases.pop().close()
        except BudgetExceeded:
            pass
        st_ = a.stats()
        used = p.in_use_bytes + sum(le.arena.extent_pages(le.first) * PAGE for le in leases
                                    if not le.closed) + cache.pool.in_use_bytes
        assert st_["in_use_bytes"] == used <= a.mapped
        assert a.in_use_bytes() <= cfg.budget.total
        # no page handed out twice
        spans = sorted([(s, a.extent_pages(s)) for s in list(p._ids) + list(cache.last)] +
                       [(le.first, a.extent_pages(le.first)) for le in leases])
        for (s0, n0), (s1, _) in zip(spans, spans[1:]):
            assert s0 + n0 <= s1


def test_a_cache_never_loses_more_than_its_cap():
    a = Arena(small_config(weights="0 MiB", experts="1 MiB", kv="0 MiB", total="2 MiB"))
    c = ToyCache(a, "experts", 64 * 1024, 16)          # the whole arena
    c.reclaim_cap = lambda: 4 * 16                      # keeps 12 of its 16 slots
    held = Lease(a, "weights", 4 * 64 * 1024)           # 4 slots' worth: allowed
    assert len(c.last) == 12
    c.reclaim_cap = lambda: 0
    with pytest.raises(BudgetExceeded):
        Lease(a, "more", 64 * 1024)
    assert len(c.last) == 12 and not held.closed


def test_busy_caches_are_asked_again():
    a = Arena(small_config(weights="0 MiB", experts="1 MiB", kv="0 MiB", total="2 MiB"))
    c = ToyCache(a, "blocks", 64 * 1024, 16)
    real, calls = c.reclaimable, []

    def busy_twice():
        calls.append(1)
        return None if len(calls) <= 2 else real()
    c.reclaimable = busy_twice
    Lease(a, "weights", 64 * 1024)                      # waits out two busy answers
    assert len(calls) >= 3 and len(c.last) == 15


def test_pages_are_backed_as_extents_are_handed_out():
    a = Arena(DeviceConfig.from_dict({"name": "p", "memory": {
        "total": "64 MiB", "engine": "0 MiB", "prefault": True}}))
    assert not a._touched.any()                      # nothing backed at start
    le = Lease(a, "x", MiB)
    assert a._touched[le.first:le.first + MiB // PAGE].all()
    assert a._touched.sum() == MiB // PAGE
