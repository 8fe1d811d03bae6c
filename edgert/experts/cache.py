"""ExpertCache: experts in arena slots, loaded on demand or ahead of time, evicted by a policy.

The front of the expert cache: it implements the `ExpertProvider` protocol (api.py) over
three parts, one concept each:
- `slots.py` (`ExpertSlots`): which slot holds which expert, pins, per-layer quotas and
  borrowing, eviction through the policy, slots given back to the arena and taken again;
- `prefetch.py` (`PrefetchWorker`): the background thread and its queue of read jobs;
- `policies.py`: which expert leaves (the table asks; the front reports accesses and loads).
The front routes (exact or lossy, `substitution.py`), pins, reads experts (its own demand
reads; the worker runs `_prefetch` for hints and for routed experts read ahead), counts
(`stats.py`) and records the trace.

Thread model: the engine calls route/acquire/release/hint from one thread; the prefetch
worker reads on its own and holds only a weak reference to the cache, so dropping the
cache stops it. `_cv` (the table's Condition) guards all state; reads and hash checks run
outside it. NOTE: a slot being read has `ready=False`; such slots are never eviction
candidates, and a demand for an expert in flight waits for that read instead of starting a
second one.
"""
from __future__ import annotations

import time
import weakref

import numpy as np
import torch

from edgert.errors import BudgetExceeded
from edgert.experts.api import ExpertLayout, ExpertWeights
from edgert.experts.hints import HintGovernor, rank_hint
from edgert.experts.policies import EvictionPolicy, make_policy
from edgert.experts.prefetch import AHEAD, HINT, PrefetchWorker
from edgert.experts.slots import ExpertSlots
from edgert.experts.stats import LayerCounters, summarize
from edgert.experts.substitution import substitute

SKIP = -1   # _prefetch_claim: nothing to read for this expert (slot ids are >= 0)


class ExpertCache:
    """An `ExpertProvider` (edgert/experts/api.py) over a fixed number of arena slots.

    `policy`: "lru" | "lfu" | "gate" | "belady" or an EvictionPolicy; `policy_options` go to
    make_policy (`decay=`, `future=`). `lossy_alpha > 0` enables substitution (`route`).
    `prefetch` enables `hint()` loads on the worker thread. `quota`: slots per layer (summing
    to `num_slots`; default: an even split), e.g. from `share.share_slots`. `pool` (slots that are not arena
    memory) and `worker` (what runs the prefetch jobs) are the projection's seams
    (projection/replay.py: virtual slots, a worker on a virtual clock); defaults are the real ones.
    """

    def __init__(self, reader, arena, label: str, num_slots: int, policy="gate",
                 lossy_alpha: float = 0.0,
                 prefetch: bool = True, prefetch_width: int | None = None,
                 prefetch_min_prob: float = 0.2, record_trace: bool = False,
                 policy_options: dict | None = None,
                 hint_probe: tuple[int, int] | None = (256, 1024),
                 pool=None, worker=PrefetchWorker, quota: dict[int, int] | None = None,
                 layout: ExpertLayout | None = None):
        self.layout = lay = layout or ExpertLayout.from_reader(reader)
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
        # NOTE: one dict shared with the slot table (it counts evictions, borrowed slots);
        # reset_stats replaces its values, never the dict
        self.counters = {l: LayerCounters() for l in self.layers}
        # BudgetExceeded before anything is read; other models' cache gives way first
        self._slots = slots = ExpertSlots(arena, label, lay, num_slots, self.policy, self.counters,
                                          pool=pool, quota=quota)
        self.pool, self.num_slots, self.minimum, self.quota = \
            slots.pool, slots.num_slots, slots.minimum, slots.quota
        self._cv = slots.cv
        # routed this step: prefetch never evicts them
        self._protected = {l: frozenset() for l in self.layers}
        self._epoch = {l: 0 for l in self.layers}          # bumped by route(); stale hints skip
        self._hinted: dict[int, set[int]] = {}
        self._trace: dict[int, list[int]] | None = \
            {l: [] for l in self.layers} if record_trace else None
        self.prefetch = bool(prefetch)
        self.prefetch_width = prefetch_width or lay.top_k
        self.prefetch_min_prob = float(prefetch_min_prob)
        self._governor = HintGovernor(hint_probe)   # pauses hints that queue no reads
        self._closing = False                       # under `_cv`: prefetches claim no slot
        self._worker = worker(weakref.WeakMethod(self._prefetch)) if self.prefetch else None

    @property
    def max_acquire(self) -> int:
        """How many experts the engine may pin at once: the slots held now."""
        return max(1, self.pool.count)

    @property
    def reclaimed(self) -> int:
        """Slots the arena took back for other models."""
        return self._slots.reclaimed

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
        s_ = self._slots
        with self._cv:
            self._epoch[layer] += 1
            epoch = self._epoch[layer]
            hits = int(s_.ready[layer][sel].sum())
            inflight = int(s_.loading[layer][sel].sum())
            if hits < T * k:
                ready, loading = s_.ready[layer].copy(), s_.loading[layer].copy()
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
                self._worker.submit(AHEAD, (layer, missing[:0:-1], epoch, "ahead",
                                            frozenset(used)))
        if out is sel:
            return topk_idx
        return torch.from_numpy(out).to(topk_idx.dtype).reshape(topk_idx.shape)

    def acquire(self, layer: int, expert_ids) -> dict[int, ExpertWeights]:
        """Pin and return `expert_ids` of `layer`, loading the missing ones (PackCorrupt names
        the layer and expert of a damaged extent; the other experts stay usable)."""
        ids = [int(e) for e in expert_ids]
        s_ = self._slots
        with self._cv:  # fast path: every expert loaded, one lock round
            slots = [s_.where.get((layer, e)) for e in ids]
            if all(s is not None and s_.info[s].ready for s in slots):
                now = time.monotonic()
                c = self.counters[layer]
                c.requests += len(ids)
                c.ready_hits += len(ids)
                for e, s in zip(ids, slots):
                    info = s_.info[s]
                    info.pins += 1
                    if info.by_prefetch and not info.used:
                        c.prefetch_used += 1
                    info.used = True
                    info.last = now
                    self.policy.on_access(layer, e)
                if self._trace is not None:
                    self._trace[layer].extend(ids)
                return {e: s_.weights(s) for e, s in zip(ids, slots)}
        pinned: list[int] = []
        c, read = self.counters[layer], False
        try:
            for e in ids:
                dt = self._acquire_one(layer, e)
                if dt is not None:                         # a demand read: timed by kind
                    if read:
                        c.next_reads += 1
                        c.next_read_s += dt
                    else:
                        c.first_reads += 1
                        c.first_read_s += dt
                    read = True
                pinned.append(e)
        except BaseException:
            self.release(layer, pinned)
            raise
        if self._trace is not None:
            self._trace[layer].extend(ids)
        with self._cv:
            return {e: s_.weights(s_.where[(layer, e)]) for e in ids}

    def release(self, layer: int, expert_ids) -> None:
        s_ = self._slots
        with self._cv:
            for e in expert_ids:
                info = s_.info[s_.where[(layer, int(e))]]
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
                want = [e for e in ranked if (layer, e) not in self._slots.where]
                epoch = self._epoch[layer]
        self._governor.observe(bool(want))
        if want:
            c.hints_queued += 1
            self._worker.submit(HINT, (layer, want, epoch, "hint", frozenset(ranked)))

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
            for l in self.layers:
                self.counters[l] = LayerCounters()
            self._governor.pauses = 0

    def trace(self) -> dict[int, list[int]]:
        """Per layer, the experts acquired in order (record_trace=True): BeladyPolicy's future."""
        assert self._trace is not None, "construct with record_trace=True"
        return {l: list(s) for l, s in self._trace.items()}

    def resident(self, layer: int) -> set[int]:
        return self._slots.resident(layer)

    def drain(self) -> None:
        """Wait until queued prefetches are done (tests, benchmarks)."""
        if self._worker is not None:
            self._worker.drain()

    def close(self) -> None:
        """Drop the queued prefetches (they never run), wait for the read in flight, then give
        every slot back. Afterwards nothing reads into the slots or takes arena memory.
        Idempotent."""
        with self._cv:
            self._closing = True       # a job already running stops after its current read
        if self._worker is not None:
            self._worker.close()
        self._slots.close()

    # --- loading -------------------------------------------------------------------------
    def _acquire_one(self, layer: int, e: int) -> float | None:
        """Pin (layer, e), reading it if needed; the seconds this call spent when it read it,
        None when it did not."""
        c = self.counters[layer]
        s_ = self._slots
        key = (layer, e)
        with self._cv:
            c.requests += 1
            t0 = time.perf_counter()
            while True:
                slot = s_.where.get(key)
                if slot is not None:
                    info = s_.info[slot]
                    info.pins += 1                 # pinned before waiting: cannot be evicted now
                    if info.ready:
                        c.ready_hits += 1
                        break
                    while not (info.ready or info.failed):
                        self._wait_for_read()
                    if info.ready:
                        c.inflight_waits += 1
                        c.stall_s += time.perf_counter() - t0
                        break
                    continue                       # the worker's read failed: read it ourselves
                slot = s_.reserve(layer, self._protected[layer])
                if slot is not None:
                    s_.claim(slot, layer, e, pins=1, by_prefetch=False)
                    return self._demand_read(layer, e, slot, t0)
                self._wait_for_read()              # every slot pinned or loading: wait for a read
            if info.by_prefetch and not info.used:
                c.prefetch_used += 1
            info.used = True
            info.last = time.monotonic()
            self.policy.on_access(layer, e)
            return None

    def _demand_read(self, layer: int, e: int, slot: int, t0: float) -> float:
        """Read a claimed slot outside the lock (caller holds `_cv`; released meanwhile)."""
        c = self.counters[layer]
        s_ = self._slots
        self._cv.release()
        try:
            nbytes = self._read(layer, e, slot)
        except BaseException:
            self._cv.acquire()
            s_.unclaim(slot)
            raise
        self._cv.acquire()
        s_.mark_ready(slot)
        s_.info[slot].used = True
        s_.info[slot].last = time.monotonic()
        c.loads += 1
        c.bytes_read += nbytes
        dt = time.perf_counter() - t0
        c.stall_s += dt
        self.policy.on_insert(layer, e)
        self.policy.on_access(layer, e)
        self._cv.notify_all()
        return dt

    def _read(self, layer: int, e: int, slot: int) -> int:
        """Read expert (layer, e) into `slot` through the pack's verified read path (a
        damaged extent raises PackCorrupt naming the layer and expert); bytes read."""
        idx = self.layout.block(layer, e)
        self.reader.read_into([idx], [self.pool.view(slot)], tensors=[f"layer {layer} expert {e}"])
        return self.reader.blocks[idx].length

    def _wait_for_read(self) -> None:
        """Wait (holding `_cv`) until some read finishes. The projection's cache finishes the
        next read on its virtual clock here instead."""
        self._cv.wait()

    def _prefetch(self, layer: int, want: list[int], epoch: int, kind: str,
                  keep: frozenset) -> None:
        """A worker job: load `want` into free or evictable slots of `layer`. kind "hint":
        predicted experts of an upcoming layer; "ahead": routed experts that acquire will need
        next. Experts in `keep` (the whole predicted or routed set) are never evicted for these
        loads, nor are pinned, loading or routed-this-step experts."""
        for e in want:
            slot = self._prefetch_claim(layer, e, epoch, kind, keep)
            if slot is None:
                return
            if slot == SKIP:
                continue
            try:
                nbytes = self._read(layer, e, slot)
            except Exception:
                nbytes = None
            self._prefetch_done(layer, e, slot, kind, nbytes)

    def _prefetch_claim(self, layer: int, e: int, epoch: int, kind: str,
                        keep: frozenset) -> int | None:
        """A slot claimed for a prefetch of (layer, e); SKIP when it is resident or on its
        way; None when the job should stop (closing, the layer routed since, or no slot)."""
        s_ = self._slots
        with self._cv:
            if self._closing or self._epoch[layer] != epoch:   # routed: demand loads took over
                return None
            if (layer, e) in s_.where:
                return SKIP
            slot = s_.reserve(layer, self._protected[layer] | keep, prefetch=True)
            if slot is None:
                return None
            s_.claim(slot, layer, e, pins=0, by_prefetch=kind == "hint")
            return slot

    def _prefetch_done(self, layer: int, e: int, slot: int, kind: str,
                       nbytes: int | None) -> None:
        """The prefetch read into `slot` finished (`nbytes` read) or failed (None)."""
        s_ = self._slots
        with self._cv:
            c = self.counters[layer]
            if nbytes is None:
                c.prefetch_errors += 1
                s_.unclaim(slot)
                return
            s_.mark_ready(slot)
            if kind == "hint":
                c.prefetch_loads += 1
            else:
                c.ahead_loads += 1
            c.bytes_read += nbytes
            self.policy.on_insert(layer, e)
            self._cv.notify_all()
