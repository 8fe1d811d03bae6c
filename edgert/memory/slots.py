"""What a consumer holds of the arena: one extent (`Lease`) or equal slots (`SlotPool`).

Both give their memory back on ``close()`` or when they are collected; the finalizer holds
the arena and the page numbers, never the owner.
"""
from __future__ import annotations

import weakref

import numpy as np

from ..errors import BudgetExceeded
from .arena import PAGE, Arena


class Lease:
    """One extent held by its owner; given back by ``close()`` or when the lease is collected.

    The finalizer holds the arena and the page number, never the owner."""

    def __init__(self, arena: Arena, label: str, nbytes: int, *, reclaim: bool = True):
        self.arena, self.label, self.nbytes = arena, label, int(nbytes)
        self.first = arena.alloc(label, nbytes, reclaim=reclaim)
        self._fin = weakref.finalize(self, arena.free, self.first)

    @property
    def view(self) -> np.ndarray:
        return self.arena.view(self.first)

    def close(self) -> None:
        self._fin()

    @property
    def closed(self) -> bool:
        return not self._fin.alive


class SlotPool:
    """Equal slots of one consumer, each its own extent of the arena, addressed by slot id
    (= the extent's first page, unique across the arena). Grows on demand; ``cap`` bounds it.

    Slots go back to the arena on ``free``, ``close()`` or when the pool is collected."""

    def __init__(self, arena: Arena, label: str, slot_size: int, cap: int | None = None):
        if slot_size <= 0:
            raise ValueError(f"slot size {slot_size} must be positive")
        self.arena, self.label = arena, label
        self.slot_size = -(-int(slot_size) // PAGE) * PAGE
        self.cap = None if cap is None else int(cap) // self.slot_size   # slots
        self._ids: set[int] = set()
        self.peak = 0
        self._fin = weakref.finalize(self, _free_all, arena, self._ids)

    def alloc(self, n: int = 1, *, reclaim: bool = True) -> list[int]:
        """``n`` new slots. BudgetExceeded (nothing kept) when they cannot all be had."""
        if self.cap is not None and len(self._ids) + n > self.cap:
            raise BudgetExceeded(f"{self.label}: {n} more slots past its cap of {self.cap}",
                                 n * self.slot_size, (self.cap - len(self._ids)) * self.slot_size)
        got: list[int] = []
        try:
            for _ in range(n):
                got.append(self.arena.alloc(self.label, self.slot_size, reclaim=reclaim))
        except BaseException:
            for s in got:
                self.arena.free(s)
            raise
        self._ids.update(got)
        self.peak = max(self.peak, len(self._ids))
        return got

    def try_alloc(self, *, reclaim: bool = False) -> int | None:
        """One new slot, or None when the arena (or the cap) has no room."""
        if not reclaim and self.arena.free_pages * PAGE < self.slot_size:
            return None         # NOTE: the common "full" case, without building a refusal
        try:
            return self.alloc(1, reclaim=reclaim)[0]
        except BudgetExceeded:
            return None

    def free(self, ids) -> None:
        for i in list(ids):
            assert i in self._ids, f"{self.label}: slot {i} freed twice or not ours"
            self._ids.discard(i)
            self.arena.free(i)

    def view(self, slot: int) -> np.ndarray:
        """The slot's bytes (uint8, zero copy)."""
        return self.arena._mem[slot * PAGE:slot * PAGE + self.slot_size]

    def __contains__(self, slot: int) -> bool:
        return slot in self._ids

    @property
    def count(self) -> int:
        return len(self._ids)

    @property
    def in_use_bytes(self) -> int:
        return len(self._ids) * self.slot_size

    @property
    def peak_bytes(self) -> int:
        return self.peak * self.slot_size

    def close(self) -> None:
        self._fin()

    def stats(self) -> dict:
        return {"label": self.label, "slot_size": self.slot_size, "slots": len(self._ids),
                "cap_slots": self.cap, "in_use_bytes": self.in_use_bytes,
                "peak_bytes": self.peak_bytes}


def _free_all(arena: Arena, ids: set) -> None:
    for i in list(ids):
        arena.free(i)
    ids.clear()
