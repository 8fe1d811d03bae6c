"""BlockCache: content hash -> arena slot, with pins and O(1) LRU among unpinned blocks.

Mechanism only: it loads, pins, evicts and counts. Which blocks to keep or prewarm is
decided above it (the task switcher and its prewarm policy).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..errors import BudgetExceeded, PackCorrupt
from ..memory import SlotPool, Storage
from ..pack import PackReader


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    evictions: int = 0
    inserts: int = 0


class BlockCache:
    """Blocks of one pack held in slots of one pool.

    NOTE: a pinned block (pin count > 0) is never evicted; unpinned resident blocks sit
    in ``_lru`` (oldest first), so both a hit and an eviction are O(1).
    """

    def __init__(self, pool: SlotPool, storage: Storage, reader: PackReader):
        if not pool.slot_size:
            pool.carve(_slot_size_for(reader.block_size))
        if pool.slot_size < reader.block_size:
            raise ValueError(f"pool slots of {pool.slot_size} B cannot hold "
                             f"{reader.block_size} B blocks")
        self.pool, self.storage, self.reader = pool, storage, reader
        self._slot: dict[bytes, int] = {}
        self._pins: dict[bytes, int] = {}
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self.counters = CacheCounters()

    # --- queries -------------------------------------------------------------------------
    def contains(self, h: bytes) -> bool:
        return h in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def peek(self, h: bytes) -> np.ndarray | None:
        """The slot view of a resident block, without counting or reordering."""
        s = self._slot.get(h)
        return None if s is None else self.pool.view(s)

    def pinned(self, h: bytes) -> int:
        return self._pins.get(h, 0)

    @property
    def evictable(self) -> int:
        return len(self._lru)

    # --- loading -------------------------------------------------------------------------
    def get(self, idx: int, pin: bool = True) -> np.ndarray:
        """The slot view holding block ``idx``, loading it from storage on a miss."""
        ent = self.reader.blocks[idx]
        s = self._slot.get(ent.hash)
        if s is not None:
            self.counters.hits += 1
            self._touch(ent.hash, pin)
            return self.pool.view(s)
        self.counters.misses += 1
        s = self._take_slot(f"block {idx}")
        view = self.pool.view(s)
        try:
            self.storage.read_into(ent.offset, ent.length, view)
            self.reader.check_block(idx, view[:ent.length])
        except (PackCorrupt, OSError):
            self.pool.free([s])
            raise
        self.counters.bytes_read += ent.length
        self._slot[ent.hash] = s
        self._touch(ent.hash, pin)
        return view

    def put(self, idx: int, data: np.ndarray, pin: bool = False) -> np.ndarray | None:
        """Keep a copy of block ``idx`` whose bytes are already in memory (no storage read).
        Returns the slot view, or None when no slot is free or evictable."""
        ent = self.reader.blocks[idx]
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
        """Load without pinning; False when nothing could be evicted to make room."""
        try:
            self.get(idx, pin=False)
            return True
        except BudgetExceeded:
            return False

    def pin_resident(self, hashes: list[bytes]) -> list[int | None]:
        """For each hash, the slot holding it, pinned (a hit), or None (not resident: nothing
        changes). One pass for a whole switch; `unpin` each hash that got a slot."""
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
        n = self._pins.get(h, 0)
        assert n > 0, "unpin of a block that is not pinned"
        if n == 1:
            del self._pins[h]
            self._lru[h] = None
        else:
            self._pins[h] = n - 1

    def evict(self, h: bytes) -> None:
        """Drop one unpinned block now."""
        assert h not in self._pins, "evicting a pinned block"
        self._lru.pop(h)
        self.pool.free([self._slot.pop(h)])
        self.counters.evictions += 1

    def clear(self) -> None:
        """Drop every unpinned block."""
        while self._lru:
            self.evict(next(iter(self._lru)))

    # --- internals -----------------------------------------------------------------------
    def _touch(self, h: bytes, pin: bool) -> None:
        if pin:
            self._lru.pop(h, None)
            self._pins[h] = self._pins.get(h, 0) + 1
        elif h not in self._pins:
            self._lru[h] = None
            self._lru.move_to_end(h)

    def _take_slot(self, what: str) -> int:
        if self.pool.free_count:
            return self.pool.alloc(1)[0]
        if not self._lru:
            raise BudgetExceeded(f"block cache: no free or evictable slot for {what}",
                                 self.pool.slot_size, 0)
        h, _ = self._lru.popitem(last=False)
        self.counters.evictions += 1
        return self._slot.pop(h)

    def stats(self) -> dict:
        c = self.counters
        return {"resident": len(self._slot), "pinned": len(self._pins), "hits": c.hits,
                "misses": c.misses, "bytes_read": c.bytes_read, "evictions": c.evictions,
                "inserts": c.inserts}


def _slot_size_for(block_size: int) -> int:
    return (block_size + 4095) // 4096 * 4096
