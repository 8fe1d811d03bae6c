"""The block cache has its own short lock: a task model busy with an inference never makes
another model's allocation fail while its spare (unpinned) blocks could give way, and a
pinned block is never taken."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from task_packs import assert_matches, config, tiny  # noqa: F401  (tiny is a fixture)

import edgert
from edgert.errors import BudgetExceeded

HOLD = 1.0   # seconds the owner's lock is held: five times the arena's reclaim wait


def _hold(lock: threading.RLock, taken: threading.Event, done: threading.Event) -> None:
    with lock:                            # what a long inference does to the model's lock
        taken.set()
        done.wait(HOLD)


def _full_of_spare_blocks(tiny):
    """A task model with every byte of the arena past its run held as spare blocks."""
    run = edgert.Runtime(config()).load(tiny.pack, prepack="off").switcher.run_bytes
    rt = edgert.Runtime(config(weights=2 * run + 64 * 1024))
    m = rt.load(tiny.pack, prepack="off")
    m.prewarm(tiny.names)
    for t in tiny.names:
        m.switch(t)
    assert rt.arena.stats()["free_bytes"] < run <= m.memory()["reclaimable_bytes"]
    return rt, m, run


def test_another_load_reclaims_spare_blocks_while_an_inference_holds_the_model(tiny, tmp_path):
    rt, m, run = _full_of_spare_blocks(tiny)
    taken, done = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(m._lock, taken, done))
    holder.start()
    try:
        assert taken.wait(5)
        other = rt.load(tiny.copy_pack(tmp_path), prepack="off")   # needs the spare blocks
        assert holder.is_alive(), "the load only succeeded after the lock was released"
    finally:
        done.set()
        holder.join()
    assert m.switcher.cache.counters.reclaimed > 0
    assert_matches(other.run({"image": tiny.x})["logits"], tiny.ref[tiny.names[0]])
    for t in tiny.names:                  # the busy model lost cache, not correctness
        assert_matches(m.run({"image": tiny.x}, task=t)["logits"], tiny.ref[t])


def test_pinned_blocks_survive_a_reclaim_while_the_model_is_busy(tiny):
    rt, m, run = _full_of_spare_blocks(tiny)
    cache = m.switcher.cache
    resident = list(cache._slot)
    pinned = resident[:len(resident) // 2]
    slots = cache.pin_resident(pinned)    # what a switch does to the blocks it copies from
    before = {h: cache.peek(h).copy() for h in pinned}
    taken, done = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(m._lock, taken, done))
    holder.start()
    try:
        assert taken.wait(5)
        # every slot-sized piece that may be taken: free memory, then the unpinned blocks
        slot = cache.pool.slot_size
        room = rt.arena.stats()["free_bytes"] // slot + cache.evictable
        got = [rt.arena.alloc("other: weights", slot) for _ in range(room)]
        with pytest.raises(BudgetExceeded):   # only pinned blocks are left: never taken
            rt.arena.alloc("other: weights", slot)
    finally:
        done.set()
        holder.join()
    assert len(got) == room and cache.evictable == 0 and cache.counters.reclaimed > 0
    for h, s in zip(pinned, slots):
        assert cache.contains(h) and cache._slot[h] == s
        np.testing.assert_array_equal(cache.peek(h), before[h])
    for h in pinned:
        cache.unpin(h)
