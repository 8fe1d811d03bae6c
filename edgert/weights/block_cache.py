"""BlockCache: content hash -> arena slot, with pins and O(1) LRU among unpinned blocks.

Mechanism only: it loads, pins, evicts and counts. Which blocks to keep or prewarm is
decided above it (the task switcher and its prewarm policy).

Its slots are a `SlotPool` of its own (block-sized, whatever other models use). It grows
into free arena memory only, then recycles its least recently used block. Every unpinned
block is cache: the arena may take it back for another model's load (`reclaimable`,
`reclaim`), least recently used first. Zero blocks are never cached: a memset rebuilds
one for free, so a slot holding it would be wasted.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..errors import BudgetExceeded
from ..memory.arena import PAGE, Arena
from ..memory.slots import SlotPool
from ..pack import PackReader


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    evictions: int = 0
    inserts: int = 0
    reclaimed: int = 0


class BlockCache:
    """Blocks of one pack held in slots of the cache's own pool.

    NOTE: a pinned block (pin count > 0) is never evicted; unpinned resident blocks sit
    in ``_lru`` (oldest first, value = last use), so a hit and an eviction are O(1).
    ``lock`` is the cache's own and is held only for bookkeeping and memory copies, never
    for a storage read nor by the owner around its own work (an inference, a switch):
    the arena's reclaim only *tries* it, so a long hold would make another model's
    allocation fail while unpinned blocks sit idle. Whoever copies from a slot pins it
    first, so a reclaim between two calls never frees a slot that is being read.
    """

    def __init__(self, arena: Arena, reader: PackReader, label: str, *,
                 cap: int | None = None):
        self.pool = SlotPool(arena, label, reader.block_size, cap=cap)
        self.label, self.reader = label, reader
        self.lock = threading.RLock()
        self._slot: dict[bytes, int] = {}
        self._pins: dict[bytes, int] = {}
        self._lru: OrderedDict[bytes, float] = OrderedDict()
        self.counters = CacheCounters()
        arena.register(self)

    # --- queries -------------------------------------------------------------------------
    def contains(self, h: bytes) -> bool:
        return h in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def peek(self, h: bytes) -> np.ndarray | None:
        """The slot view of a resident block, without counting or reordering. Only for a
        look: a reclaim may free the slot at any moment unless it is pinned."""
        s = self._slot.get(h)
        return None if s is None else self.pool.view(s)

    def pinned(self, h: bytes) -> int:
        return self._pins.get(h, 0)

    @property
    def evictable(self) -> int:
        return len(self._lru)

    # --- loading -------------------------------------------------------------------------
    def get(self, idx: int, pin: bool = True) -> np.ndarray:
        """The slot view holding block ``idx``, loading it from storage on a miss.
        ValueError for a zero block (never cached)."""
        ent = self.reader.blocks[idx]
        if ent.zero:
            raise ValueError(f"block {idx} is a zero block: memset it, it is never cached")
        with self.lock:
            s = self._slot.get(ent.hash)
            if s is not None:
                self.counters.hits += 1
                self._touch(ent.hash, pin)
                return self.pool.view(s)
            self.counters.misses += 1
            s = self._take_slot(f"block {idx}")
        # NOTE: read outside the lock; the slot is in neither `_slot` nor `_lru` until it is
        # published below, so no reclaim can take it meanwhile
        view = self.pool.view(s)
        try:
            self.reader.read_into([idx], [view])
        except BaseException:
            with self.lock:
                self.pool.free([s])
            raise
        with self.lock:
            self.counters.bytes_read += ent.length
            if ent.hash in self._slot:        # loaded meanwhile by another caller: keep theirs
                self.pool.free([s])
                s = self._slot[ent.hash]
            else:
                self._slot[ent.hash] = s
            self._touch(ent.hash, pin)
            return self.pool.view(s)

    def put(self, idx: int, data: np.ndarray, pin: bool = False) -> np.ndarray | None:
        """Keep a copy of block ``idx`` whose bytes are already in memory (no storage read).
        Returns the slot view, or None when no slot is free or evictable or the block is a
        zero block (never cached)."""
        with self.lock:
            ent = self.reader.blocks[idx]
            if ent.zero:
                return None
            if ent.hash in self._slot:
                self._touch(ent.hash, pin)
                return self.pool.view(self._slot[ent.hash])
            try:
                s = self._take_slot(f"block {idx}")
            except BudgetExceeded:
                return None
            view = self.pool.view(s)
            view[:ent.length] = data[:ent.length]
            self._slot[ent.hash] = s
            self.counters.inserts += 1
            self._touch(ent.hash, pin)
            return view

    def prefetch(self, idx: int) -> bool:
        """Load without pinning; False when nothing could be evicted to make room, or for
        a zero block (never cached)."""
        if self.reader.blocks[idx].zero:
            return False
        try:
            self.get(idx, pin=False)
            return True
        except BudgetExceeded:
            return False

    def pin_resident(self, hashes: list[bytes]) -> list[int | None]:
        """For each hash, the slot holding it, pinned (a hit), or None (not resident: nothing
        changes). One pass for a whole switch; `unpin` each hash that got a slot."""
        with self.lock:
            slot_of, lru, pins = self._slot, self._lru, self._pins
            out = [slot_of.get(h) for h in hashes]
            hits = 0
            for h, s in zip(hashes, out):
                if s is not None:
                    hits += 1
                    lru.pop(h, None)
                    pins[h] = pins.get(h, 0) + 1
            self.counters.hits += hits
            return out

    def unpin(self, h: bytes) -> None:
        with self.lock:
            n = self._pins.get(h, 0)
            assert n > 0, "unpin of a block that is not pinned"
            if n == 1:
                del self._pins[h]
                self._lru[h] = time.monotonic()
            else:
                self._pins[h] = n - 1

    def evict(self, h: bytes) -> None:
        """Drop one unpinned block now (its slot goes back to the arena)."""
        with self.lock:
            assert h not in self._pins, "evicting a pinned block"
            self._lru.pop(h)
            self.pool.free([self._slot.pop(h)])
            self.counters.evictions += 1

    def clear(self) -> None:
        """Drop every unpinned block."""
        with self.lock:
            while self._lru:
                self.evict(next(iter(self._lru)))

    # --- the arena takes cache back ------------------------------------------------------
    def reclaimable(self) -> list[tuple[int, int, float]] | None:
        if not self.lock.acquire(blocking=False):
            return None                      # busy (a switch runs): asked again in a moment
        try:
            pages = self.pool.slot_size // PAGE
            return [(self._slot[h], pages, t) for h, t in self._lru.items()]
        finally:
            self.lock.release()

    def reclaim(self, slots: list[int]) -> int:
        if not self.lock.acquire(blocking=False):
            return 0
        try:
            want = set(slots)
            gone = [h for h in self._lru if self._slot[h] in want]
            for h in gone:
                self.evict(h)
            self.counters.reclaimed += len(gone)
            return len(gone)
        finally:
            self.lock.release()

    # --- internals -----------------------------------------------------------------------
    def _touch(self, h: bytes, pin: bool) -> None:
        if pin:
            self._lru.pop(h, None)
            self._pins[h] = self._pins.get(h, 0) + 1
        elif h not in self._pins:
            self._lru[h] = time.monotonic()
            self._lru.move_to_end(h)

    def _take_slot(self, what: str) -> int:
        s = self.pool.try_alloc(reclaim=False)     # grow into free memory only
        if s is not None:
            return s
        if not self._lru:
            raise BudgetExceeded(f"block cache: no free or evictable slot for {what}",
                                 self.pool.slot_size, 0)
        h, _ = self._lru.popitem(last=False)
        self.counters.evictions += 1
        return self._slot.pop(h)

    def close(self) -> None:
        """Give every slot back (pins included: the owner is going away)."""
        with self.lock:
            self.pool.arena.unregister(self)
            self._slot.clear(), self._pins.clear(), self._lru.clear()
            self.pool.close()

    def stats(self) -> dict:
        with self.lock:
            c = self.counters
            return {"resident": len(self._slot), "pinned": len(self._pins), "hits": c.hits,
                    "misses": c.misses, "bytes_read": c.bytes_read, "evictions": c.evictions,
                    "inserts": c.inserts, "reclaimed": c.reclaimed,
                    "bytes": self.pool.in_use_bytes}
