"""HostTier: copies of KV pages in host memory, outside the arena, with their own budget.

Entries are immutable page bytes named by their prefix hash; the tier keeps to its budget
by dropping least recently used leaves first (`PrefixLRU`: a page never goes before its
cached descendants). Thread-safe: the KV writer thread inserts while lookups read. A
reader gets the entry's array itself; an entry is never written after insertion, and an
evicted one stays valid for whoever still holds it.
"""
from __future__ import annotations

import threading

import numpy as np

from .prefix import PrefixLRU


class HostTier:
    name = "host"

    def __init__(self, budget: int, page_nbytes: int):
        self.budget = int(budget)
        self.page_nbytes = int(page_nbytes)
        self._lock = threading.Lock()
        self._data: dict[bytes, np.ndarray] = {}
        self._order = PrefixLRU()
        self.bytes_used = 0
        self.peak_bytes = 0
        self.evictions = 0

    @property
    def capacity(self) -> int:
        """Pages the budget holds."""
        return self.budget // self.page_nbytes if self.page_nbytes else 0

    def __contains__(self, h: bytes) -> bool:
        return h in self._data

    def get(self, h: bytes) -> np.ndarray | None:
        return self._data.get(h)

    def run(self, hashes) -> list[np.ndarray]:
        """Entries of the longest run of `hashes` (from the first) held here."""
        out = []
        with self._lock:
            for h in hashes:
                d = self._data.get(h)
                if d is None:
                    break
                out.append(d)
        return out

    def touch(self, hashes) -> None:
        """Mark entries used, in the order given (give a chain leaf first)."""
        with self._lock:
            for h in hashes:
                self._order.touch(h)

    def put(self, h: bytes, parent: bytes | None, fill) -> bool:
        """Insert page `h` whose bytes `fill(out) -> bool` writes into a new array (outside
        the lock); False when the budget cannot hold a page or `fill` had nothing."""
        if self.capacity == 0:
            return False
        with self._lock:
            if h in self._data:
                self._order.touch(h)
                return True
        out = np.empty(self.page_nbytes, np.uint8)
        if not fill(out):
            return False
        with self._lock:
            if h in self._data:
                return True
            while self.bytes_used + self.page_nbytes > self.budget:
                victim = self._order.pop()
                if victim is None:
                    return False
                self.bytes_used -= self._data.pop(victim).nbytes
                self.evictions += 1
            self._data[h] = out
            self._order.add(h, parent)
            self.bytes_used += out.nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes_used)
        return True

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._order.clear()
            self.bytes_used = 0

    def stats(self) -> dict:
        with self._lock:
            return {"budget": self.budget, "bytes_used": self.bytes_used,
                    "peak_bytes": self.peak_bytes, "pages": len(self._data),
                    "evictions": self.evictions}
