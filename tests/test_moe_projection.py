"""The projection: traces recorded from the engine, replayed through the real cache on a
virtual clock; the replay's hit counts equal a live cache's on the same trace."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgert.config import DeviceConfig, shipped
from edgert.experts.cache import ExpertCache
from edgert.pack import PackReader
from edgert.projection import trace as traces
from edgert.projection.costmodel import CostModel, ModelShape, prefetch_pays
from edgert.projection.replay import drive, project, project_on_demand, project_resident
from edgert.projection.trace import RoutingTrace, synthesize
from test_expert_cache import E, FFN, HID, K, L, arena, write_moe_pack

EXTENT = 3 * FFN * HID * 4
SHAPE = ModelShape("test", L, E, K, EXTENT, HID, 0, 0)


def skewed_trace(n=60, layers=L, experts=E, k=K, prefill=8, seed=0) -> RoutingTrace:
    """Routing with per-layer popularity and some token-to-token persistence; hints are the
    true next probabilities blurred with noise."""
    g = np.random.default_rng(seed)
    pop = np.log(g.dirichlet(np.ones(experts) * 0.5, size=layers))           # [L, E]
    logits = np.empty((n, layers, experts))
    logits[0] = pop + g.gumbel(size=(layers, experts))
    for t in range(1, n):
        logits[t] = 0.6 * logits[t - 1] + 0.4 * (pop + g.gumbel(size=(layers, experts)))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    hints = np.abs(p + g.normal(0, 0.05, p.shape)).astype(np.float32)
    hints /= hints.sum(-1, keepdims=True)
    topk = torch.topk(torch.from_numpy(p), k, -1).indices.numpy().astype(np.int16)
    steps = np.array([prefill] + [1] * (n - prefill), np.int32)
    hinted = np.ones((len(steps), layers), bool)
    hinted[:, 0] = False
    return RoutingTrace(steps, p, topk, hints, hinted, tuple(range(layers)))


class SyncWorker:
    """The prefetch worker run in the caller's thread: a job runs when it is submitted."""

    def __init__(self, run):
        self._run = run

    def submit(self, priority, job):
        self._run()(*job)

    def drain(self):
        pass

    def close(self):
        pass


def live(pack, trace, slots, **kw):
    cache = ExpertCache(PackReader(pack, read_mode="buffered"), arena(), "test: experts", slots,
                        worker=SyncWorker, **kw)
    try:
        return drive(cache, trace).stats["total"]
    finally:
        cache.close()


INSTANT = CostModel(read_latency_s=0.0, read_Bps=float("inf"), token_s=0.0, layer_s=1e-3,
                    expert_s=1e-4, hint_s=0.0)

COUNTS = ("demands", "exact_hits", "substitutions", "inflight_at_route", "requests",
          "ready_hits", "loads", "ahead_loads", "prefetch_loads", "prefetch_used", "evictions",
          "borrowed", "bytes_read", "hints", "hints_queued", "first_reads", "next_reads")


@pytest.mark.parametrize("policy,opts,alpha,prefetch", [
    ("lru", {}, 0.0, False), ("lfu", {}, 0.0, False), ("gate", {"decay": 0.9}, 0.0, False),
    ("stale", {}, 0.0, False), ("lru", {}, 0.3, False), ("gate", {}, 0.0, True),
    ("lfu", {}, 0.2, True)])
@pytest.mark.parametrize("slots", [2 * K, 7, 12])
def test_replay_hit_counts_equal_the_live_cache(tmp_path, policy, opts, alpha, prefetch, slots):
    pack = tmp_path / "moe.edgepack"
    write_moe_pack(pack)
    tr = skewed_trace()
    kw = dict(policy=policy, policy_options=opts, lossy_alpha=alpha, prefetch=prefetch,
              prefetch_min_prob=0.05)
    want = live(pack, tr, slots, **kw)
    got = project(tr, SHAPE, INSTANT, slots, **kw).stats["total"]
    assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}
    assert want["demands"] == (len(tr.steps) - 1) * L * K
    assert 0 < want["exact_hits"] < want["demands"]


def test_virtual_clock_charges_reads_and_compute():
    """One slot per expert a step needs, no reuse possible: every demand reads."""
    tr = skewed_trace(n=20)
    cost = CostModel(read_latency_s=1e-3, read_Bps=EXTENT / 4e-3, token_s=2e-3, layer_s=1e-3,
                     expert_s=5e-4, hint_s=0.0)
    res = project(tr, SHAPE, cost, L * E)             # everything fits: misses only at first use
    od = project_on_demand(tr, SHAPE, cost)
    assert od["tpot_p50_ms"] == pytest.approx(1e3 * (2e-3 + L * (1e-3 + K * 5e-4 + K * 5e-3)))
    assert project_resident(tr, SHAPE, cost)["tok_s"] == pytest.approx(1 / (2e-3 + L * 2e-3))
    loads = res.stats["total"]["loads"]
    compute = len(res.tpot_s) * (2e-3 + L * 2e-3)
    assert sum(res.tpot_s) == pytest.approx(compute + loads * 5e-3)
    assert res.stall_s == pytest.approx(loads * 5e-3)


def test_prefetch_overlaps_reads_with_compute():
    """Perfect hints and reads shorter than a layer's compute: prefetch hides them."""
    tr = skewed_trace(n=40)
    tr.hints[:] = tr.probs
    cost = CostModel(read_latency_s=0.0, read_Bps=EXTENT / 2e-4, token_s=0.0, layer_s=2e-3,
                     expert_s=0.0, hint_s=0.0)
    off = project(tr, SHAPE, cost, 4 * L, prefetch=False)
    on = project(tr, SHAPE, cost, 4 * L, prefetch=True, prefetch_min_prob=0.0, hint_probe=None)
    assert on.stats["total"]["prefetch_loads"] > 0
    assert on.stall_s < off.stall_s
    assert on.tok_s > off.tok_s


def test_synthesize_maps_onto_larger_shapes():
    tr = skewed_trace(n=12, layers=4, experts=8, k=2)
    same = synthesize(tr, 8, 8)
    assert same.probs.shape == (12, 8, 8)
    np.testing.assert_array_equal(same.topk[:, 5], tr.topk[:, 1])     # layer 5 <- source 1
    wide = synthesize(tr, 6, 16)
    assert wide.probs.shape == (12, 6, 16)
    np.testing.assert_allclose(wide.probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(wide.probs[:, 1, :8], tr.probs[:, 2] / 2)   # layer 1 <- 2, 3
    np.testing.assert_allclose(wide.probs[:, 1, 8:], tr.probs[:, 3] / 2)
    assert not wide.hinted[:, 0].any()
    with pytest.raises(ValueError):
        synthesize(tr, 4, 12)


def test_traces_round_trip(tmp_path):
    a, b = skewed_trace(n=10), skewed_trace(n=14, seed=1)
    traces.save([a, b], tmp_path / "t.npz")
    got = traces.load(tmp_path / "t.npz")
    assert len(got) == 2
    for x, y in zip([a, b], got):
        for f in ("steps", "probs", "topk", "hints", "hinted"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
        assert x.layers == y.layers


def test_recorder_records_what_the_engine_routes(tmp_path):
    pytest.importorskip("transformers")
    from edgert.experts.api import ExpertLayout, ResidentExperts
    from edgert.projection.trace import TraceRecorder
    from edgert.pack.hf_import import pack_hf
    from moe_models import mixtral_config, prompt, runtime, save
    d = save(mixtral_config(num_local_experts=8, num_hidden_layers=3), tmp_path / "ckpt")
    p = tmp_path / "m.edgepack"
    pack_hf(d, p, progress=False)
    rt = runtime()
    reader = PackReader(p, read_mode="buffered")
    lay = ExpertLayout.from_reader(reader)
    rec = TraceRecorder(ResidentExperts(reader), lay.moe_layers)
    ids = prompt(12)
    with rt.load(p, provider=rec) as lm:
        with lm.sequence() as seq:
            seq.feed(ids[:5])
            for t in ids[5:]:
                seq.feed([t])
    tr = rec.trace()
    assert tr.steps.tolist() == [5] + [1] * 7
    assert tr.probs.shape == (12, 3, 8) and tr.topk.shape == (12, 3, 2)
    np.testing.assert_allclose(tr.probs.sum(-1), 1.0, rtol=1e-5)
    top = np.sort(np.argsort(-tr.probs, -1)[..., :2], -1)
    np.testing.assert_array_equal(np.sort(tr.topk, -1), top)
    assert tr.hinted[:, 1:].all() and not tr.hinted[:, 0].any()


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "qwen3-30b-a3b"])
def test_device_costs_from_shipped_configs(name):
    shape = ModelShape.from_name(name)
    assert shape.expert_bytes == {"olmoe-1b-7b": 12_582_912, "qwen3-30b-a3b": 9_437_184}[name]
    for cfg_name in shipped():
        cfg = DeviceConfig.load(cfg_name)
        assert cfg.perf is not None, cfg_name
        cost = CostModel.for_device(cfg.perf, shape)
        assert cost.read_s(shape.expert_bytes) > cost.expert_s > 0
    # Orin Nano: a read outlasts a layer's compute 3x; a wasted prefetch costs more
    # bandwidth than a used one hides unless nearly every prefetch is used
    nano = CostModel.for_device(DeviceConfig.load("jetson-orin-nano-8gb").perf, shape)
    assert not prefetch_pays(nano, shape)
    assert prefetch_pays(nano, shape, precision=0.95)
    assert not prefetch_pays(nano.with_(hint_s=1.0), shape, precision=0.95)
    desk = CostModel.for_device(DeviceConfig.load("desktop-rtx4090").perf, shape)
    assert prefetch_pays(desk, shape)                 # reads shorter than a layer: hidden


def test_perf_section_is_validated():
    from edgert.errors import ConfigError
    base = {"name": "x", "memory": {"total": "1 GiB"}}
    assert DeviceConfig.from_dict(base).perf is None
    perf = {"storage_read_gbps": 2, "storage_latency_us": 100, "memory_gbps": 68,
            "compute_tflops": 10}
    got = DeviceConfig.from_dict({**base, "perf": perf}).perf
    assert got.storage_read_Bps == 2e9 and got.layer_overhead_s == 0.0
    with pytest.raises(ConfigError, match="perf.memory_gbps"):
        DeviceConfig.from_dict({**base, "perf": {**perf, "memory_gbps": -1}})
    with pytest.raises(ConfigError, match="perf.compute_tflops"):
        DeviceConfig.from_dict({**base, "perf": {k: v for k, v in perf.items()
                                                 if k != "compute_tflops"}})


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_a_replay_without_prefetch_retimes_exactly(alpha):
    """Without prefetch no decision depends on time: one replay serves every device."""
    tr = skewed_trace(n=30)
    a = CostModel(read_latency_s=1e-4, read_Bps=EXTENT / 1e-3, token_s=1e-3, layer_s=2e-3,
                  expert_s=3e-4, hint_s=1e-4, route_s=5e-5, miss_s=2e-5)
    b = a.with_(read_latency_s=3e-3, read_Bps=EXTENT / 1e-4, layer_s=1e-4, miss_s=0.0,
                first_read_extra_s=7e-4)
    direct = project(tr, SHAPE, b, 7, policy="lfu", lossy_alpha=alpha)
    retimed = project(tr, SHAPE, a, 7, policy="lfu", lossy_alpha=alpha).retimed(SHAPE, b)
    assert retimed.tpot_s == pytest.approx(direct.tpot_s)
    assert retimed.stall_s == pytest.approx(direct.stall_s)


def test_share_slots_gives_slots_where_they_save_misses():
    from edgert.projection.share import share_slots
    tr = skewed_trace(n=80, layers=2, experts=8, k=2)
    tr.probs[:, 0] = 0.0                       # layer 0 uses experts 0 and 1 only
    tr.probs[:, 0, :2] = 0.5
    tr.topk[:, 0] = [0, 1]
    shape = ModelShape("t", 2, 8, 2, EXTENT, HID, 0, 0)
    quota = share_slots(tr, shape, 6)
    assert quota == {0: 2, 1: 4}                # layer 0 never needs more than its top-k
    quota = share_slots(tr, shape, 10)
    assert sum(quota.values()) == 10 and quota[1] >= 5
    assert share_slots(tr, shape, 3) is None and share_slots(tr, shape, 16) is None


def test_prefetch_default_follows_the_device_figures(tmp_path):
    from edgert.experts.api import ExpertLayout
    from edgert.projection.costmodel import prefetch_default
    pack = tmp_path / "moe.edgepack"
    write_moe_pack(pack)
    lay = ExpertLayout.from_reader(PackReader(pack, read_mode="buffered"))
    assert prefetch_default(DeviceConfig.from_dict({"name": "x", "memory": {"total": "1 GiB"}}),
                            lay) is True                       # no figures: the governor decides
    slow = {"name": "x", "memory": {"total": "1 GiB"},
            "perf": {"storage_read_gbps": 0.001, "storage_latency_us": 5000, "memory_gbps": 100,
                     "compute_tflops": 10, "layer_overhead_us": 1}}
    assert prefetch_default(DeviceConfig.from_dict(slow), lay) is False   # reads dwarf compute


def test_default_policy_follows_the_device_figures(tmp_path):
    """Unnamed, the runtime's policy is LFU where a miss outlasts a layer's compute (decode
    follows bytes read) and the cache holds under 75% of the experts; LRU elsewhere or
    without figures (test_moe_cli: a loaded model
    uses it)."""
    from edgert.experts.api import ExpertLayout
    from edgert.projection.costmodel import default_policy
    pack = tmp_path / "moe.edgepack"
    write_moe_pack(pack)
    lay = ExpertLayout.from_reader(PackReader(pack, read_mode="buffered"))
    base = {"name": "x", "memory": {"total": "64 MiB"}, "storage": {"read_mode": "buffered"}}
    figures = {"storage_latency_us": 100, "memory_gbps": 100, "compute_tflops": 10,
               "layer_overhead_us": 50}
    slow = {**base, "perf": {**figures, "storage_read_gbps": 0.001}}
    fast = {**base, "perf": {**figures, "storage_read_gbps": 1000, "storage_latency_us": 1}}
    assert default_policy(DeviceConfig.from_dict(base), lay) == "lru"
    assert default_policy(DeviceConfig.from_dict(slow), lay) == "lfu"
    assert default_policy(DeviceConfig.from_dict(slow), lay, 0.5) == "lfu"
    assert default_policy(DeviceConfig.from_dict(slow), lay, 0.75) == "lru"   # hits ~all
    assert default_policy(DeviceConfig.from_dict(fast), lay) == "lru"


def test_each_policy_is_charged_its_own_measured_bookkeeping():
    """Probes of a cache that never misses, one per policy, set each policy's bookkeeping
    per layer, never less than LRU's; a policy without a probe keeps LRU's; the projection
    charges it per layer."""
    from edgert.bench import moe_projection as P
    steady = {"resident": 100.0, "100% lru": 90.0, "100% gate": 80.0, "100% stale": 75.0,
              "100% lfu": 95.0}              # lfu measured faster than lru: noise
    table = {n: {"tok_s": v, "tok_s_steady": v} for n, v in steady.items()}
    cost = P.calibrated_cost(table, {"read_Bps": 1e9}, SHAPE)
    per = dict(cost.route_by_policy)
    assert cost.route_s == pytest.approx((1 / 90 - 1 / 100) / L)
    assert per["gate"] == pytest.approx((1 / 80 - 1 / 100) / L)
    assert per["stale"] == pytest.approx((1 / 75 - 1 / 100) / L)
    assert per["lfu"] == cost.route_s             # never charged less than LRU's bookkeeping
    assert cost.for_policy("belady") is cost and cost.for_policy("lru") is cost
    tr = skewed_trace(n=30)
    spec = {"kind": "cache", "budget": 1.0}
    full = {p: P.project_spec(tr, SHAPE, cost, {**spec, "policy": p})["tok_s_steady"]
            for p in ("lru", "gate", "stale")}
    assert full["lru"] == pytest.approx(90.0, rel=1e-3)     # a full cache only misses in the prefill
    assert full["gate"] == pytest.approx(80.0, rel=1e-3)
    assert full["stale"] == pytest.approx(75.0, rel=1e-3)


def test_a_read_after_compute_is_charged_its_extra_once_per_acquire(tmp_path):
    """The live cache times a layer's first demand read (it follows compute) apart from the
    reads right after it; the replay charges the first ones `first_read_extra_s`, and counts
    them exactly as the live cache does."""
    pack = tmp_path / "moe.edgepack"
    write_moe_pack(pack)
    cache = ExpertCache(PackReader(pack, read_mode="buffered"), arena(), "test: experts", 2 * K,
                        policy="lru", prefetch=False)
    try:
        cache.acquire(0, [0, 1])                 # two misses: one first read, one next read
        cache.release(0, [0, 1])
        cache.acquire(0, [0, 1])                 # hits: no read at all
        cache.release(0, [0, 1])
        c = cache.stats()["total"]
        assert (c["first_reads"], c["next_reads"], c["loads"]) == (1, 1, 2)
        assert c["first_read_s"] > 0 and c["next_read_s"] > 0
    finally:
        cache.close()
    tr = skewed_trace(n=30)
    base = CostModel(read_latency_s=0.0, read_Bps=EXTENT / 1e-3, token_s=0.0, layer_s=1e-3,
                     expert_s=0.0, hint_s=0.0)
    plain = project(tr, SHAPE, base, 7)
    extra = project(tr, SHAPE, base.with_(first_read_extra_s=5e-4), 7)
    firsts = sum(extra.first_reads)
    assert firsts == extra.stats["total"]["first_reads"] > 0
    assert sum(extra.reads) > firsts                 # some acquires read more than one
    assert sum(extra.tpot_s) == pytest.approx(sum(plain.tpot_s) + firsts * 5e-4)


def test_prefetch_cost_is_fitted_to_the_read_ahead_gain():
    """The read-ahead probe's measured gain over "min lru" sets what a prefetch read costs
    the engine; the fit recovers the cost that produced a gain, whatever the projection's
    error on "min lru" itself, and clamps at zero when read-ahead measured no gain."""
    from edgert.bench import moe_projection as P
    tr = skewed_trace(n=40)
    cost = CostModel(read_latency_s=0.0, read_Bps=EXTENT / 1e-3, token_s=0.0, layer_s=1e-3,
                     expert_s=0.0, hint_s=0.0, miss_s=1e-4)
    spec = {"kind": "cache", "budget": K / E, "policy": "lru", "prefetch": True,
            "hint_probe": None, "min_prob": 1.01}
    plain = P.project_over([tr], SHAPE, cost, {**spec, "prefetch": False})["tok_s_steady"]

    def gain(x):
        return P.project_over([tr], SHAPE, cost.with_(prefetch_cpu_s=x), spec)["tok_s_steady"] / plain
    assert gain(0.0) > gain(5e-4) > 0
    for scale in (1.0, 0.8):                     # the projection 25% optimistic on "min lru"
        table = {"min lru": {"tok_s": 100 * scale, "tok_s_steady": 100 * scale},
                 P.AHEAD_PROBE: {"tok_s": 100 * scale * gain(3e-4),
                                 "tok_s_steady": 100 * scale * gain(3e-4)}}
        fitted = P.fit_prefetch_cpu(cost, table, [tr], SHAPE, spec).prefetch_cpu_s
        assert gain(fitted) == pytest.approx(gain(3e-4), rel=0.01)
    table[P.AHEAD_PROBE] = {"tok_s": 80 * gain(0.0) * 2, "tok_s_steady": 80 * gain(0.0) * 2}
    assert P.fit_prefetch_cpu(cost, table, [tr], SHAPE, spec).prefetch_cpu_s == 0.0
    assert P.fit_prefetch_cpu(cost, {"min lru": table["min lru"]}, [tr], SHAPE, spec) is cost


def test_miss_cost_is_fitted_so_the_probe_projects_as_measured():
    """The "min lru" probe's measured steady tok/s sets a miss's CPU cost by bisection."""
    from edgert.bench import moe_projection as P
    tr = skewed_trace(n=40)
    cost = CostModel(read_latency_s=0.0, read_Bps=EXTENT / 1e-3, token_s=0.0, layer_s=1e-3,
                     expert_s=0.0, hint_s=0.0)
    spec = {"kind": "cache", "budget": K / E, "policy": "lru"}
    want = P.project_over([tr], SHAPE, cost.with_(miss_s=4e-4), spec)["tok_s_steady"]
    table = {"min lru": {"tok_s": want, "tok_s_steady": want}}
    fitted = P.fit_miss_cost(cost, table, [tr], SHAPE, spec)
    assert fitted.miss_s == pytest.approx(4e-4, rel=0.01)
    table = {"min lru": {"tok_s": 1e9, "tok_s_steady": 1e9}}     # faster than any miss: 0
    assert P.fit_miss_cost(cost, table, [tr], SHAPE, spec).miss_s == 0.0
