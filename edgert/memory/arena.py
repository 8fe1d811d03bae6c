"""Arena: the one block of memory edgert owns, shared by every model loaded from a Runtime.

The arena maps ``memory.total - memory.engine`` bytes once, at start, and hands them out
as *extents*: runs of whole 4 KiB pages, each owned by one consumer under a label
("tasks.edgepack: task weights", "moe.edgepack: expert slots", ...). Consumers keep their
own geometry: a task run is one extent (a `Lease`), a block cache or an expert cache is a
`SlotPool` of equal slots of the size *it* needs, each slot its own extent (both in
slots.py). Nothing depends on which model was loaded first.

Memory is *held* (a task's weights, an MoE model's dense weights, pinned experts, KV pages
in use) or *cached* (spare task blocks, unpinned experts above a model's minimum, idle KV
pages). Caches register a `Reclaimer` with the arena. When an allocation does not fit in
free pages and may reclaim (a load, a KV page for a request), the arena takes cache back:

1. the least recently used cached extent, across every consumer, that is large enough;
2. for a request larger than any cached extent (a model's weights), the cached extents
   of the window of free-or-cached pages that needs the fewest cached pages evicted.

Held memory is never taken. If free + cached memory cannot hold the request (or no window
without held pages exists), `BudgetExceeded` says who holds what; nothing has changed.
Caches that grow on their own (a block kept on switch, a prefetched expert) use only free
memory and then recycle their own slots.

``memory.engine`` is the allowance for memory an engine allocates itself (ONNX Runtime's
pre-packed sessions, its working memory during a run): not mapped here, accounted with
``charge()``/``charge_items()``/``discharge()``.
"""
from __future__ import annotations

import bisect
import logging
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..align import ALIGN
from ..config import DeviceConfig
from ..errors import BudgetExceeded
from .gpu import cuda_bytes, pin_for_gpu, unpin

log = logging.getLogger(__name__)
PAGE = ALIGN            # allocation unit: O_DIRECT-aligned, so every extent is a read target
RECLAIM_ROUNDS = 64     # reclaim attempts per allocation that each freed something
RECLAIM_WAIT = 0.2      # seconds an allocation waits for busy caches (a lock held, a read in
                        # flight) before it gives up: they are busy for microseconds to ms


class Reclaimer(Protocol):
    """A consumer whose memory is partly cache. Both calls may be made from any thread and
    must not block on the consumer's own lock (try it; report nothing when it is busy)."""
    label: str

    def reclaimable(self) -> list[tuple[int, int, float]] | None:
        """Extents it would give back now: (first page, pages, last use as time.monotonic());
        None when it is busy (its lock is held, or a read into its memory is in flight), so
        that the arena waits a moment and asks again."""

    def reclaim(self, pages: list[int]) -> int:
        """Give back the extents starting at `pages` that are still reclaimable (each via
        `arena.free`); returns how many it gave back."""

    # Optional: reclaim_cap() -> int | None: at most this many pages of what `reclaimable`
    # lists may be taken at once (a cache that keeps a minimum lists every candidate, so the
    # arena can pick the ones that open a contiguous run, and says how many it may lose).


@dataclass
class _Extent:
    pages: int
    label: str


class Arena:
    """All of edgert's weight, expert and KV memory, mapped once from the config's budget."""

    def __init__(self, cfg: DeviceConfig):
        b = cfg.budget
        self.budget = b
        self.mapped = _fit_machine((b.total - b.engine) // PAGE * PAGE, cfg.name)
        # NOTE: the mapping only reserves addresses; pages are backed as extents are handed
        # out (prefault: touched at allocation, so start-up cost and resident memory follow
        # what is loaded, not the configured budget)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._map = mmap.mmap(-1, max(self.mapped, PAGE), flags=flags)  # page aligned
        self._prefault = b.prefault
        self._touched = np.zeros(max(self.mapped, PAGE) // PAGE, bool)
        self._mem = np.frombuffer(self._map, dtype=np.uint8)
        self.pages = self.mapped // PAGE
        self._device_base = pin_for_gpu(self._map, cfg) if cfg.device == "cuda" else None
        self._host_base = self._mem.ctypes.data
        # NOTE: a registration outlives the mapping unless undone, and a later arena mapped
        # at the same address would then fail to register: undo it when the arena goes.
        self._unpin = (weakref.finalize(self, unpin, self._host_base, self._map)
                       if self._device_base is not None else None)
        self._lock = threading.Lock()
        # free runs of pages, sorted by start; parallel lists so bisect works on starts
        self._free_start: list[int] = [0] if self.pages else []
        self._free_len: list[int] = [self.pages] if self.pages else []
        self._extents: dict[int, _Extent] = {}      # first page -> extent
        self._by_label: dict[str, int] = {}         # label -> pages held
        self.in_use_pages = 0
        self.peak_pages = 0
        self.reclaimed_bytes = 0
        self._reclaimers: weakref.WeakSet = weakref.WeakSet()
        self.extra_allowance = b.engine
        self._charges: dict[str, int] = {}
        self.extra_peak = 0

    # --- extents ---------------------------------------------------------------------------
    def alloc(self, label: str, nbytes: int, *, reclaim: bool = True) -> int:
        """A contiguous extent of at least ``nbytes`` (whole pages); its first page.

        ``reclaim``: take cached memory of any consumer when free pages do not suffice.
        BudgetExceeded before anything changes when the extent cannot be had."""
        n = max(1, -(-int(nbytes) // PAGE))
        with self._lock:
            first = self._take(n, label)
        if first is not None:
            return first
        if not reclaim:
            raise self._refusal(label, n, "free memory (caches may not grow into others')")
        rounds, deadline = 0, time.monotonic() + RECLAIM_WAIT
        while rounds < RECLAIM_ROUNDS:
            progress, busy = self._reclaim_for(n)
            if progress:
                rounds += 1
            elif not busy or time.monotonic() > deadline:
                break
            else:
                time.sleep(0.001)            # a cache is busy: ask again in a moment
            with self._lock:
                first = self._take(n, label)
            if first is not None:
                return first
        raise self._refusal(label, n, "free and reclaimable memory")

    def free(self, first: int) -> None:
        with self._lock:
            ext = self._extents.pop(first)
            self._by_label[ext.label] -= ext.pages
            if not self._by_label[ext.label]:
                del self._by_label[ext.label]
            self.in_use_pages -= ext.pages
            self._insert_free(first, ext.pages)

    def view(self, first: int, nbytes: int | None = None) -> np.ndarray:
        """The bytes of the extent at ``first`` (uint8, zero copy); ``nbytes`` of them."""
        ext = self._extents[first]
        n = ext.pages * PAGE if nbytes is None else nbytes
        assert n <= ext.pages * PAGE
        return self._mem[first * PAGE:first * PAGE + n]

    @property
    def memory(self) -> np.ndarray:
        """All of the arena's bytes (uint8, zero copy): for views that span many extents of
        one owner (the KV pool gathers pages through one strided view). Write only to
        extents you hold."""
        return self._mem

    def extent_pages(self, first: int) -> int:
        return self._extents[first].pages

    def register(self, reclaimer: Reclaimer) -> None:
        """A cache the arena may take memory back from (held weakly)."""
        self._reclaimers.add(reclaimer)

    def unregister(self, reclaimer: Reclaimer) -> None:
        self._reclaimers.discard(reclaimer)

    # --- allocator internals (caller holds _lock) ----------------------------------------------
    def _take(self, n: int, label: str) -> int | None:
        for i, length in enumerate(self._free_len):   # first fit: low pages first
            if length >= n:
                first = self._free_start[i]
                if length == n:
                    del self._free_start[i], self._free_len[i]
                else:
                    self._free_start[i] += n
                    self._free_len[i] -= n
                self._extents[first] = _Extent(n, label)
                if self._prefault:
                    self._back(first, n)
                self._by_label[label] = self._by_label.get(label, 0) + n
                self.in_use_pages += n
                self.peak_pages = max(self.peak_pages, self.in_use_pages)
                return first
        return None

    def _back(self, first: int, n: int) -> None:
        """Fault in pages of a new extent never touched before (prefault), so the hot path
        never takes a page fault. One byte written per page: anonymous pages read as zero."""
        new = np.flatnonzero(~self._touched[first:first + n])
        if len(new):
            self._mem[(first + new) * PAGE] = 0
            self._touched[first + new] = True

    def _insert_free(self, first: int, n: int) -> None:
        i = bisect.bisect_left(self._free_start, first)
        starts, lens = self._free_start, self._free_len
        if i > 0 and starts[i - 1] + lens[i - 1] == first:          # merge with the left run
            i -= 1
            lens[i] += n
        else:
            starts.insert(i, first)
            lens.insert(i, n)
        if i + 1 < len(starts) and starts[i] + lens[i] == starts[i + 1]:  # and the right one
            lens[i] += lens[i + 1]
            del starts[i + 1], lens[i + 1]

    @property
    def free_pages(self) -> int:
        return sum(self._free_len)

    # --- reclaim -------------------------------------------------------------------------------
    def _candidates(self) -> tuple[list[tuple[float, int, int, Reclaimer]], bool]:
        """Every cached extent (last use, first page, pages, owner); and whether a cache was
        busy and could not say."""
        out, busy = [], False
        for r in list(self._reclaimers):
            got = r.reclaimable()
            if got is None:
                busy = True
                continue
            for first, pages, last in got:
                out.append((last, first, pages, r))
        return out, busy

    def _reclaim_for(self, n: int) -> tuple[bool, bool]:
        """Give back cache so that a run of ``n`` pages may fit: (freed something, a cache
        was busy)."""
        cands, busy = self._candidates()
        if self.free_pages + sum(c[2] for c in cands) < n:
            return False, busy
        caps = {id(r): cap() for r in {id(c[3]): c[3] for c in cands}.values()
                if (cap := getattr(r, "reclaim_cap", None)) is not None}
        big = sorted((c for c in cands if c[2] >= n and caps.get(id(c[3]), c[2]) is not None
                      and caps.get(id(c[3]), c[2]) >= c[2]), key=lambda c: c[0])
        if big:
            chosen = big[:1]
        else:
            chosen = self._window(n, cands, caps)
            if not chosen:
                return False, busy
        by_owner: dict[int, tuple[Reclaimer, list[int]]] = {}
        for _, first, pages, r in chosen:
            by_owner.setdefault(id(r), (r, []))[1].append(first)
        before = self.free_pages
        for r, firsts in by_owner.values():
            r.reclaim(firsts)
        gained = self.free_pages - before
        self.reclaimed_bytes += max(0, gained) * PAGE
        return gained > 0, busy

    def _window(self, n: int, cands, caps: dict[int, int | None]) -> list:
        """The cached extents inside the window of ``n`` pages without held pages that needs
        the fewest cached pages evicted (lowest address among equals), taking no more from a
        cache than its ``reclaim_cap``."""
        with self._lock:
            state = np.ones(self.pages, np.int8)          # 1 held, 0 free, 2 cached
            for s, length in zip(self._free_start, self._free_len):
                state[s:s + length] = 0
        for _, first, pages, _ in cands:
            state[first:first + pages] = 2
        held = np.concatenate(([0], np.cumsum(state == 1)))
        cached = np.concatenate(([0], np.cumsum(state == 2)))
        ok = (held[n:] - held[:-n]) == 0
        for owner, cap in caps.items():                   # per-cache limits
            if cap is None:
                continue
            mine = np.zeros(self.pages + 1, np.int64)
            for _, first, pages, r in cands:
                if id(r) == owner:
                    mine[first + 1:first + pages + 1] = 1
            mine = np.cumsum(mine)
            ok &= (mine[n:] - mine[:-n]) <= cap
        if not ok.any():
            return []
        cost = np.where(ok, cached[n:] - cached[:-n], np.iinfo(np.int64).max)
        lo = int(np.argmin(cost))
        return [c for c in cands if c[1] < lo + n and c[1] + c[2] > lo]

    def _refusal(self, label: str, n: int, what: str) -> BudgetExceeded:
        cached = {}
        for _, _, pages, r in self._candidates()[0]:
            cached[r.label] = cached.get(r.label, 0) + pages * PAGE
        with self._lock:
            holders = dict(self._by_label)
            free = self.free_pages * PAGE
            largest = max(self._free_len, default=0) * PAGE
        parts = [f"{lab} {pages * PAGE / 2**20:.1f} MiB"
                 + (f" ({cached[lab] / 2**20:.1f} reclaimable)" if cached.get(lab) else "")
                 for lab, pages in sorted(holders.items(), key=lambda kv: -kv[1])]
        err = BudgetExceeded(
            f"{label}: a contiguous {n * PAGE} bytes from {what}; arena {self.mapped / 2**20:.1f}"
            f" MiB, free {free / 2**20:.1f} MiB (largest run {largest / 2**20:.1f} MiB); held by: "
            + ("; ".join(parts) or "nobody"), n * PAGE, free + sum(cached.values()))
        err.holders = {lab: pages * PAGE for lab, pages in holders.items()}
        return err

    # --- memory an engine allocates outside the arena ---------------------------------------
    def charge(self, what: str, nbytes: int) -> None:
        """Account ``nbytes`` an engine allocates outside the arena; call before allocating.
        Taken from the engine allowance (``memory.engine``)."""
        with self._lock:
            available = self.extra_allowance - sum(self._charges.values())
            if nbytes > available:
                raise BudgetExceeded(f"{what} (engine allowance memory.engine)", nbytes,
                                     available)
            self._charges[what] = self._charges.get(what, 0) + nbytes
            self.extra_peak = max(self.extra_peak, sum(self._charges.values()))

    def charge_items(self, what: str, fixed: int, per_item: int, items: int) -> int:
        """Charge ``fixed + m * per_item`` bytes for the most items ``m <= items`` that fit
        the engine allowance now; returns ``m``. BudgetExceeded (nothing charged) when not
        even one item fits. One step, so two runs never both count the same free bytes."""
        with self._lock:
            held = sum(self._charges.values())
            available = self.extra_allowance - held
            one = fixed + per_item
            m = items if per_item == 0 else min(items, (available - fixed) // per_item)
            if m < 1 or one > available:
                raise BudgetExceeded(
                    f"{what}: one item's working memory (engine allowance memory.engine "
                    f"{self.extra_allowance} bytes, {held} charged: "
                    + (", ".join(f"{k} {v}" for k, v in self._charges.items()) or "nothing")
                    + ")", one, available)
            nbytes = fixed + m * per_item
            self._charges[what] = self._charges.get(what, 0) + nbytes
            self.extra_peak = max(self.extra_peak, held + nbytes)
            return m

    def discharge(self, what: str) -> None:
        with self._lock:
            self._charges.pop(what, None)

    @property
    def extra_in_use(self) -> int:
        return sum(self._charges.values())

    def in_use_bytes(self) -> int:
        """Arena bytes held by anyone (cache included) plus engine charges."""
        return self.in_use_pages * PAGE + self.extra_in_use

    def close(self) -> None:
        """Unpin the arena for the GPU now (else when the arena is garbage-collected). The
        host memory stays mapped while any view of it lives."""
        if self._unpin is not None:
            self._unpin()
        self._device_base = None

    # --- the GPU's view of the same bytes ------------------------------------------------
    @property
    def gpu_mapped(self) -> bool:
        """True when CUDA kernels can read and write the arena in place (device cuda)."""
        return self._device_base is not None

    def on_gpu(self, t):
        """The CUDA tensor that aliases CPU tensor ``t``, which must lie inside the arena.

        Zero copy: the GPU reads the arena's pinned pages (on Jetson, the same DRAM).
        """
        if self._device_base is None:
            raise RuntimeError("the arena is not mapped for the GPU (device cpu, or pinning "
                               "failed: see the log)")
        import torch
        nbytes = t.numel() * t.element_size()
        off = t.data_ptr() - self._host_base
        if not t.is_contiguous() or off < 0 or off + nbytes > self.mapped:
            raise ValueError("tensor is not a contiguous view of the arena")
        raw = cuda_bytes(self._device_base + off, nbytes)
        return raw.view(t.dtype).view(t.shape) if nbytes else torch.empty(
            t.shape, dtype=t.dtype, device="cuda")

    def stats(self) -> dict:
        """Every byte of the arena attributed: per label, held and reclaimable."""
        cached: dict[str, int] = {}
        for _, _, pages, r in self._candidates()[0]:
            cached[r.label] = cached.get(r.label, 0) + pages * PAGE
        with self._lock:
            holders = {lab: {"bytes": pages * PAGE, "reclaimable": cached.get(lab, 0)}
                       for lab, pages in sorted(self._by_label.items())}
            return {"budget_total": self.budget.total, "mapped": self.mapped,
                    "in_use_bytes": self.in_use_pages * PAGE,
                    "free_bytes": self.free_pages * PAGE,
                    "reclaimable_bytes": sum(cached.values()),
                    "largest_free_run": max(self._free_len, default=0) * PAGE,
                    "peak_bytes": self.peak_pages * PAGE,
                    "reclaimed_bytes": self.reclaimed_bytes,
                    "holders": holders,
                    "engine": {"allowance": self.extra_allowance, "in_use": self.extra_in_use,
                               "peak": self.extra_peak, "charges": dict(self._charges)}}


def _fit_machine(nbytes: int, name: str) -> int:
    """The arena size, capped to 90% of this machine's physical memory with a logged reason
    (a budget written for a bigger device must not swap this one to death)."""
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return nbytes
    cap = int(phys * 0.9) // PAGE * PAGE
    if nbytes > cap:
        log.warning("config %s asks for a %.1f GiB arena; this machine has %.1f GiB of memory: "
                    "the arena is capped at %.1f GiB", name, nbytes / 2**30, phys / 2**30,
                    cap / 2**30)
        return cap
    return nbytes
