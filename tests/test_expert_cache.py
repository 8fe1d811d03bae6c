"""ExpertCache: pins, loads, eviction within quotas, corruption, lossy band, prefetch, stats."""
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.config import DeviceConfig
from edgert.errors import BudgetExceeded, PackCorrupt
from edgert.experts.api import slots_for_budget
from edgert.experts.cache import ExpertCache
from edgert.memory import Arena
from edgert.pack import PackReader, PackWriter

L, E, K, HID, FFN = 3, 6, 2, 4, 8


def expert_value(layer, expert):
    return float(layer * 100 + expert + 1)


def write_moe_pack(path, dtype="float32"):
    """A pack with the documented MoE layout; every element of expert (l, e) is l*100+e+1."""
    np_dt = np.float32 if dtype == "float32" else np.uint16
    w = PackWriter(path, kind="moe")
    w.add_task("model", {"model.embed_tokens.weight": w.add_tensor(np.ones((16, HID), np.float32))})
    tensors, off = {}, 0
    for name, shape in (("gate", [FFN, HID]), ("up", [FFN, HID]), ("down", [HID, FFN])):
        tensors[name] = {"dtype": dtype, "shape": shape, "offset": off}
        off += FFN * HID * np.dtype(np_dt).itemsize
    table = []
    for l in range(L):
        for e in range(E):
            v = np.full(3 * FFN * HID, expert_value(l, e), np.float32)
            if dtype == "bfloat16":
                v = (v.view(np.uint32) >> 16).astype(np.uint16)  # exact: small integers
            table.append([l, e, w.add_extent(v.tobytes())])
    w.sections["experts"] = msgpack.packb({"num_layers": L, "num_experts": E, "top_k": K,
                                           "extent_bytes": off, "tensors": tensors, "table": table})
    w.config = {"architectures": ["MixtralForCausalLM"]}
    w.close()


def arena(experts_bytes=1 << 20):
    """An arena of just ``experts_bytes`` (the cache is its only user here)."""
    cfg = DeviceConfig.from_dict({"name": "test", "memory": {
        "total": 4 << 20, "engine": (4 << 20) - experts_bytes, "experts": experts_bytes,
        "kv": 0}})
    return Arena(cfg)


@pytest.fixture
def pack(tmp_path):
    p = tmp_path / "moe.edgepack"
    write_moe_pack(p)
    return p


def make_cache(pack, num_slots, **kw):
    reader = PackReader(pack, read_mode=kw.pop("read_mode", "buffered"))
    ar = arena()
    kw.setdefault("prefetch", False)
    cache = ExpertCache(reader, ar, "test: experts", num_slots, **kw)
    return cache, ar


def route_and_acquire(cache, layer, experts, probs=None):
    probs = probs if probs is not None else torch.full((1, E), 1.0 / E)
    out = cache.route(layer, probs, torch.tensor([experts]))
    ids = sorted(set(out.flatten().tolist()))
    return out, ids, cache.acquire(layer, ids)


def check_counters_add_up(stats):
    for c in [stats["total"], *stats["layers"].values()]:
        assert c["exact_hits"] + c["substitutions"] + c["misses"] == c["demands"]
        assert c["ready_hits"] + c["inflight_waits"] + c["loads"] == c["requests"]
        assert c["prefetch_used"] <= c["prefetch_loads"]
    tot = stats["total"]
    for key in ("demands", "loads", "bytes_read", "evictions"):
        assert tot[key] == sum(c[key] for c in stats["layers"].values())


def test_acquire_loads_verified_views_and_hits_after(pack):
    cache, ar = make_cache(pack, num_slots=6, read_mode="direct")
    _, ids, got = route_and_acquire(cache, 1, [2, 4])
    assert set(got) == {2, 4}
    for e, w in got.items():
        assert w.gate.shape == (FFN, HID) and w.down.shape == (HID, FFN)
        assert torch.all(w.up == expert_value(1, e))
    cache.release(1, ids)
    route_and_acquire(cache, 1, [2, 4])
    cache.release(1, [2, 4])
    s = cache.stats()
    t = s["total"]
    assert (t["loads"], t["ready_hits"], t["demands"], t["exact_hits"]) == (2, 2, 4, 2)
    assert t["exact_hit_rate"] == t["effective_hit_rate"] == 0.5
    assert t["bytes_read"] == 2 * 3 * FFN * HID * 4
    check_counters_add_up(s)
    cache.close()


def test_bfloat16_experts_are_views_of_the_slot(tmp_path):
    p = tmp_path / "bf16.edgepack"
    write_moe_pack(p, dtype="bfloat16")
    cache, _ = make_cache(p, num_slots=4)
    got = cache.acquire(2, [5])
    assert got[5].gate.dtype == torch.bfloat16
    assert torch.all(got[5].down.float() == expert_value(2, 5))
    cache.release(2, [5])
    cache.close()


def test_budget_accounting_and_quota(pack):
    extent = 3 * FFN * HID * 4
    assert slots_for_budget(0.5, 18, extent, 1 << 20) == 9
    assert slots_for_budget(1.0, 18, extent, 1 << 20) == 18
    assert slots_for_budget(0.01, 18, extent, 1 << 20) == 1
    assert slots_for_budget(3 * 4096 + 5, 18, extent, 1 << 20) == 3     # bytes -> whole slots
    assert slots_for_budget(10 << 20, 18, extent, 1 << 20) == 18         # never more than experts
    with pytest.raises(BudgetExceeded):
        slots_for_budget(0.5, 18, extent, 8 * 4096)                    # 9 slots > 8 in the pool
    with pytest.raises(BudgetExceeded):
        slots_for_budget(100, 18, extent, 1 << 20)                     # less than one slot
    with pytest.raises(ValueError):
        slots_for_budget(1.5, 18, extent, 1 << 20)

    cache, ar = make_cache(pack, num_slots=7)
    pool = cache.pool
    assert pool.slot_size == 4096
    assert pool.in_use_bytes == 7 * 4096                  # every slot taken from the arena up front
    assert ar.stats()["in_use_bytes"] == 7 * 4096
    assert cache.quota == {0: 3, 1: 2, 2: 2}
    cache.close()
    cache.close()                                         # idempotent
    assert ar.stats()["in_use_bytes"] == 0

    small = arena(4 * 4096)
    with pytest.raises(BudgetExceeded):                   # more slots than the arena holds
        ExpertCache(PackReader(pack), small, "test: experts", 5)
    assert small.stats()["in_use_bytes"] == 0             # nothing kept by the failed load
    with pytest.raises(BudgetExceeded):                   # top-2 needs two slots
        ExpertCache(PackReader(pack), arena(), "test: experts", 1)


def test_eviction_stays_in_the_layer_and_never_takes_pinned(pack):
    cache, _ = make_cache(pack, num_slots=6, policy="lru")   # quota 2 per layer
    for layer in range(L):
        route_and_acquire(cache, layer, [0, 1])
        cache.release(layer, [0, 1])
    route_and_acquire(cache, 0, [0, 3])        # evicts layer 0's expert 1 (LRU), no other layer's
    assert cache.resident(0) == {0, 3}
    assert cache.resident(1) == cache.resident(2) == {0, 1}
    # 0 and 3 are still pinned; a load needing a third slot borrows from another layer
    cache.acquire(0, [4])
    assert cache.resident(0) == {0, 3, 4}
    assert sum(len(cache.resident(l)) for l in range(L)) == 6
    assert cache.stats()["layers"][0]["borrowed"] == 1
    cache.release(0, [0, 3, 4])
    # the layer that lent a slot takes it back from the one over quota
    route_and_acquire(cache, 1, [4, 5])
    cache.release(1, [4, 5])
    assert len(cache.resident(0)) == 2 and cache.resident(1) == {4, 5}
    check_counters_add_up(cache.stats())
    cache.close()


def test_all_slots_pinned_raises_budget_exceeded_and_rolls_back(pack):
    cache, ar = make_cache(pack, num_slots=3)
    cache.acquire(0, [0, 1])
    with pytest.raises(BudgetExceeded):
        cache.acquire(1, [0, 1])             # one slot left: the second pin cannot fit
    cache.release(0, [0, 1])
    got = cache.acquire(1, [0, 1, 2])        # the failed acquire left no pins behind
    assert sorted(got) == [0, 1, 2]
    cache.release(1, [0, 1, 2])
    cache.close()


def test_one_slot_per_layer_serves_top2_by_borrowing(pack):
    cache, _ = make_cache(pack, num_slots=3, policy="gate")
    for step in range(5):
        for layer in range(L):
            _, ids, got = route_and_acquire(cache, layer, [step % E, (step + 1) % E])
            assert all(torch.all(w.gate == expert_value(layer, e)) for e, w in got.items())
            cache.release(layer, ids)
    check_counters_add_up(cache.stats())
    cache.close()


def test_corrupt_extent_raises_names_expert_and_cache_stays_usable(pack):
    reader = PackReader(pack)
    bad = reader.blocks[reader_expert_block(reader, 1, 3)]
    with open(pack, "r+b") as f:
        f.seek(bad.offset + 10)
        f.write(b"\xff\xfe")
    cache, ar = make_cache(pack, num_slots=4)
    held = ar.stats()["in_use_bytes"]
    with pytest.raises(PackCorrupt, match="layer 1 expert 3, block"):
        cache.acquire(1, [2, 3])
    assert cache.resident(1) == {2}          # expert 2 loaded fine, 3's slot went back
    got = cache.acquire(1, [2, 4])           # no pins leaked by the failed acquire
    assert torch.all(got[4].gate == expert_value(1, 4))
    cache.release(1, [2, 4])
    with pytest.raises(PackCorrupt):
        cache.acquire(1, [3])                # still corrupt, still a clean error
    assert ar.stats()["in_use_bytes"] == held
    cache.close()


def reader_expert_block(reader, layer, expert):
    sec = msgpack.unpackb(reader.sections["experts"], strict_map_key=False)
    return next(b for l, e, b in sec["table"] if (l, e) == (layer, expert))


def test_exact_mode_returns_the_router_choice_unchanged(pack):
    cache, _ = make_cache(pack, num_slots=6, lossy_alpha=0.0)
    route_and_acquire(cache, 0, [0, 1])
    cache.release(0, [0, 1])
    probs = torch.tensor([[0.30, 0.29, 0.28, 0.05, 0.04, 0.04]])
    topk = torch.tensor([[0, 2]])
    assert cache.route(0, probs, topk) is topk   # 2 missing, 1 resident and close: still exact
    assert cache.stats()["total"]["substitutions"] == 0
    cache.close()


def test_lossy_substitutes_inside_the_band_highest_first(pack):
    cache, _ = make_cache(pack, num_slots=6, lossy_alpha=0.2)
    route_and_acquire(cache, 0, [1, 3])
    cache.release(0, [1, 3])
    cache.reset_stats()
    # selected 0 (0.32, resident? no) and 2 (0.27, missing); S = 0.25 (expert 1, resident);
    # band for selected: < 0.30; for substitutes: > 0.20. 0 is above the band: exact.
    probs = torch.tensor([[0.32, 0.25, 0.27, 0.16, 0.0, 0.0]])
    out = cache.route(0, probs, torch.tensor([[0, 2]]))
    assert out.tolist() == [[0, 1]]
    t = cache.stats()["total"]
    assert t["substitutions"] == 1 and t["exact_hits"] == 0 and t["demands"] == 2
    assert t["effective_hit_rate"] == 0.5 and t["exact_hit_rate"] == 0.0
    cache.close()


def lossy_reference(p, sel, ready, alpha):
    """Independent statement of the rule, for the property test."""
    k = len(sel)
    S = float(sorted(p, reverse=True)[k])   # the band in float64, as substitution.py does
    out, used = list(sel), set(sel)
    missing = sorted((j for j in range(k) if not ready[sel[j]] and p[sel[j]] < (1 + alpha) * S),
                     key=lambda j: -p[sel[j]])
    subs = sorted((e for e in range(len(p)) if e not in used and ready[e] and p[e] > (1 - alpha) * S),
                  key=lambda e: -p[e])
    for j, e in zip(missing, subs):
        out[j] = e
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=E, max_size=E),
       st.lists(st.booleans(), min_size=E, max_size=E),
       st.sampled_from([0.0, 0.1, 0.3, 0.6]))
def test_lossy_band_property(tmp_path_factory, scores, resident_mask, alpha):
    p = np.array(scores, np.float32)
    p = p / p.sum()
    path = tmp_path_factory.mktemp("lossy") / "moe.edgepack"
    write_moe_pack(path)
    cache, _ = make_cache(path, num_slots=E * L, lossy_alpha=alpha)
    resident = [e for e in range(E) if resident_mask[e]]
    if resident:
        cache.acquire(0, resident)
        cache.release(0, resident)
    sel = np.argsort(-p, kind="stable")[:K]
    out = cache.route(0, torch.from_numpy(p)[None], torch.from_numpy(sel)[None])[0].tolist()
    ready = np.array(resident_mask)
    S = np.sort(p)[::-1][K]
    for j in range(K):
        if out[j] != sel[j]:
            assert alpha > 0                                  # never when alpha = 0
            assert not ready[sel[j]] and p[sel[j]] < (1 + alpha) * S   # never above the band
            assert ready[out[j]] and p[out[j]] > (1 - alpha) * S and out[j] not in sel
    assert len(set(out)) == K                                # each substitute once per token
    assert out == [int(x) for x in lossy_reference(p, [int(s) for s in sel], ready, alpha)]
    cache.close()


class GatedReader(PackReader):
    """A pack reader whose reads of one extent wait for `go` (to observe a read in flight)."""

    def __init__(self, path, offset):
        super().__init__(path, "buffered")
        self.gated_offset, self.started, self.go = offset, threading.Event(), threading.Event()
        self.offsets = []

    def read_into(self, blocks, views, **kw):
        for b in blocks:
            offset = self.blocks[b].offset
            self.offsets.append(offset)
            if offset == self.gated_offset:
                self.started.set()
                self.go.wait(10)
        return super().read_into(blocks, views, **kw)


def test_prefetch_loads_hinted_experts_and_demand_waits_instead_of_rereading(pack):
    reader = PackReader(pack)
    target = reader.blocks[reader_expert_block(reader, 2, 5)].offset
    storage = GatedReader(pack, target)
    cache = ExpertCache(storage, arena(), "test: experts", 6, policy="gate", prefetch=True)
    cache.hint(2, torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.3, 0.7]]))    # predicts 5 then 4
    assert storage.started.wait(10)              # the worker is reading expert 5 of layer 2
    result = {}
    t = threading.Thread(target=lambda: result.update(cache.acquire(2, [5])))
    t.start()
    deadline = time.monotonic() + 10
    while True:   # NOTE: seen under the lock, a counted request means acquire is in wait()
        with cache._cv:
            if cache.counters[2].requests:
                break
        assert time.monotonic() < deadline, "acquire never started"
        time.sleep(0.001)
    storage.go.set()
    t.join(10)
    cache.drain()
    assert torch.all(result[5].gate == expert_value(2, 5))
    assert storage.offsets.count(target) == 1     # read once, by the prefetch
    assert cache.counters[2].inflight_waits == 1  # the demand waited for that read
    cache.route(2, torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.3, 0.7]]), torch.tensor([[5, 4]]))
    cache.acquire(2, [4])
    cache.release(2, [4, 5])
    t_ = cache.stats()["layers"][2]
    assert t_["prefetch_loads"] == 2 and t_["prefetch_used"] == 2 and t_["loads"] == 0
    assert t_["prefetch_precision"] == 1.0 and t_["prefetch_recall"] == 1.0
    check_counters_add_up(cache.stats())
    cache.close()


def test_prefetch_never_evicts_pinned_or_routed_experts(pack):
    cache, _ = make_cache(pack, num_slots=6, prefetch=True, policy="lru")   # quota 2
    route_and_acquire(cache, 0, [0, 1])                 # pinned
    cache.hint(0, torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0, 0.0]]))
    cache.drain()
    assert cache.resident(0) == {0, 1}                  # nothing evictable: prefetch gave up
    cache.release(0, [0, 1])
    cache.hint(0, torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0, 0.0]]))
    cache.drain()                                       # routed last step: still protected
    assert cache.resident(0) == {0, 1}
    cache.route(0, torch.full((1, E), 1.0 / E), torch.tensor([[0, 4]]))  # a new step: 0 and 4
    cache.hint(0, torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0, 0.0]]))
    cache.drain()
    assert cache.resident(0) == {0, 2}                  # 1 made room for 2; routed 0 stays
    check_counters_add_up(cache.stats())
    cache.close()


def test_corrupt_prefetch_frees_the_slot_and_demand_reports_it(pack):
    reader = PackReader(pack)
    bad = reader.blocks[reader_expert_block(reader, 0, 2)]
    with open(pack, "r+b") as f:
        f.seek(bad.offset)
        f.write(b"\x00\x01\x02")
    cache, _ = make_cache(pack, num_slots=6, prefetch=True, prefetch_min_prob=0.0)
    cache.hint(0, torch.tensor([[0.0, 0.1, 0.9, 0.0, 0.0, 0.0]]))
    cache.drain()
    assert cache.resident(0) == {1}
    assert cache.stats()["layers"][0]["prefetch_errors"] == 1
    with pytest.raises(PackCorrupt, match="layer 0 expert 2, block"):
        cache.acquire(0, [2])
    cache.close()


def test_trace_feeds_belady(pack):
    cache, _ = make_cache(pack, num_slots=6, record_trace=True)
    for e in (0, 1, 2, 0):
        cache.acquire(0, [e])
        cache.release(0, [e])
    trace = cache.trace()
    cache.close()
    assert trace[0] == [0, 1, 2, 0]
    cache, _ = make_cache(pack, num_slots=6, policy="belady", policy_options={"future": trace})
    for e in (0, 1, 2, 0):                                  # quota 2: MIN keeps 0, evicts 1
        cache.acquire(0, [e])
        cache.release(0, [e])
    assert cache.stats()["layers"][0]["loads"] == 3
    cache.close()


def test_read_ahead_reads_each_routed_miss_once(pack):
    reader = storage = GatedReader(pack, offset=-1)   # nothing gated: records offsets
    cache = ExpertCache(reader, arena(), "test: experts", 6, policy="lru", prefetch=True)
    out = cache.route(1, torch.full((1, E), 1.0 / E), torch.tensor([[2, 5]]))
    got = cache.acquire(1, out.flatten().tolist())
    assert all(torch.all(w.gate == expert_value(1, e)) for e, w in got.items())
    cache.release(1, [2, 5])
    cache.drain()
    offsets = [reader.blocks[reader_expert_block(reader, 1, e)].offset for e in (2, 5)]
    assert sorted(storage.offsets) == sorted(offsets)   # each read exactly once
    c = cache.stats()["layers"][1]
    assert c["loads"] + c["ahead_loads"] == 2 and c["misses"] == 2
    check_counters_add_up(cache.stats())
    cache.close()


def test_hint_skips_unconfident_predictions(pack):
    cache, _ = make_cache(pack, num_slots=6, prefetch=True, prefetch_min_prob=0.2)
    cache.hint(0, torch.tensor([[0.0, 0.15, 0.85, 0.0, 0.0, 0.0]]))
    cache.drain()
    assert cache.resident(0) == {2}
    assert cache.stats()["layers"][0]["predicted"] == 1
    cache.close()


def test_substitute_is_a_pure_band_rule():
    from edgert.experts.substitution import substitute
    p = np.array([0.40, 0.22, 0.20, 0.18, 0.0, 0.0])
    loaded = np.array([False, False, False, True, False, False])
    row = np.array([0, 1])                    # S = 0.20; band (0.16, 0.24) at alpha 0.2
    assert substitute(p, row.copy(), loaded, 0.0) == 0
    r = row.copy()
    assert substitute(p, r, loaded, 0.2) == 1 and r.tolist() == [0, 3]   # 0 is above the band
    r = row.copy()
    assert substitute(p, r, np.zeros(6, bool), 0.9) == 0 and r.tolist() == [0, 1]  # nothing loaded


def _band_by_the_letter(p, row, loaded, alpha):
    """The band rule of substitution.py's docstring, one expert at a time."""
    k, E = len(row), len(p)
    if alpha <= 0 or k >= E:
        return 0
    S = sorted(p.tolist(), reverse=True)[k]
    hi, lo = (1 + alpha) * S, (1 - alpha) * S
    by_p = sorted(range(k), key=lambda j: (-p[row[j]], j))           # ties: lower position
    missing = [j for j in by_p if not loaded[row[j]] and p[row[j]] < hi]
    chosen = set(row.tolist())
    subs = [e for e in sorted(range(E), key=lambda e: (-p[e], e))  # ties: lower id
            if e not in chosen and loaded[e] and p[e] > lo]
    for j, e in zip(missing, subs):
        row[j] = e
    return min(len(missing), len(subs))


def test_substitute_follows_the_band_rule_on_random_routing():
    """The vectorised band equals the rule applied one expert at a time (ties included)."""
    from edgert.experts.substitution import substitute
    g = np.random.default_rng(0)
    for t in range(3000):
        E = int(g.integers(2, 70))
        k = int(g.integers(1, min(E, 9)))
        p = g.dirichlet(np.ones(E) * g.choice([0.3, 1.0, 5.0])).astype(np.float32)
        if t % 4 == 0:
            p = np.round(p, 2)                              # ties
        row = g.choice(E, k, replace=False)
        loaded = g.random(E) < g.random()
        alpha = float(g.choice([0.0, 0.1, 0.4, 1.0]))
        want, got = row.copy(), row.copy()
        n_want = _band_by_the_letter(p, want, loaded, alpha)
        assert substitute(p, got, loaded.copy(), alpha) == n_want, (p, row, loaded, alpha)
        assert got.tolist() == want.tolist(), (p, row, loaded, alpha)


def test_hints_that_queue_nothing_pause_then_probe_again(pack):
    cache, _ = make_cache(pack, num_slots=6, prefetch=True, hint_probe=(8, 5))
    unsure = torch.full((1, E), 1.0 / E)          # below prefetch_min_prob: nothing to read
    for _ in range(7):
        assert cache.wants_hint(1)
        cache.hint(1, unsure)
    assert cache.wants_hint(1)
    cache.hint(1, unsure)                          # the 8th hint closes the window
    assert [cache.wants_hint(1) for _ in range(6)] == [False] * 5 + [True]
    st = cache.stats()
    assert st["hint_pauses"] == 1
    assert st["layers"][1]["hints"] == 8 and st["layers"][1]["hints_skipped"] == 5
    assert st["layers"][1]["hints_queued"] == 0
    cache.close()


def test_hints_that_queue_reads_keep_prefetch_on(pack):
    cache, _ = make_cache(pack, num_slots=6, prefetch=True, hint_probe=(4, 5))
    for i in range(12):                            # each hint names an expert not yet loaded
        assert cache.wants_hint(i % L)
        probs = torch.zeros((1, E))
        probs[0, (i // L) % E] = 1.0
        cache.hint(i % L, probs)
        cache.drain()
    st = cache.stats()
    assert st["hint_pauses"] == 0 and st["total"]["hints_queued"] == 12
    assert st["total"]["prefetch_loads"] == 12
    cache.close()


def test_hint_pausing_can_be_turned_off(pack):
    cache, _ = make_cache(pack, num_slots=6, prefetch=True, hint_probe=None)
    for _ in range(300):
        cache.hint(0, torch.full((1, E), 1.0 / E))
    assert cache.wants_hint(0) and cache.stats()["hint_pauses"] == 0
    cache.close()


def test_rank_hint_orders_by_confidence_and_caps():
    from edgert.experts.hints import rank_hint
    one = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    assert rank_hint(one, width=2, min_prob=0.2, limit=4) == [1, 3]
    assert rank_hint(one, width=2, min_prob=0.4, limit=4) == [1]
    assert rank_hint(one, width=3, min_prob=0.0, limit=2) == [1, 3]
    many = torch.tensor([[0.6, 0.3, 0.1, 0.0],     # prefill: ranked by summed probability
                         [0.0, 0.3, 0.1, 0.6],
                         [0.0, 0.4, 0.0, 0.6]])
    assert rank_hint(many, width=2, min_prob=0.25, limit=4) == [3, 1, 0]
