import numpy as np
import pytest

from edgert import BudgetExceeded, PackCorrupt
from edgert.memory import Arena
from edgert.pack import PackReader
from edgert.weights.block_cache import BlockCache
from conftest import small_config


def _cache(pack_path, slots):
    r = PackReader(pack_path, "direct")
    arena = Arena(small_config(weights=f"{slots * 4} KiB", experts="0 MiB", kv="0 MiB"))
    return BlockCache(arena, r, "test: blocks"), r


def test_hits_misses_and_bytes(pack_path):
    c, r = _cache(pack_path, 64)
    v = c.get(0)
    assert v[:r.blocks[0].length].tobytes() == r.read_block(0)
    c.get(0)
    assert (c.counters.hits, c.counters.misses) == (1, 1)
    assert c.counters.bytes_read == r.blocks[0].length
    assert c.pinned(r.blocks[0].hash) == 2


def test_lru_evicts_oldest_unpinned(pack_path):
    c, r = _cache(pack_path, 3)
    for i in (0, 1, 2):
        c.get(i, pin=False)
    c.get(0, pin=False)                 # 0 becomes most recent; 1 is now the oldest
    c.get(3, pin=False)
    assert not c.contains(r.blocks[1].hash)
    assert all(c.contains(r.blocks[i].hash) for i in (0, 2, 3))
    assert c.counters.evictions == 1


def test_pinned_blocks_are_never_evicted(pack_path):
    c, r = _cache(pack_path, 2)
    c.get(0)                            # pinned
    c.get(1, pin=False)
    c.get(2, pin=False)                 # evicts 1, not 0
    assert c.contains(r.blocks[0].hash) and not c.contains(r.blocks[1].hash)
    c.get(2)                            # pin 2 too: nothing evictable
    with pytest.raises(BudgetExceeded):
        c.get(3)
    assert not c.prefetch(3)
    c.unpin(r.blocks[0].hash)
    c.get(3, pin=False)
    assert not c.contains(r.blocks[0].hash)


def test_put_copies_without_reading(pack_path):
    c, r = _cache(pack_path, 4)
    data = np.frombuffer(r.read_block(2), np.uint8)
    v = c.put(2, data)
    assert v is not None and v[:len(data)].tobytes() == data.tobytes()
    assert c.counters.bytes_read == 0 and c.counters.inserts == 1
    c.get(2)
    assert c.counters.hits == 1


def test_corrupt_block_frees_its_slot(pack_path):
    with PackReader(pack_path) as r:
        ent = r.blocks[1]
    with open(pack_path, "r+b") as f:
        f.seek(ent.offset + 7)
        f.write(b"\xff")
    c, r = _cache(pack_path, 4)
    held_before = c.pool.count
    with pytest.raises(PackCorrupt, match="block 1"):
        c.get(1)
    assert c.pool.count == held_before and not c.contains(ent.hash)
    c.get(0)                            # the cache still works for other blocks
