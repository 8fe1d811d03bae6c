"""The projection: a routing trace replayed through the real expert cache on a virtual clock.

What runs is the real `ExpertCache` (route, acquire, release, hint, the hint governor,
read-ahead), its `ExpertSlots` (quotas, borrowing, eviction) and its policies, unchanged;
what is virtual is around it:
- `VirtualPool` stands in for arena slots (one shared buffer: no expert bytes exist);
- `VirtualReader` stands in for the pack: a demand read books the storage and moves the
  clock to its end (the engine waits for it);
- `VirtualWorker` stands in for the prefetch thread: it takes jobs in the real worker's
  order (read-ahead before hints, FIFO within one), one read at a time, each started when
  the worker is free and finished on the clock, using the cache's own `_prefetch_claim` /
  `_prefetch_done`; a demand that finds its expert still being read waits for it
  (`ReplayCache._wait_for_read`), which is where prefetch's stall shows;
- `VirtualStorage`: reads pay their latency in parallel and share the bandwidth in turn.
The driver (`drive`) makes the engine's calls for each step in the engine's order
(kinds/moe.py: per layer its dense compute, the next layer's hint, route, then acquire /
compute / release per group of experts) and charges `CostModel` seconds for compute.

`drive` also runs a live cache (no clock): the same trace through the same calls gives the
same hit counts (tests/test_moe_projection.py).
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from edgert.experts.api import ExpertLayout
from edgert.experts.cache import SKIP, ExpertCache
from edgert.projection.costmodel import CostModel, ModelShape
from edgert.projection.trace import RoutingTrace


class VirtualClock:
    def __init__(self):
        self.now = 0.0


class VirtualStorage:
    """One device: each read's latency overlaps others; transfers take the bandwidth in turn."""

    def __init__(self, cost: CostModel):
        self.cost = cost
        self.free = 0.0      # when the bandwidth is next free
        self.reads = 0

    def book(self, start: float, nbytes: int) -> float:
        """End time of a read of `nbytes` issued at `start`."""
        self.reads += 1
        begin = max(start + self.cost.read_latency_s, self.free)
        self.free = begin + nbytes / self.cost.read_Bps
        return self.free


class _Arena:
    def register(self, _):
        pass

    def unregister(self, _):
        pass


class VirtualPool:
    """SlotPool-like slots without memory: every view is the same buffer (never read)."""

    def __init__(self, slot_size: int):
        self.arena, self.slot_size, self.label = _Arena(), slot_size, "projection"
        self._ids: set[int] = set()
        self._next = itertools.count()
        self._buf = None

    def alloc(self, n: int = 1, *, reclaim: bool = True) -> list[int]:
        got = [next(self._next) for _ in range(n)]
        self._ids.update(got)
        return got

    def try_alloc(self, *, reclaim: bool = False):
        return None     # never given back, so never taken again

    def free(self, ids) -> None:
        self._ids.difference_update(ids)

    def view(self, slot: int) -> np.ndarray:
        if self._buf is None:
            self._buf = np.zeros(self.slot_size, np.uint8)
        return self._buf

    @property
    def count(self) -> int:
        return len(self._ids)

    def close(self) -> None:
        self._ids.clear()


def virtual_layout(shape: ModelShape) -> ExpertLayout:
    """An expert layout of `shape` (one uint8 tensor per part; nothing reads it)."""
    third = shape.expert_bytes // 3
    tensors = {name: {"dtype": "uint8", "shape": [third], "offset": i * third}
               for i, name in enumerate(("gate", "up", "down"))}
    table = {(l, e): l * shape.experts + e for l in range(shape.layers)
             for e in range(shape.experts)}
    return ExpertLayout(shape.layers, shape.experts, shape.top_k, shape.expert_bytes, tensors,
                        table, tuple(range(shape.layers)))


class VirtualReader:
    """The pack as the cache sees it: a demand read books the storage and waits on the clock."""

    def __init__(self, layout: ExpertLayout, clock: VirtualClock, storage: VirtualStorage,
                 miss_s: float = 0.0, first_extra_s: float = 0.0):
        self.manifest = SimpleNamespace(experts=SimpleNamespace(
            num_layers=layout.num_layers, num_experts=layout.num_experts, top_k=layout.top_k,
            extent_bytes=layout.extent_bytes, table=layout.table, moe_layers=layout.moe_layers,
            tensors={n: SimpleNamespace(dtype=t["dtype"], shape=t["shape"], offset=t["offset"])
                     for n, t in layout.tensors.items()}))
        entry = SimpleNamespace(length=layout.extent_bytes, zero=False)
        self.blocks = [entry] * len(layout.table)
        self.storage = SimpleNamespace(mode="virtual")
        self.clock, self.disk, self.miss_s, self.first_extra_s = clock, storage, miss_s, first_extra_s
        self.path = "<projection>"
        self.reads = 0           # demand reads (the worker books its own)
        self.first_reads = 0     # ... that followed compute rather than another demand read
        self._ended = None       # the clock when the last demand read ended

    def read_into(self, idxs, bufs, tensors=None):
        self.reads += len(idxs)
        n = sum(self.blocks[i].length for i in idxs)
        # NOTE: the clock stands still between two demand reads of one acquire; anything
        # else moves it (compute is charged per layer)
        extra = 0.0
        if self.clock.now != self._ended:
            self.first_reads += 1
            extra = self.first_extra_s
        self.clock.now = self.disk.book(self.clock.now, n) + self.miss_s + extra
        self._ended = self.clock.now
        return n, None


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    submitted: float = field(compare=False)
    args: tuple = field(compare=False)
    cursor: int = field(default=0, compare=False)


class VirtualWorker:
    """The prefetch worker on the virtual clock (see the module docstring)."""

    def __init__(self, run, clock: VirtualClock, storage: VirtualStorage, cpu_s: float = 0.0):
        self._run = run            # WeakMethod of ExpertCache._prefetch
        self.clock, self.disk, self.cpu_s = clock, storage, cpu_s
        self._queue: list[_Job] = []
        self._order = itertools.count()
        self._job: _Job | None = None      # the job being worked on
        self._inflight = None              # (end, layer, expert, slot, kind)
        self.free = 0.0                    # when the worker can start its next read

    @property
    def cache(self) -> ExpertCache:
        return self._run().__self__

    def submit(self, priority: int, job: tuple) -> None:
        heapq.heappush(self._queue, _Job(priority, next(self._order), self.clock.now, job))

    def advance(self, t: float) -> None:
        """Run the worker up to time `t`: finish reads that end by then, start the next ones."""
        while True:
            if self._inflight is not None:
                if self._inflight[0] > t:
                    return
                self._finish()
                self.clock.now += self.cpu_s   # its CPU work took a core from compute
                continue
            if not self._start_next(t):
                return

    def finish_one(self) -> None:
        """The engine waits for a read: run the worker until one finishes, moving the clock."""
        if self._inflight is None and not self._start_next(float("inf")):
            raise RuntimeError("projection: the cache waits for a read no one makes")
        self.clock.now = max(self.clock.now, self._inflight[0])
        self._finish()
        self.clock.now += self.cpu_s       # its CPU work (checks, bookkeeping) is waited for too

    def drain(self) -> None:
        self.advance(float("inf"))
        self.clock.now = max(self.clock.now, self.free)

    def close(self) -> None:
        self._queue.clear()

    def _finish(self) -> None:
        end, layer, e, slot, kind = self._inflight
        self._inflight = None
        cache = self.cache
        cache._prefetch_done(layer, e, slot, kind, cache.reader.blocks[cache.layout.block(layer, e)].length)

    def _start_next(self, t: float) -> bool:
        """Start the next read that can start by `t`; False when none can."""
        cache = self.cache
        while True:
            job = self._job
            if job is None:
                if not self._queue:
                    return False
                start = max(self.free, min(j.submitted for j in self._queue))
                if start > t:
                    return False
                ready = [j for j in self._queue if j.submitted <= start]
                job = min(ready)
                self._queue.remove(job)
                heapq.heapify(self._queue)
                self._job = job
                self.free = start
            layer, want, epoch, kind, keep = job.args
            if job.cursor >= len(want):
                self._job = None
                continue
            start = max(self.free, job.submitted)
            if start > t:
                return False
            e = want[job.cursor]
            job.cursor += 1
            slot = cache._prefetch_claim(layer, e, epoch, kind, keep)
            if slot is None:
                self._job = None
                continue
            if slot == SKIP:
                continue
            nbytes = cache.reader.blocks[cache.layout.block(layer, e)].length
            end = self.disk.book(start, nbytes)
            self._inflight = (end, layer, e, slot, kind)
            self.free = end
            return True


class ReplayCache(ExpertCache):
    """The expert cache with its waits on the virtual worker (nothing else differs)."""

    def _wait_for_read(self) -> None:
        if self._worker is None:
            raise RuntimeError("projection: the cache waits for a read with no worker")
        self._worker.finish_one()


@dataclass
class Projection:
    """What one replay projects: per decode token, seconds and demand reads; the cache's
    counters."""
    tpot_s: list
    stall_s: float
    stats: dict
    reads: list = field(default_factory=list)
    prefetch: bool = False
    first_reads: list = field(default_factory=list)   # per token: reads that followed compute

    def retimed(self, shape: ModelShape, cost: CostModel) -> "Projection":
        """The same replay on other costs. Only without prefetch: then nothing overlaps and
        no decision depends on time (every read is a demand read, the storage idle), so
        each token is its compute plus its reads, and hit counts do not change."""
        assert not self.prefetch, "a replay with prefetch depends on time: replay it again"
        compute = cost.resident_tpot(shape) + shape.layers * cost.route_s
        per_read = cost.read_s(shape.expert_bytes) + cost.miss_s
        first = self.first_reads or [0] * len(self.reads)
        extra = cost.first_read_extra_s
        tpot = [compute + n * per_read + f * extra for n, f in zip(self.reads, first)]
        return Projection(tpot, sum(self.reads) * per_read + sum(first) * extra, self.stats,
                          list(self.reads), first_reads=list(first))

    @property
    def tok_s(self) -> float:
        return len(self.tpot_s) / sum(self.tpot_s)

    def summary(self) -> dict:
        tot, n = self.stats.get("total", self.stats), len(self.tpot_s)
        x = np.asarray(self.tpot_s)
        return {"tok_s": self.tok_s, "tpot_p50_ms": 1e3 * float(np.median(self.tpot_s)),
                "tok_s_steady": float(1.0 / x[x <= np.quantile(x, 0.9)].mean()),
                "exact_hit_rate": tot.get("exact_hit_rate"),
                "effective_hit_rate": tot.get("effective_hit_rate"),
                "bytes_per_token": tot.get("bytes_read", 0) / n,
                "stall_per_token_s": self.stall_s / n,
                "prefetch_precision": tot.get("prefetch_precision")}


def drive(cache, trace: RoutingTrace, clock: VirtualClock | None = None,
          cost: CostModel | None = None, worker=None) -> Projection:
    """The engine's calls for every step of `trace`, in the engine's order. The first step
    (the prefill) is untimed: then the worker drains and the counters reset (as edgert bench
    moe does). With `clock`, `cost` charges compute and `worker` runs between calls."""
    layers = trace.layers
    L = len(layers)
    tick = (lambda: worker.advance(clock.now)) if worker is not None else (lambda: None)
    charge = (lambda s: setattr(clock, "now", clock.now + s)) if clock is not None else (lambda s: None)
    zero = cost is None
    tpot, stall, reads, firsts = [], 0.0, [], []
    reader = getattr(cache, "reader", None)
    for s, rows in trace.step_rows():
        if s == 1:
            if worker is not None:
                worker.drain()
            elif hasattr(cache, "drain"):
                cache.drain()
            cache.reset_stats()
            stall = 0.0
        t0 = clock.now if clock is not None else 0.0
        r0 = getattr(reader, "reads", 0)
        f0 = getattr(reader, "first_reads", 0)
        charge(0.0 if zero else cost.token_s)
        for i, l in enumerate(layers):
            charge(0.0 if zero else cost.layer_s)
            if i + 1 < L and trace.hinted[s, i + 1] and cache.wants_hint(layers[i + 1]):
                charge(0.0 if zero else cost.hint_s)
                tick()
                cache.hint(layers[i + 1], torch.from_numpy(trace.hints[rows, i + 1]))
            tick()
            topk = torch.from_numpy(trace.topk[rows, i].astype(np.int64))
            use = cache.route(l, torch.from_numpy(trace.probs[rows, i]), topk)
            charge(0.0 if zero else cost.route_s)
            experts = sorted(set(use.flatten().tolist()))
            group = getattr(cache, "max_acquire", None) or len(experts)
            for g in range(0, len(experts), group):
                ids = experts[g:g + group]
                tick()
                a = clock.now if clock is not None else 0.0
                cache.acquire(l, ids)
                if clock is not None and s > 0:
                    stall += clock.now - a
                charge(0.0 if zero else cost.expert_s * len(ids))
                cache.release(l, ids)
        if s > 0 and clock is not None:
            tpot.append(clock.now - t0)
            reads.append(getattr(reader, "reads", 0) - r0)
            firsts.append(getattr(reader, "first_reads", 0) - f0)
    return Projection(tpot, stall, cache.stats(), reads, bool(getattr(cache, "prefetch", False)),
                      firsts)


def project(trace: RoutingTrace, shape: ModelShape, cost: CostModel, num_slots: int,
            policy="lru", policy_options: dict | None = None, prefetch: bool = False,
            lossy_alpha: float = 0.0, prefetch_min_prob: float = 0.2,
            hint_probe=(256, 1024), quota: dict | None = None) -> Projection:
    """Replay `trace` through a `ReplayCache` of `num_slots` slots of `shape` on `cost`."""
    assert trace.num_experts == shape.experts and len(trace.layers) == shape.layers, \
        (trace.num_experts, shape.experts, len(trace.layers), shape.layers)
    clock = VirtualClock()
    disk = VirtualStorage(cost)
    layout = virtual_layout(shape)
    reader = VirtualReader(layout, clock, disk, cost.miss_s, cost.first_read_extra_s)
    workers = []

    def make_worker(run):
        workers.append(VirtualWorker(run, clock, disk, cost.prefetch_cpu_s))
        return workers[-1]

    cache = ReplayCache(reader, None, "projection", num_slots, policy=policy,
                        policy_options=policy_options, lossy_alpha=lossy_alpha,
                        prefetch=prefetch, prefetch_min_prob=prefetch_min_prob,
                        hint_probe=hint_probe, pool=VirtualPool(layout.slot_bytes),
                        worker=make_worker, quota=quota)
    try:
        return drive(cache, trace, clock, cost, workers[0] if workers else None)
    finally:
        cache.close()


def project_resident(trace: RoutingTrace, shape: ModelShape, cost: CostModel) -> dict:
    n = trace.decode_tokens()
    t = cost.resident_tpot(shape)
    return {"tok_s": 1.0 / t, "tok_s_steady": 1.0 / t, "tpot_p50_ms": 1e3 * t,
            "exact_hit_rate": 1.0, "effective_hit_rate": 1.0, "bytes_per_token": 0.0, "stall_per_token_s": 0.0,
            "tokens": n}


def project_on_demand(trace: RoutingTrace, shape: ModelShape, cost: CostModel) -> dict:
    """No cache: each step reads its k experts per layer, one after another, then computes."""
    per_layer_read = shape.top_k * (cost.read_s(shape.expert_bytes) + cost.miss_s) + \
        cost.first_read_extra_s
    t = cost.resident_tpot(shape) + shape.layers * per_layer_read
    return {"tok_s": 1.0 / t, "tok_s_steady": 1.0 / t, "tpot_p50_ms": 1e3 * t, "exact_hit_rate": 0.0,
            "effective_hit_rate": 0.0, "bytes_per_token": shape.layers * shape.top_k * shape.expert_bytes,
            "stall_per_token_s": shape.layers * per_layer_read}
