"""Paged KV cache: 16-token pages carved from the arena's "kv" pool.

One page holds K and V of *all* layers for 16 consecutive tokens of one sequence, laid
out as ``[layers, 2 (K, V), kv_heads, 16, head_dim]``. A page is therefore the natural
unit a prefix cache names by a chained hash of (parent hash, 16 token ids): one page id
per 16 tokens, whatever the depth of the model.

Two layers, vLLM style:
- ``PagePool`` owns pages: arena slots, ref counts, and an O(1) LRU list of pages whose
  ref count fell to zero. Such a page keeps its arena slot and its contents until it is
  handed out again (oldest first); ``on_evict(page_id)`` is called at that moment.
  NOTE: that is the seam for prefix reuse: a hash -> page map can revive a ref-0 page
  with ``incref`` and forgets it in ``on_evict``; host/disk tiers copy ``page(id)`` out.
- ``PagedKV`` owns sequences: a block table (page ids in token order) and a length per
  sequence; it reserves pages before a forward pass writes them, so a sequence that
  cannot get pages raises ``BudgetExceeded`` before anything changes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from edgert.errors import BudgetExceeded

PAGE_TOKENS = 16
SLOT_ALIGN = 4096

_NP_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class PagePool:
    """Fixed-size KV pages over an arena slot pool, addressed by id (= arena slot id)."""

    def __init__(self, pool, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, to_device=None):
        """`to_device(cpu_view) -> tensor`: where the engine reads pages (None = the CPU
        view itself; `Arena.on_gpu` for a zero-copy CUDA view of the same slot)."""
        self.page_shape = (num_layers, 2, num_kv_heads, PAGE_TOKENS, head_dim)
        self.dtype = dtype
        nbytes = int(np.prod(self.page_shape)) * torch.empty((), dtype=dtype).element_size()
        self.page_bytes = -(-nbytes // SLOT_ALIGN) * SLOT_ALIGN
        if pool.slot_size != self.page_bytes:
            pool.carve(self.page_bytes)  # RuntimeError if another user holds slots
        self._pool = pool
        self._to_device = to_device
        self._nbytes = nbytes
        self._pages: dict[int, torch.Tensor] = {}   # page id -> tensor view (held pages)
        self.ref: dict[int, int] = {}                # page id -> ref count (held pages)
        self._idle: OrderedDict[int, None] = OrderedDict()  # ref 0, oldest first
        self.on_evict = None                         # callable(page_id) or None
        self.allocations = 0
        self.peak_in_use = 0

    @property
    def capacity(self) -> int:
        """Pages this pool can ever hold (the arena's kv pool / page size)."""
        return self._pool.capacity

    @property
    def num_free(self) -> int:
        """Pages that `allocate` can hand out now (never used + idle)."""
        return self._pool.free_count + len(self._idle)

    @property
    def num_in_use(self) -> int:
        return len(self.ref) - len(self._idle)

    def allocate(self, n: int) -> list[int]:
        """`n` pages with ref count 1. BudgetExceeded before any change when they do not fit."""
        if n > self.num_free:
            raise BudgetExceeded(f"kv pages ({n} x {PAGE_TOKENS} tokens)", n * self.page_bytes,
                                 self.num_free * self.page_bytes)
        fresh = self._pool.alloc(min(n, self._pool.free_count)) if n else []
        for pid in fresh:
            view = self._pool.view(pid)[: self._nbytes].view(_NP_OF[self.dtype])
            t = torch.from_numpy(view)
            if self.dtype == torch.bfloat16:
                t = t.view(torch.bfloat16)
            t = t.view(self.page_shape)
            self._pages[pid] = t if self._to_device is None else self._to_device(t)
        reused = []
        while len(fresh) + len(reused) < n:
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
        assert pid in self.ref, f"page {pid} is not held"
        if self.ref[pid] == 0:
            del self._idle[pid]
        self.ref[pid] += 1
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)

    def decref(self, pids) -> None:
        for pid in pids:
            assert self.ref.get(pid, 0) > 0, f"page {pid} released more often than taken"
            self.ref[pid] -= 1
            if self.ref[pid] == 0:
                self._idle[pid] = None  # most recently freed at the end

    def page(self, pid: int) -> torch.Tensor:
        """Page `pid` as a tensor [layers, 2, kv_heads, 16, head_dim] (zero copy)."""
        return self._pages[pid]

    def close(self) -> None:
        """Give every slot back to the arena. All sequences must be released first."""
        assert self.num_in_use == 0, f"{self.num_in_use} kv pages still referenced"
        if self._pages:
            self._pool.free(list(self._pages))
        self._pages.clear(), self.ref.clear(), self._idle.clear()

    def stats(self) -> dict:
        return {"page_tokens": PAGE_TOKENS, "page_bytes": self.page_bytes,
                "capacity": self.capacity, "in_use": self.num_in_use, "idle": len(self._idle),
                "peak_in_use": self.peak_in_use, "allocations": self.allocations}


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
