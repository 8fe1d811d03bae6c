"""Paged KV cache: 16-token pages carved from the arena's "kv" pool.

One page holds K and V of *all* layers for 16 consecutive tokens of one sequence, laid
out as ``[layers, 2 (K, V), kv_heads, 16, head_dim]``. A page is therefore the natural
unit a prefix cache names by a chained hash of (parent hash, 16 token ids): one page id
per 16 tokens, whatever the depth of the model.

Two layers, vLLM style:
- ``PagePool`` owns pages: arena slots, ref counts, and an O(1) LRU list of pages whose
  ref count fell to zero. Such a page keeps its arena slot and its contents until it is
  handed out again (oldest first) or the arena reclaims it for another model;
  ``on_evict(page_id)`` is called at that moment.
  NOTE: that is the seam for prefix reuse: a hash -> page map can revive a ref-0 page
  with ``incref`` and forgets it in ``on_evict``; host/disk tiers copy ``page(id)`` out.
- ``PagedKV`` owns sequences: a block table (page ids in token order) and a length per
  sequence; it reserves pages before a forward pass writes them, so a sequence that
  cannot get pages raises ``BudgetExceeded`` before anything changes.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from edgert.align import align_up
from edgert.dtypes import np_storage
from edgert.errors import BudgetExceeded
from edgert.memory.arena import PAGE, SlotPool

PAGE_TOKENS = 16


class PagePool:
    """Fixed-size KV pages, each its own arena slot, addressed by id (= the slot id).

    Pages come from free arena memory first (so idle pages stay cached), then from the
    pool's own idle pages (oldest first), then from other models' cache (the arena
    reclaims it). ``cap`` bounds the bytes of pages (the config's ``memory.kv``). Idle
    pages are cache: the arena may take them back (`reclaimable` / `reclaim`), calling
    ``on_evict`` as when they are handed out again.
    """

    def __init__(self, arena, label: str, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, to_device=None, cap: int | None = None):
        """`to_device(cpu_view) -> tensor`: where the engine reads pages (None = the CPU
        view itself; `Arena.on_gpu` for a zero-copy CUDA view of the same slot)."""
        self.page_shape = (num_layers, 2, num_kv_heads, PAGE_TOKENS, head_dim)
        self.dtype = dtype
        self._np_dtype = np_storage(str(dtype).removeprefix("torch."))   # holds its bytes
        nbytes = int(np.prod(self.page_shape)) * torch.empty((), dtype=dtype).element_size()
        self.page_bytes = align_up(nbytes)
        self.label = label
        self._pool = SlotPool(arena, label, self.page_bytes, cap=cap)
        self._to_device = to_device
        self._nbytes = nbytes
        self._pages: dict[int, torch.Tensor] = {}   # page id -> tensor view (held pages)
        self.ref: dict[int, int] = {}                # page id -> ref count (held pages)
        self._idle: OrderedDict[int, float] = OrderedDict()  # ref 0, oldest first -> since
        self._lock = threading.Lock()   # NOTE: not reentrant: the arena's reclaim from inside
        #                                 our own allocate() skips us instead of re-entering
        self._allocating = 0            # thread id inside allocate(), else 0
        self.on_evict = None                         # callable(page_id) or None
        self.allocations = 0
        self.peak_in_use = 0
        self.reclaimed = 0
        arena.register(self)

    @property
    def capacity(self) -> int | None:
        """Pages this pool may ever hold (its cap), None when uncapped."""
        return self._pool.cap

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out without taking other models' cache: idle pages,
        plus new ones that fit the arena's free memory and the cap."""
        room = self._pool.arena.free_pages * PAGE // self.page_bytes
        if self._pool.cap is not None:
            room = min(room, self._pool.cap - self._pool.count)
        return len(self._idle) + max(0, room)

    @property
    def num_in_use(self) -> int:
        return len(self.ref) - len(self._idle)

    def allocate(self, n: int) -> list[int]:
        """`n` pages with ref count 1. BudgetExceeded before any change when they do not fit."""
        with self._lock:
            self._allocating = threading.get_ident()
            try:
                return self._allocate(n)
            finally:
                self._allocating = 0

    def _allocate(self, n: int) -> list[int]:
        """allocate() under the lock."""
        fresh: list[int] = []
        while len(fresh) < n:
            s = self._pool.try_alloc(reclaim=False)
            if s is None:
                break
            fresh.append(s)
        reuse = min(n - len(fresh), len(self._idle))
        more = n - len(fresh) - reuse
        if more:
            try:
                fresh += self._pool.alloc(more, reclaim=True)
            except BudgetExceeded as e:
                self._pool.free(fresh)
                raise BudgetExceeded(f"{self.label}: {n} kv pages ({n * PAGE_TOKENS} "
                                     f"tokens); {e}", n * self.page_bytes,
                                     (len(fresh) + reuse) * self.page_bytes) from None
        for pid in fresh:
            view = self._pool.view(pid)[: self._nbytes].view(self._np_dtype)
            t = torch.from_numpy(view)
            if self.dtype == torch.bfloat16:
                t = t.view(torch.bfloat16)
            t = t.view(self.page_shape)
            self._pages[pid] = t if self._to_device is None else self._to_device(t)
        reused = []
        for _ in range(reuse):
            pid, _ = self._idle.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(pid)
            reused.append(pid)
        ids = fresh + reused
        for pid in ids:
            self.ref[pid] = 1
        self.allocations += n
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)
        return ids

    def incref(self, pid: int) -> None:
        """Share a held page (also revives an idle one, e.g. a cached prefix page)."""
        with self._lock:
            assert pid in self.ref, f"page {pid} is not held"
            if self.ref[pid] == 0:
                del self._idle[pid]
            self.ref[pid] += 1
            self.peak_in_use = max(self.peak_in_use, self.num_in_use)

    def decref(self, pids) -> None:
        with self._lock:
            now = time.monotonic()
            for pid in pids:
                assert self.ref.get(pid, 0) > 0, f"page {pid} released more often than taken"
                self.ref[pid] -= 1
                if self.ref[pid] == 0:
                    self._idle[pid] = now  # most recently freed at the end

    def page(self, pid: int) -> torch.Tensor:
        """Page `pid` as a tensor [layers, 2, kv_heads, 16, head_dim] (zero copy)."""
        return self._pages[pid]

    # --- the arena takes idle pages back -------------------------------------------------
    def reclaimable(self) -> list[tuple[int, int, float]] | None:
        if self._allocating == threading.get_ident():
            return []                        # our own allocate() asked the arena: skip us
        if not self._lock.acquire(blocking=False):
            return None                      # busy: asked again in a moment
        try:
            pages = self.page_bytes // PAGE
            return [(pid, pages, t) for pid, t in self._idle.items()]
        finally:
            self._lock.release()

    def reclaim(self, pids: list[int]) -> int:
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            gone = [p for p in pids if p in self._idle]
            for pid in gone:
                del self._idle[pid]
                if self.on_evict is not None:
                    self.on_evict(pid)
                del self.ref[pid], self._pages[pid]
            self._pool.free(gone)
            self.reclaimed += len(gone)
            return len(gone)
        finally:
            self._lock.release()

    def close(self) -> None:
        """Give every page back to the arena (sequences still holding pages lose them)."""
        with self._lock:
            self._pool.arena.unregister(self)
            self._pages.clear(), self.ref.clear(), self._idle.clear()
            self._pool.close()

    def stats(self) -> dict:
        with self._lock:
            return {"page_tokens": PAGE_TOKENS, "page_bytes": self.page_bytes,
                    "cap_pages": self.capacity, "held": self._pool.count,
                    "in_use": self.num_in_use, "idle": len(self._idle),
                    "peak_in_use": self.peak_in_use, "allocations": self.allocations,
                    "reclaimed": self.reclaimed}


@dataclass
class Sequence:
    """One sequence's view of the cache: page ids in token order and tokens written."""
    block_table: list[int] = field(default_factory=list)
    length: int = 0


class PagedKV:
    """Per-sequence block tables over a PagePool; the engine's only way to the KV bytes."""

    def __init__(self, pages: PagePool):
        self.pages = pages

    def new_sequence(self) -> Sequence:
        return Sequence()

    def reserve(self, seq: Sequence, n_new: int) -> None:
        """Make room for `n_new` more tokens; BudgetExceeded (nothing changed) if it cannot."""
        need = -(-(seq.length + n_new) // PAGE_TOKENS) - len(seq.block_table)
        if need > 0:
            seq.block_table.extend(self.pages.allocate(need))

    def write(self, seq: Sequence, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K, V [kv_heads, n, head_dim] of tokens seq.length .. seq.length+n-1."""
        n = k.shape[1]
        pos, done = seq.length, 0
        while done < n:
            page = self.pages.page(seq.block_table[pos // PAGE_TOKENS])
            off = pos % PAGE_TOKENS
            m = min(PAGE_TOKENS - off, n - done)
            page[layer, 0, :, off:off + m] = k[:, done:done + m]
            page[layer, 1, :, off:off + m] = v[:, done:done + m]
            pos, done = pos + m, done + m

    def gather(self, seq: Sequence, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [kv_heads, end, head_dim] of tokens 0 .. end-1 (a copy; pages are scattered)."""
        n_pages = -(-end // PAGE_TOKENS)
        kv = torch.cat([self.pages.page(p)[layer] for p in seq.block_table[:n_pages]], dim=2)
        return kv[0, :, :end], kv[1, :, :end]

    def advance(self, seq: Sequence, n: int) -> None:
        """Mark `n` written tokens as part of the sequence (after every layer wrote them)."""
        assert seq.length + n <= len(seq.block_table) * PAGE_TOKENS
        seq.length += n

    def release(self, seq: Sequence) -> None:
        self.pages.decref(seq.block_table)
        seq.block_table, seq.length = [], 0
