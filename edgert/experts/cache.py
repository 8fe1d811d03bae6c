"""ExpertCache: experts in arena slots, loaded on demand or ahead of time, evicted by a policy.

Mechanism only. The cache owns `num_slots` slots of the arena's "experts" pool (one expert
extent each), a map (layer, expert) -> slot, pin counts, one prefetch worker thread and the
counters in `stats.py`. Which expert leaves is the policy's choice (`policies.py`).

Slots are partitioned per layer (see policies.py for why): layer l owns a quota of
`num_slots // L` (the first `num_slots % L` layers one more). A load into layer l evicts one of
l's own unpinned experts once l holds its quota. When l must pin more experts at once than its
quota (a prefill step; a budget of one slot per layer with top-2 routing) it borrows: a free
slot, else a victim from the layer furthest over its quota, else from any layer with an
unpinned expert. Borrowed slots flow back because an over-quota layer always evicts its own.
`BudgetExceeded` only when every slot is pinned.

Memory: the slots are a `SlotPool` of the cache's own (one expert extent each), taken at
load (a load may reclaim other models' cache). Slots beyond the cache's *minimum* that
hold no pinned expert are cache too: the arena may take them back for another model
(`reclaimable`/`reclaim`, least recently used first); the cache then runs with fewer
slots and grows back into free memory on later misses. The minimum is
``max(2 * top_k, sparse layers)`` slots (capped by the budget): a routed step and a
prefetch can always both hold their experts.

Thread model: the engine calls route/acquire/release/hint from one thread; the prefetch
worker reads on its own and holds only a weak reference to the cache, so dropping the
cache stops it. `_cv` (a Condition) guards all state; reads and hash checks run
outside it. NOTE: a slot being read has `ready=False`; such slots are never eviction
candidates, and a demand for an expert in flight waits for that read instead of starting a
second one.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from edgert.errors import BudgetExceeded
from edgert.experts.api import ExpertLayout, ExpertWeights
from edgert.experts.hints import HintGovernor, rank_hint
from edgert.experts.policies import EvictionPolicy, make_policy
from edgert.experts.stats import LayerCounters, summarize
from edgert.experts.substitution import substitute
from edgert.memory.arena import PAGE, SlotPool

@dataclass
class _Slot:
    layer: int
    expert: int
    ready: bool = False
    failed: bool = False
    pins: int = 0
    by_prefetch: bool = False
    used: bool = False
    last: float = 0.0      # last acquire (time.monotonic), for the arena's reclaim order


class ExpertCache:
    """An `ExpertProvider` (edgert/experts/api.py) over a fixed number of arena slots.

    `policy`: "lru" | "lfu" | "gate" | "belady" or an EvictionPolicy; `policy_options` go to
    make_policy (`decay=`, `future=`). `lossy_alpha > 0` enables substitution (`route`).
    `prefetch` enables `hint()` loads on the worker thread.
    """

    def __init__(self, reader, arena, label: str, num_slots: int, policy="gate",
                 lossy_alpha: float = 0.0,
                 prefetch: bool = True, prefetch_width: int | None = None,
                 prefetch_min_prob: float = 0.2, record_trace: bool = False,
                 policy_options: dict | None = None,
                 hint_probe: tuple[int, int] | None = (256, 1024)):
        self.layout = lay = ExpertLayout.from_reader(reader)
        self.reader, self.label = reader, label
        if lossy_alpha < 0:
            raise ValueError(f"lossy_alpha must be >= 0, got {lossy_alpha}")
        self.alpha = float(lossy_alpha)
        self.layers = lay.moe_layers
        total = len(lay.table)
        num_slots = min(int(num_slots), total)
        if num_slots < lay.top_k:
            raise BudgetExceeded(f"expert cache: top-{lay.top_k} routing needs {lay.top_k} slots",
                                 lay.top_k * lay.slot_bytes, num_slots * lay.slot_bytes)
        self.policy: EvictionPolicy = policy if isinstance(policy, EvictionPolicy) else \
            make_policy(policy, lay.num_layers, lay.num_experts, **(policy_options or {}))
        # BudgetExceeded before anything is read; other models' cache gives way first
        self.pool = pool = SlotPool(arena, label, lay.slot_bytes)
        pool.alloc(num_slots, reclaim=True)
        self.num_slots = num_slots
        self.minimum = min(num_slots, max(2 * lay.top_k, len(self.layers)))
        # Weights views per slot, made once: a slot's bytes change in place on reload.
        self._views = {s: lay.views(pool.view(s)) for s in pool._ids}
        base, extra = divmod(num_slots, len(self.layers))
        self.quota = {l: base + (i < extra) for i, l in enumerate(self.layers)}
        self._cv = threading.Condition()
        self._free = sorted(pool._ids)
        self._info: dict[int, _Slot] = {}                 # slot -> what it holds
        self._where: dict[tuple[int, int], int] = {}      # (layer, expert) -> slot
        self._count = {l: 0 for l in self.layers}          # slots held (loaded or loading)
        # NOTE: mirrors of _info for route()'s hot path: loaded / being read, per layer and expert
        self._ready = np.zeros((lay.num_layers, lay.num_experts), dtype=bool)
        self._loading = np.zeros((lay.num_layers, lay.num_experts), dtype=bool)
        # routed this step: prefetch never evicts them
        self._protected = {l: frozenset() for l in self.layers}
        self._epoch = {l: 0 for l in self.layers}          # bumped by route(); stale hints skip
        self._hinted: dict[int, set[int]] = {}
        self.counters = {l: LayerCounters() for l in self.layers}
        self._trace: dict[int, list[int]] | None = \
            {l: [] for l in self.layers} if record_trace else None
        self.prefetch = bool(prefetch)
        self.prefetch_width = prefetch_width or lay.top_k
        self.prefetch_min_prob = float(prefetch_min_prob)
        self._governor = HintGovernor(hint_probe)   # pauses hints that queue no reads
        # (priority, order, job): reads ahead of a routed step (0) before hints (1)
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._worker = None
        self.reclaimed = 0
        if self.prefetch:
            # NOTE: the worker holds the queue and a weak reference, never the cache
            self._worker = threading.Thread(target=_prefetch_loop,
                                            args=(weakref.ref(self), self._jobs),
                                            name="edgert-expert-prefetch", daemon=True)
            self._worker.start()
        self._stop = weakref.finalize(self, _stop_worker, self._jobs, self._order)
        arena.register(self)

    @property
    def max_acquire(self) -> int:
        """How many experts the engine may pin at once: the slots held now."""
        return max(1, self.pool.count)
    # --- ExpertProvider --------------------------------------------------------------------
    def route(self, layer: int, probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """The experts to compute with. Exact (alpha = 0): `topk_idx` unchanged. Lossy: the
        band of `substitution.py` per token, where "loaded" excludes experts still being read."""
        k = topk_idx.shape[-1]
        sel = topk_idx.detach().reshape(-1, k).cpu().numpy()                        # [T, k]
        T = sel.shape[0]
        # NOTE: probabilities cross to numpy only when a policy or the lossy band reads them.
        p = probs.detach().float().reshape(T, -1).cpu().numpy() \
            if self.alpha > 0 or self.policy.observes_scores else None              # [T, E]
        c = self.counters[layer]
        with self._cv:
            self._epoch[layer] += 1
            epoch = self._epoch[layer]
            hits = int(self._ready[layer][sel].sum())
            inflight = int(self._loading[layer][sel].sum())
            if hits < T * k:
                ready, loading = self._ready[layer].copy(), self._loading[layer].copy()
            if p is not None and self.policy.observes_scores:
                self.policy.observe(layer, p)
        out, subs = sel, 0
        if self.alpha > 0 and hits < T * k and k < p.shape[1]:
            out = sel.copy()
            for t in range(T):
                subs += substitute(p[t], out[t], ready, self.alpha)
        c.demands += T * k
        c.exact_hits += hits
        c.inflight_at_route += inflight
        c.substitutions += subs
        used = set(out[0].tolist()) if T == 1 else set(np.unique(out).tolist())
        hinted = self._hinted.pop(layer, None)
        if hinted is not None:
            wanted = set(sel[0].tolist()) if T == 1 else set(np.unique(sel).tolist())
            c.demanded_after_hint += len(wanted)
            c.demanded_and_predicted += len(wanted & hinted)
        self._protected[layer] = frozenset(used)   # one atomic store; the worker reads it locked
        if self.prefetch and hits < T * k:
            # Read ahead: acquire reads the lowest missing id itself; the worker takes the
            # others from the top down, so two reads run at once instead of one after another.
            missing = sorted(e for e in used if not ready[e] and not loading[e])
            if len(missing) > 1:
                self._jobs.put((0, next(self._order),
                                (layer, missing[:0:-1], epoch, "ahead", frozenset(used))))
        if out is sel:
            return topk_idx
        return torch.from_numpy(out).to(topk_idx.dtype).reshape(topk_idx.shape)

    def acquire(self, layer: int, expert_ids) -> dict[int, ExpertWeights]:
        """Pin and return `expert_ids` of `layer`, loading the missing ones (PackCorrupt names
        the layer and expert of a damaged extent; the other experts stay usable)."""
        ids = [int(e) for e in expert_ids]
        with self._cv:  # fast path: every expert loaded, one lock round
            slots = [self._where.get((layer, e)) for e in ids]
            if all(s is not None and self._info[s].ready for s in slots):
                now = time.monotonic()
                c = self.counters[layer]
                c.requests += len(ids)
                c.ready_hits += len(ids)
                for e, s in zip(ids, slots):
                    info = self._info[s]
                    info.pins += 1
                    if info.by_prefetch and not info.used:
                        c.prefetch_used += 1
                    info.used = True
                    info.last = now
                    self.policy.on_access(layer, e)
                if self._trace is not None:
                    self._trace[layer].extend(ids)
                return {e: self._views[s] for e, s in zip(ids, slots)}
        pinned: list[int] = []
        try:
            for e in ids:
                self._acquire_one(layer, e)
                pinned.append(e)
        except BaseException:
            self.release(layer, pinned)
            raise
        if self._trace is not None:
            self._trace[layer].extend(ids)
        with self._cv:
            return {e: self._views[self._where[(layer, e)]] for e in ids}

    def release(self, layer: int, expert_ids) -> None:
        with self._cv:
            for e in expert_ids:
                info = self._info[self._where[(layer, int(e))]]
                assert info.pins > 0, f"layer {layer} expert {e} released more often than acquired"
                info.pins -= 1

    def wants_hint(self, layer: int) -> bool:
        """Whether the engine should compute a hint for `layer` now (prefetch on, not paused)."""
        if not self.prefetch:
            return False
        if self._governor.wants():
            return True
        if layer in self.counters:
            self.counters[layer].hints_skipped += 1
        return False

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """Queue loads of the experts an upcoming `layer` will probably route to (`rank_hint`:
        per token its top `prefetch_width` with probability >= `prefetch_min_prob`, at most the
        layer's quota). Nothing is queued (no worker wake-up) when they are all resident or
        on their way."""
        if not self.prefetch or layer not in self.quota:
            return
        c = self.counters[layer]
        c.hints += 1
        ranked = rank_hint(probs, self.prefetch_width, self.prefetch_min_prob, self.quota[layer])
        self._hinted[layer] = set(ranked)
        c.predicted += len(ranked)
        want = []
        if ranked:
            with self._cv:
                want = [e for e in ranked if (layer, e) not in self._where]
                epoch = self._epoch[layer]
        self._governor.observe(bool(want))
        if want:
            c.hints_queued += 1
            self._jobs.put((1, next(self._order), (layer, want, epoch, "hint", frozenset(ranked))))

    def stats(self) -> dict:
        with self._cv:
            out = summarize(self.counters)
        out.update(provider="expert-cache", policy=self.policy.name.value, lossy_alpha=self.alpha,
                   prefetch=self.prefetch, hint_pauses=self._governor.pauses,
                   slots=self.num_slots, slots_held=self.pool.count, minimum=self.minimum,
                   reclaimed=self.reclaimed, slot_bytes=self.pool.slot_size,
                   quota={int(l): q for l, q in self.quota.items()},
                   read_mode=self.reader.storage.mode)
        return out

    # --- extras ------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._cv:
            self.counters = {l: LayerCounters() for l in self.layers}
            self._governor.pauses = 0

    def trace(self) -> dict[int, list[int]]:
        """Per layer, the experts acquired in order (record_trace=True): BeladyPolicy's future."""
        assert self._trace is not None, "construct with record_trace=True"
        return {l: list(s) for l, s in self._trace.items()}

    def resident(self, layer: int) -> set[int]:
        with self._cv:
            return {e for (l, e), s in self._where.items() if l == layer and self._info[s].ready}

    def drain(self) -> None:
        """Wait until queued prefetches are done (tests, benchmarks)."""
        self._jobs.join()

    def close(self) -> None:
        """Stop the worker and give every slot back. Idempotent."""
        self._stop()
        w, self._worker = self._worker, None
        if w is not None and w is not threading.current_thread():
            w.join(timeout=10)
        with self._cv:
            self.pool.arena.unregister(self)
            self._info.clear()
            self._where.clear()
            self._free = []
            self._ready[:] = False
            self._loading[:] = False
            self.pool.close()

    # --- the arena takes cache back ------------------------------------------------------
    def reclaimable(self) -> list[tuple[int, int, float]]:
        """Free slots, then unpinned loaded experts by last use, down to the minimum."""
        if not self._cv.acquire(blocking=False):
            return []
        try:
            spare = self.pool.count - self.minimum
            if spare <= 0:
                return []
            pages = self.pool.slot_size // PAGE
            idle = sorted((i.last, s) for s, i in self._info.items() if i.ready and i.pins == 0)
            out = [(s, pages, 0.0) for s in self._free] + [(s, pages, t) for t, s in idle]
            return out[:spare]
        finally:
            self._cv.release()

    def reclaim(self, slots: list[int]) -> int:
        if not self._cv.acquire(blocking=False):
            return 0
        try:
            gone = 0
            for s in slots:
                if self.pool.count <= self.minimum:
                    break
                if s in self._free:
                    self._free.remove(s)
                else:
                    info = self._info.get(s)
                    if info is None or not info.ready or info.pins:
                        continue
                    self._evict(info.layer, [info.expert], slot=s)
                self._views.pop(s, None)
                self.pool.free([s])
                gone += 1
            self.reclaimed += gone
            return gone
        finally:
            self._cv.release()

    def _grow(self, reclaim: bool) -> int | None:
        """A slot given back to the arena earlier, taken again (never past num_slots), or
        None. ``reclaim``: other models' cache may give way. Caller holds `_cv`."""
        if self.pool.count >= self.num_slots:
            return None
        s = self.pool.try_alloc(reclaim=reclaim)
        if s is not None:
            self._views[s] = self.layout.views(self.pool.view(s))
        return s

    # --- mechanism -----------------------------------------------------------------------
    def _acquire_one(self, layer: int, e: int) -> None:
        c = self.counters[layer]
        key = (layer, e)
        with self._cv:
            c.requests += 1
            t0 = time.perf_counter()
            while True:
                slot = self._where.get(key)
                if slot is not None:
                    info = self._info[slot]
                    info.pins += 1                 # pinned before waiting: cannot be evicted now
                    if info.ready:
                        c.ready_hits += 1
                        break
                    while not (info.ready or info.failed):
                        self._cv.wait()
                    if info.ready:
                        c.inflight_waits += 1
                        c.stall_s += time.perf_counter() - t0
                        break
                    continue                       # the worker's read failed: read it ourselves
                slot = self._reserve(layer, keep=frozenset())
                if slot is not None:
                    self._claim(slot, layer, e, pins=1, by_prefetch=False)
                    return self._demand_read(layer, e, slot, t0)
                self._cv.wait()                    # every slot pinned or loading: wait for a read
            if info.by_prefetch and not info.used:
                c.prefetch_used += 1
            info.used = True
            info.last = time.monotonic()
            self.policy.on_access(layer, e)

    def _demand_read(self, layer: int, e: int, slot: int, t0: float) -> None:
        """Read a claimed slot outside the lock (caller holds `_cv`; released meanwhile)."""
        c = self.counters[layer]
        self._cv.release()
        try:
            nbytes = self._read(layer, e, slot)
        except BaseException:
            self._cv.acquire()
            self._unclaim(slot)
            raise
        self._cv.acquire()
        self._mark_ready(slot)
        self._info[slot].used = True
        self._info[slot].last = time.monotonic()
        c.loads += 1
        c.bytes_read += nbytes
        c.stall_s += time.perf_counter() - t0
        self.policy.on_insert(layer, e)
        self.policy.on_access(layer, e)
        self._cv.notify_all()

    def _reserve(self, layer: int, keep: frozenset, prefetch: bool = False) -> int | None:
        """A slot for a new expert of `layer` (caller holds `_cv`), or None when the only way is
        to wait for a read in flight. Prefetch never borrows and never evicts pinned, loading,
        routed-this-step (`_protected`) or `keep` experts."""
        if not self._free and self.pool.count < self.num_slots:
            s = self._grow(reclaim=False)         # given back earlier: take it again if free
            if s is not None:
                self._free.append(s)
        if self._count[layer] < self.quota[layer] and self._free:
            return self._free.pop()
        if prefetch:
            own = self._candidates(layer, self._protected[layer] | keep)
        else:  # demand: spare this step's routed experts (maybe read ahead) while others exist
            own = self._candidates(layer, self._protected[layer]) or \
                self._candidates(layer, frozenset())
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
        if any(not i.ready and i.pins == 0 for i in self._info.values()):
            return None                            # a prefetch read will free up a candidate
        # NOTE: every slot is pinned (or loading for a pinned demand): a slot the arena took
        # back earlier, other models' cache giving way, before refusing
        s = self._grow(reclaim=True)
        if s is not None:
            self.counters[layer].borrowed += 1
            return s
        raise BudgetExceeded(f"expert slots: all {self.pool.count} are pinned "
                             f"(layer {layer} needs one more)", self.pool.slot_size, 0)

    def _candidates(self, layer: int, skip: frozenset) -> list[int]:
        return [e for (l, e), s in self._where.items() if l == layer and self._info[s].ready
                and self._info[s].pins == 0 and e not in skip]

    def _mark_ready(self, slot: int) -> None:
        info = self._info[slot]
        info.ready = True
        self._ready[info.layer, info.expert], self._loading[info.layer, info.expert] = True, False

    def _evict(self, layer: int, candidates: list[int], slot: int | None = None) -> int:
        e = self.policy.victim(layer, candidates) if slot is None else candidates[0]
        assert e in candidates, f"policy {self.policy.name} chose {e}, not a candidate"
        slot = self._where.pop((layer, e))
        del self._info[slot]
        self._ready[layer, e] = False
        self._count[layer] -= 1
        self.counters[layer].evictions += 1
        self.policy.on_evict(layer, e)
        return slot

    def _claim(self, slot: int, layer: int, e: int, pins: int, by_prefetch: bool) -> None:
        self._info[slot] = _Slot(layer, e, pins=pins, by_prefetch=by_prefetch)
        self._where[(layer, e)] = slot
        self._loading[layer, e] = True
        self._count[layer] += 1

    def _unclaim(self, slot: int) -> None:
        info = self._info.pop(slot)
        info.failed = True
        del self._where[(info.layer, info.expert)]
        self._loading[info.layer, info.expert] = False
        self._count[info.layer] -= 1
        self._free.append(slot)
        self._cv.notify_all()

    def _read(self, layer: int, e: int, slot: int) -> int:
        """Read expert (layer, e) into `slot` through the pack's verified read path (a
        damaged extent raises PackCorrupt naming the layer and expert); bytes read."""
        idx = self.layout.block(layer, e)
        self.reader.read_into([idx], [self.pool.view(slot)], tensors=[f"layer {layer} expert {e}"])
        return self.reader.blocks[idx].length

    def _prefetch(self, layer: int, want: list[int], epoch: int, kind: str,
                  keep: frozenset) -> None:
        """Load `want` into free or evictable slots of `layer`. kind "hint": predicted experts
        of an upcoming layer; "ahead": routed experts that acquire will need next. Experts in
        `keep` (the whole predicted or routed set) are never evicted for these loads."""
        for e in want:
            with self._cv:
                if self._epoch[layer] != epoch:   # the layer already routed: demand loads took over
                    return
                if (layer, e) in self._where:
                    continue
                slot = self._reserve(layer, keep, prefetch=True)
                if slot is None:
                    return
                self._claim(slot, layer, e, pins=0, by_prefetch=kind == "hint")
            try:
                nbytes = self._read(layer, e, slot)
            except Exception:
                with self._cv:
                    self.counters[layer].prefetch_errors += 1
                    self._unclaim(slot)
                continue
            with self._cv:
                self._mark_ready(slot)
                c = self.counters[layer]
                if kind == "hint":
                    c.prefetch_loads += 1
                else:
                    c.ahead_loads += 1
                c.bytes_read += nbytes
                self.policy.on_insert(layer, e)
                self._cv.notify_all()


def _prefetch_loop(ref, jobs: queue.PriorityQueue) -> None:
    """The prefetch worker: runs jobs while the cache lives; a None job or a dead cache
    ends it."""
    while True:
        _, _, job = jobs.get()
        try:
            cache = ref() if job is not None else None
            if cache is None:
                return
            cache._prefetch(*job)
            del cache
        finally:
            jobs.task_done()


def _stop_worker(jobs: queue.PriorityQueue, order) -> None:
    jobs.put((9, next(order), None))
