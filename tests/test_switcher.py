"""TaskSwitcher: bytes moved, dense views, prewarm, budget and corruption handling."""
from __future__ import annotations

import numpy as np
import pytest

from edgert.errors import BudgetExceeded, PackCorrupt, UnknownTask
from edgert.memory import Arena, SlotPool
from edgert.pack import PackReader
from edgert.pack.stats import switch_cost
from edgert.weights.switcher import TaskSwitcher
from task_packs import BLOCK, config, tiny  # noqa: F401  (tiny is a fixture)


def make(pack, weights="4 MiB", **kw):
    reader = PackReader(pack, "direct")
    arena = Arena(config(weights))
    return TaskSwitcher(reader, arena, "test", **kw), reader, reader.storage


def assert_views_are(sw, reader, task):
    """The switcher's views equal the task's tensors (read by a reader of its own, so the
    switcher's storage counters stay the switcher's)."""
    views = sw.tensors()
    with PackReader(reader.path) as ref:
        for name in ref.task(task):
            np.testing.assert_array_equal(views[name], ref.read_tensor(task, name), err_msg=name)


def run_bytes(tiny):
    sw, _, _ = make(tiny.pack)
    return sw.run_bytes


def test_cold_switch_moves_switch_bytes(tiny):
    sw, reader, storage = make(tiny.pack, keep_displaced=False)
    for a in tiny.names:
        for b in tiny.names:
            if a == b:
                continue
            sw.switch(a)
            sw.cache.clear()
            res = sw.switch(b)
            read, zero = switch_cost(reader, a, b)
            assert res.bytes_moved == read + zero and res.zero_bytes == zero
            assert res.from_cache == 0
            assert res.from_storage + res.zero_filled == res.blocks_moved
            # adjacent blocks go out as one read: never more reads than blocks
            assert (res.reads > 0) == (res.from_storage > 0)
            assert res.reads <= res.from_storage
            assert_views_are(sw, reader, b)


def test_switch_to_self_moves_nothing(tiny):
    sw, reader, storage = make(tiny.pack)
    sw.switch(tiny.names[0])
    read = storage.bytes_read
    res = sw.switch(tiny.names[0])
    assert (res.bytes_moved, res.blocks_moved) == (0, 0)
    assert storage.bytes_read == read


@pytest.mark.parametrize("spare", ["roomy", "none"])
def test_random_sequences_keep_views_exact(tiny, spare):
    weights = "4 MiB" if spare == "roomy" else run_bytes(tiny)
    sw, reader, _ = make(tiny.pack, weights=weights)
    if spare == "none":
        assert sw.arena.mapped == sw.run_bytes
    rng = np.random.default_rng(7)
    seq = list(rng.choice(tiny.names, size=14)) + [tiny.names[0]] * 2
    for t in seq:
        sw.switch(str(t))
        assert sw.active == t
        assert_views_are(sw, reader, str(t))
    if spare == "roomy":
        assert sw.cache.counters.hits > 0
    else:
        assert sw.cache.pool.count == 0 and sw.cache.counters.inserts == 0


def test_warm_switch_reads_nothing_after_prewarm(tiny):
    a, b, c = tiny.names[:3]
    sw, reader, storage = make(tiny.pack)
    sw.switch(a)
    info = sw.prewarm([b, c])
    assert info["resident"] == info["wanted"] > 0
    read = storage.bytes_read
    for t in (b, c, a):
        res = sw.switch(t)
        assert res.from_storage == 0 and res.bytes_read == 0
        assert_views_are(sw, reader, t)
    assert storage.bytes_read == read


def test_prewarm_prefers_blocks_shared_by_more_tasks(tiny):
    a, *others = tiny.names
    sw, reader, _ = make(tiny.pack)
    sw.switch(a)
    sw.cache.clear()
    count: dict[int, int] = {}
    for t in others:
        for p in sw.changed_positions(t):
            b = int(sw.task_blocks(t)[p])
            count[b] = count.get(b, 0) + 1
    assert max(count.values()) > 1, "fixture should have blocks shared by several tasks"
    filler = SlotPool(sw.arena, "filler", BLOCK)
    filler.alloc(sw.arena.free_pages - 10, reclaim=False)   # leave room for 10 blocks only
    sw.prewarm(others)
    resident = [b for b in count if sw.cache.contains(reader.blocks[b].hash)]
    assert len(resident) == 10
    assert min(count[b] for b in resident) >= sorted(count.values(), reverse=True)[9]


def test_unknown_task_changes_nothing(tiny):
    sw, reader, _ = make(tiny.pack)
    sw.switch(tiny.names[1])
    with pytest.raises(UnknownTask) as e:
        sw.switch("nope")
    assert tiny.names[0] in str(e.value)
    assert sw.active == tiny.names[1]
    assert_views_are(sw, reader, tiny.names[1])


def test_task_larger_than_budget(tiny):
    need = run_bytes(tiny)
    with pytest.raises(BudgetExceeded) as e:
        make(tiny.pack, weights=need - BLOCK)
    assert e.value.needed == need and e.value.available == need - BLOCK
    assert "test: task weights" in str(e.value)


@pytest.mark.parametrize("spare", ["roomy", "none"])
@pytest.mark.parametrize("extent", ["coalesced", "one_block"])
def test_corrupt_block_leaves_previous_task(tiny, tmp_path, spare, extent, monkeypatch):
    reads = []
    if extent == "one_block":  # every block its own read: the concurrent read path
        import edgert.pack.reader as pack_reader
        monkeypatch.setattr(pack_reader, "MAX_EXTENT", 1)
        real = pack_reader._read_extent
        monkeypatch.setattr(pack_reader, "_read_extent",
                            lambda st, ext: (reads.append(len(ext.at)), real(st, ext))[1])
    a, b = tiny.names[:2]
    pack = tiny.copy_pack(tmp_path)
    idx = tiny.corrupt_block_of(pack, b, not_in=a)     # damaged before it is opened
    sw, reader, _ = make(pack, weights="4 MiB" if spare == "roomy" else run_bytes(tiny))
    sw.switch(a)
    before = {n: v.copy() for n, v in sw.tensors().items()}
    reads.clear()
    with pytest.raises(PackCorrupt) as e:
        sw.switch(b)
    assert e.value.block == idx
    assert extent == "coalesced" or (len(reads) > 1 and set(reads) == {1})

    assert sw.active == a
    for n, v in sw.tensors().items():
        np.testing.assert_array_equal(v, before[n], err_msg=n)
    sw.switch(tiny.names[2])                   # still usable
    assert_views_are(sw, reader, tiny.names[2])


@pytest.mark.parametrize("change", ["truncate", "overwrite", "replace"])
def test_pack_changed_while_loaded_keeps_the_active_task(tiny, tmp_path, change):
    a, b, c = tiny.names[:3]
    pack = tiny.copy_pack(tmp_path)
    sw, reader, _ = make(pack, keep_displaced=False)
    sw.switch(a)
    before = {n: v.copy() for n, v in sw.tensors().items()}
    if change == "truncate":
        with open(pack, "r+b") as f:
            f.truncate(reader.blocks[len(reader.blocks) // 2].offset)
    elif change == "overwrite":
        tiny.corrupt_block_of(pack, b, not_in=a)
    else:
        other = tmp_path / "other.edgepack"
        other.write_bytes(pack.read_bytes())
        other.replace(pack)
    with pytest.raises(PackCorrupt) as e:
        sw.switch(b)
    assert str(pack) in str(e.value)
    assert sw.active == a
    for n, v in sw.tensors().items():
        np.testing.assert_array_equal(v, before[n], err_msg=n)
    with pytest.raises(PackCorrupt):
        sw.switch(c)
    assert sw.active == a
