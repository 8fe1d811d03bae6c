import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert import BudgetExceeded
from edgert.memory import Arena
from conftest import small_config


def test_pools_partition_the_budget():
    cfg = small_config()
    a = Arena(cfg)
    sizes = {n: a.pool(n).bytes for n in ("weights", "experts", "kv")}
    assert sizes == {"weights": 1 << 20, "experts": 1 << 20, "kv": 256 << 10}
    assert a.mapped == sum(sizes.values()) <= cfg.budget.total
    assert a.extra_allowance == cfg.budget.total - a.mapped
    with pytest.raises(KeyError, match="pools are"):
        a.pool("gpu")


def test_slots_views_and_accounting():
    a = Arena(small_config())
    p = a.pool("weights")
    assert p.carve(8192) == 128
    ids = p.alloc(3)
    views = [p.view(i) for i in ids]
    for k, v in enumerate(views):
        assert len(v) == 8192 and v.ctypes.data % 4096 == 0
        v[:] = k + 1
    assert [int(v[0]) for v in views] == [1, 2, 3]           # slots do not overlap
    assert p.in_use_bytes == 3 * 8192 and p.peak_bytes == 3 * 8192
    p.free(ids[:2])
    assert p.in_use_bytes == 8192 and p.peak_bytes == 3 * 8192
    assert a.stats()["pools"]["weights"]["peak_bytes"] == 3 * 8192


def test_budget_exceeded_changes_nothing():
    a = Arena(small_config())
    p = a.pool("kv")
    p.carve(65536)                       # 4 slots
    p.alloc(3)
    with pytest.raises(BudgetExceeded) as e:
        p.alloc(2)
    assert e.value.needed == 2 * 65536 and e.value.available == 65536
    assert p.free_count == 1 and p.in_use == 3


def test_runs_are_adjacent_and_first_fit():
    p = Arena(small_config()).pool("weights")
    p.carve(4096)
    r0 = p.alloc_run(10)
    r1 = p.alloc_run(5)
    assert (r0, r1) == (0, 10)
    p.free_run(r0, 10)
    assert p.alloc_run(4) == 0
    v = p.view_run(r1, 5)
    assert len(v) == 5 * 4096 and v.ctypes.data == p.view(r1).ctypes.data
    with pytest.raises(BudgetExceeded, match="adjacent"):
        p.alloc_run(p.free_count + 1)


def test_recarve_only_when_empty():
    p = Arena(small_config()).pool("experts")
    p.carve(4096)
    ids = p.alloc(1)
    with pytest.raises(RuntimeError):
        p.carve(8192)
    p.free(ids)
    assert p.carve(8192) == 128
    with pytest.raises(ValueError):
        p.carve(1000)


def test_charges_outside_the_arena():
    a = Arena(small_config())                 # 4 MiB total, pools 2.25 MiB
    allowance = a.extra_allowance
    a.charge("session", allowance - 10)
    with pytest.raises(BudgetExceeded):
        a.charge("other", 11)
    a.discharge("session")
    a.charge("other", 11)
    assert a.extra_in_use == 11 and a.extra_peak == allowance - 10


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["alloc", "run", "free"]), st.integers(1, 40)),
                    max_size=60))
def test_never_past_the_budget(ops):
    cfg = small_config()
    a = Arena(cfg)
    p = a.pool("weights")
    p.carve(16384)
    held, peak = [], 0
    for op, n in ops:
        try:
            if op == "alloc":
                held += p.alloc(n)
            elif op == "run":
                first = p.alloc_run(n)
                held += list(range(first, first + n))
            elif held:
                k = min(n, len(held))
                p.free(held[:k])
                held = held[k:]
        except BudgetExceeded:
            pass
        assert len(set(held)) == len(held)                       # no slot handed out twice
        assert p.in_use == len(held) and p.in_use_bytes <= p.bytes
        assert a.in_use_bytes() <= cfg.budget.total
        peak = max(peak, len(held))
        assert p.peak == peak
