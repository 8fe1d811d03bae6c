"""Paged KV cache: 16-token pages carved from the arena's "kv" pool.

One page holds K and V of *all* layers for 16 consecutive tokens of one sequence, laid
out as ``[layers, 2 (K, V), 16, kv_heads, head_dim]`` (token-major, so a sequence's pages
gathered for one layer are K and V as ``[tokens, kv_heads, head_dim]`` without another
copy), optionally followed by a *tail* of
``tail`` elements (the final hidden state of the page's last token, so a prompt that is
entirely cached still gets its next-token logits). A page is the unit the prefix cache
names by a chained hash (edgert/kv/prefix.py): one name per 16 tokens, whatever the depth.

Two layers, vLLM style:
- ``PagePool`` owns pages: arena slots, ref counts, an opaque *tag* per page (its prefix
  hash) and an O(1) LRU list of pages whose ref count fell to zero. Such a page keeps its
  slot, contents and tag until it is handed out again (oldest first) or the arena reclaims
  it for another model; ``on_evict(page_id)`` is called at that moment, tag still set.
  NOTE: pages become idle with strictly increasing timestamps and a sequence gives its
  pages back last page first, so whenever a page and its parent are both idle the parent
  is the more recent: oldest-first eviction (here and in the arena) is prefix-closed.
- ``PagedKV`` owns sequences: a block table (page ids in token order), a length, the token
  ids; it reserves pages before a forward pass writes them (``BudgetExceeded`` before
  anything changes), copies a shared partial page before writing into it, and reads K/V
  with one ``index_select`` per layer over a strided view of every page of the arena (no
  per-page Python work per decode step).
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
from edgert.memory.arena import PAGE
from edgert.memory.slots import SlotPool

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
                 dtype: torch.dtype = torch.float32, to_device=None, cap: int | None = None,
                 tail: int = 0):
        """`to_device(cpu_view) -> tensor`: where the engine reads pages (None = the CPU
        view itself; `Arena.on_gpu` for a zero-copy CUDA view of the same slot). `tail`:
        elements kept after K/V in every page (0 = none)."""
        self.page_shape = (num_layers, 2, PAGE_TOKENS, num_kv_heads, head_dim)
        self.dtype = dtype
        self.tail = int(tail)
        self._np_dtype = np_storage(str(dtype).removeprefix("torch."))   # holds its bytes
        self.item = torch.empty((), dtype=dtype).element_size()
        self._kv_elems = int(np.prod(self.page_shape))
        self.nbytes = (self._kv_elems + self.tail) * self.item   # meaningful bytes of a page
        self.page_bytes = align_up(self.nbytes)
        self.label = label
        self.arena = arena
        self._pool = SlotPool(arena, label, self.page_bytes, cap=cap)
        self._to_device = to_device
        self._pages: dict[int, torch.Tensor] = {}   # page id -> flat view where the engine computes
        self.ref: dict[int, int] = {}                # page id -> ref count (held pages)
        self.tags: dict[int, bytes] = {}             # page id -> tag (its prefix hash)
        self._idle: OrderedDict[int, float] = OrderedDict()  # ref 0, oldest first -> since
        self._last_idle = 0.0
        self._lock = threading.Lock()   # NOTE: not reentrant: the arena's reclaim from inside
        #                                 our own allocate() skips us instead of re-entering
        self._allocating = 0            # thread id inside allocate(), else 0
        self._rows: torch.Tensor | None = None
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

    @property
    def num_idle(self) -> int:
        return len(self._idle)

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
            t = torch.from_numpy(self.cpu_bytes(pid).view(self._np_dtype))
            if self.dtype == torch.bfloat16:
                t = t.view(torch.bfloat16)
            self._pages[pid] = t if self._to_device is None else self._to_device(t)
        reused = []
        for _ in range(reuse):
            pid, _ = self._idle.popitem(last=False)
            self._evicted(pid)
            reused.append(pid)
        ids = fresh + reused
        for pid in ids:
            self.ref[pid] = 1
        self.allocations += n
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)
        return ids

    def _evicted(self, pid: int) -> None:
        """An idle page loses its contents (handed out again, or given back): tell the
        owner while its tag is still set, then forget the tag. Under the lock."""
        if self.on_evict is not None:
            self.on_evict(pid)
        self.tags.pop(pid, None)

    def incref(self, pid: int) -> None:
        """Share a held page (also revives an idle one, e.g. a cached prefix page)."""
        with self._lock:
            assert pid in self.ref, f"page {pid} is not held"
            self._incref(pid)

    def _incref(self, pid: int) -> None:
        if self.ref[pid] == 0:
            del self._idle[pid]
        self.ref[pid] += 1
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)

    def decref(self, pids) -> None:
        """Release pages; those no one holds become idle cache, in the order given."""
        with self._lock:
            for pid in pids:
                assert self.ref.get(pid, 0) > 0, f"page {pid} released more often than taken"
                self.ref[pid] -= 1
                if self.ref[pid] == 0:
                    # strictly increasing, so the order of release is the order of eviction
                    self._last_idle = max(time.monotonic(), self._last_idle + 1e-9)
                    self._idle[pid] = self._last_idle       # most recently freed at the end

    def drop(self, pids) -> None:
        """Release pages whose contents are worthless (a failed read): those no one else
        holds go straight back to the arena, untagged, instead of becoming idle cache."""
        with self._lock:
            gone = []
            for pid in pids:
                assert self.ref.get(pid, 0) > 0, f"page {pid} released more often than taken"
                self.ref[pid] -= 1
                if self.ref[pid] == 0:
                    gone.append(pid)
            self._give_back(gone)

    def _give_back(self, pids: list[int]) -> None:
        for pid in pids:
            self.tags.pop(pid, None)
            del self.ref[pid], self._pages[pid]
        self._pool.free(pids)

    # --- tags: the prefix hash of a full page --------------------------------------------
    def set_tag(self, pid: int, tag: bytes) -> None:
        with self._lock:
            assert self.ref.get(pid, 0) > 0, f"page {pid} is not held"
            self.tags[pid] = tag

    def share_tagged(self, pairs) -> list[int]:
        """Take a reference on each (page, tag) in order while the page still carries that
        tag (held or idle); stops at the first that does not. The pages taken."""
        got = []
        with self._lock:
            for pid, tag in pairs:
                if self.tags.get(pid) != tag:
                    break
                self._incref(pid)
                got.append(pid)
        return got

    def read_tagged(self, pid: int, tag: bytes, out: np.ndarray) -> bool:
        """Copy the page's bytes into `out` if it still carries `tag` (under the lock, so
        it cannot be handed out meanwhile). Full tagged pages are never written again."""
        with self._lock:
            if self.tags.get(pid) != tag:
                return False
            out[:self.nbytes] = self.cpu_bytes(pid)
            return True

    def forget_idle(self) -> int:
        """Give every idle page back to the arena (they are forgotten, not evicted)."""
        with self._lock:
            gone = list(self._idle)
            self._idle.clear()
            self._give_back(gone)
            return len(gone)

    def untag_all(self) -> None:
        """Forget every tag (pages in use keep their contents and owners)."""
        with self._lock:
            self.tags.clear()

    # --- page contents -------------------------------------------------------------------
    def page(self, pid: int) -> torch.Tensor:
        """Page `pid` as a tensor [layers, 2, 16, kv_heads, head_dim] (zero copy)."""
        return self._pages[pid][:self._kv_elems].view(self.page_shape)

    def tail_of(self, pid: int) -> torch.Tensor:
        """The page's tail [tail] (zero copy)."""
        return self._pages[pid][self._kv_elems:]

    def cpu_bytes(self, pid: int) -> np.ndarray:
        """The page's meaningful bytes as the CPU sees them (uint8, zero copy): what tiers
        copy. On a GPU the caller makes sure the kernels that wrote them are done."""
        return self._pool.view(pid)[:self.nbytes]

    def ref_count(self, pid: int) -> int:
        return self.ref.get(pid, 0)

    def copy_page(self, dst: int, src: int) -> None:
        self._pages[dst].copy_(self._pages[src])

    def layer_rows(self, layer: int) -> torch.Tensor:
        """[arena pages, 2*16*kv_heads*head_dim]: row `pid` is layer `layer`'s K and V of
        page `pid` (a strided view over the whole arena; only rows of held pages mean
        anything). One `index_select` over it gathers a sequence's K/V of that layer."""
        return self.all_rows()[:, layer]

    def all_rows(self) -> torch.Tensor:
        """[arena pages, layers, 2*16*kv_heads*head_dim]: `layer_rows` of every layer (one
        strided view; the compiled decode step picks its layer inside the graph)."""
        if self._rows is None:
            arena = self._pool.arena
            # NOTE: pages are arena extents addressed by their first 4 KiB page, so a view
            # of the arena's whole mapping (the same bytes SlotPool.view slices) with a
            # row stride of 4 KiB reaches every page's K/V at row = page id
            base = torch.from_numpy(arena.memory.view(self._np_dtype))
            if self.dtype == torch.bfloat16:
                base = base.view(torch.bfloat16)
            if self._to_device is not None:
                base = self._to_device(base)
            per_layer = self._kv_elems // self.page_shape[0]
            rows = arena.pages - -(-self._kv_elems * self.item // PAGE) + 1
            self._rows = torch.as_strided(base, (max(rows, 0), self.page_shape[0], per_layer),
                                          (PAGE // self.item, per_layer, 1))
        return self._rows

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
                self._evicted(pid)
            self._give_back(gone)
            self.reclaimed += len(gone)
            return len(gone)
        finally:
            self._lock.release()

    def close(self) -> None:
        """Give every page back to the arena (sequences still holding pages lose them)."""
        with self._lock:
            self._pool.arena.unregister(self)
            self._pages.clear(), self.ref.clear(), self._idle.clear(), self.tags.clear()
            self._rows = None
            self._pool.close()

    def stats(self) -> dict:
        with self._lock:
            return {"page_tokens": PAGE_TOKENS, "page_bytes": self.page_bytes,
                    "cap_pages": self.capacity, "held": self._pool.count,
                    "in_use": self.num_in_use, "idle": len(self._idle),
                    "tagged": len(self.tags),
                    "peak_in_use": self.peak_in_use, "allocations": self.allocations,
                    "reclaimed": self.reclaimed}


@dataclass
class Sequence:
    """One sequence's view of the cache: page ids in token order, tokens written, their
    ids, the names of its full pages (prefix hashes) and the extra keys of those names."""
    block_table: list[int] = field(default_factory=list)
    length: int = 0
    tokens: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    extra: tuple = ()
    _index: torch.Tensor | None = None     # block_table as a tensor where the engine computes


class PagedKV:
    """Per-sequence block tables over a PagePool; the engine's only way to the KV bytes."""

    def __init__(self, pages: PagePool, device: torch.device | str = "cpu"):
        self.pages = pages
        self.device = torch.device(device)

    def new_sequence(self, extra: tuple = ()) -> Sequence:
        return Sequence(extra=extra)

    def reserve(self, seq: Sequence, n_new: int) -> None:
        """Make room for `n_new` more tokens; BudgetExceeded (nothing changed) if it cannot.

        A partial last page that another sequence shares is copied first (copy on write)."""
        need = -(-(seq.length + n_new) // PAGE_TOKENS) - len(seq.block_table)
        off, i = seq.length % PAGE_TOKENS, seq.length // PAGE_TOKENS
        cow = n_new > 0 and off and self.pages.ref_count(seq.block_table[i]) > 1
        got = self.pages.allocate(max(need, 0) + cow) if need > 0 or cow else []
        if cow:
            new = got.pop()
            old = seq.block_table[i]
            self.pages.copy_page(new, old)
            seq.block_table[i] = new
            self.pages.decref([old])
        seq.block_table.extend(got)
        if got or cow:
            seq._index = None

    def write(self, seq: Sequence, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K, V [kv_heads, n, head_dim] of tokens seq.length .. seq.length+n-1."""
        n = k.shape[1]
        pos, done = seq.length, 0
        while done < n:
            page = self.pages.page(seq.block_table[pos // PAGE_TOKENS])
            off = pos % PAGE_TOKENS
            m = min(PAGE_TOKENS - off, n - done)
            page[layer, 0, off:off + m] = k[:, done:done + m].transpose(0, 1)
            page[layer, 1, off:off + m] = v[:, done:done + m].transpose(0, 1)
            pos, done = pos + m, done + m

    def write_tails(self, seq: Sequence, h: torch.Tensor) -> None:
        """Keep, for each page the tokens being added fill, the last token's row of `h`
        [n, tail] (the final hidden state before the model's last norm)."""
        if not self.pages.tail:
            return
        start = seq.length
        for pos in range(start - start % PAGE_TOKENS + PAGE_TOKENS - 1, start + h.shape[0],
                         PAGE_TOKENS):
            self.pages.tail_of(seq.block_table[pos // PAGE_TOKENS]).copy_(h[pos - start])

    def tail(self, seq: Sequence) -> torch.Tensor:
        """The tail of the sequence's last (full) page."""
        assert seq.length and seq.length % PAGE_TOKENS == 0
        return self.pages.tail_of(seq.block_table[seq.length // PAGE_TOKENS - 1])

    def read(self, seq: Sequence, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [kv_heads, end, head_dim] of tokens 0 .. end-1 (strided views of one gather
        over the pages: the only copy, O(context) bytes in one kernel per layer)."""
        n = -(-end // PAGE_TOKENS)
        idx = seq._index
        if idx is None or idx.shape[0] != len(seq.block_table):
            idx = seq._index = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
        _, _, t, hk, d = self.pages.page_shape
        rows = self.pages.layer_rows(layer)                                # [pages, 2*16*Hk*D]
        half = t * hk * d
        k = rows[:, :half].index_select(0, idx[:n]).view(n * t, hk, d)[:end]    # [S, Hk, D]
        v = rows[:, half:].index_select(0, idx[:n]).view(n * t, hk, d)[:end]
        return k.transpose(0, 1), v.transpose(0, 1)

    def gather(self, seq: Sequence, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as `read`, page by page (the reference `read` is tested against)."""
        n_pages = -(-end // PAGE_TOKENS)
        kv = torch.cat([self.pages.page(p)[layer] for p in seq.block_table[:n_pages]], dim=1)
        return kv[0, :end].transpose(0, 1), kv[1, :end].transpose(0, 1)

    def advance(self, seq: Sequence, tokens) -> None:
        """Mark the written tokens (their ids) as part of the sequence (after every layer
        wrote them)."""
        n = len(tokens)
        assert seq.length + n <= len(seq.block_table) * PAGE_TOKENS
        seq.length += n
        seq.tokens.extend(tokens)

    def fork(self, seq: Sequence) -> Sequence:
        """A second sequence sharing every page of `seq` (its partial page is copied by the
        first of the two that writes into it)."""
        for pid in seq.block_table:
            self.pages.incref(pid)
        return Sequence(list(seq.block_table), seq.length, list(seq.tokens), list(seq.hashes),
                        seq.extra)

    def truncate(self, seq: Sequence, pages: int, length: int) -> None:
        """Undo a failed step: keep the first `pages` pages and `length` tokens."""
        extra = seq.block_table[pages:]
        del seq.block_table[pages:]
        del seq.tokens[length:]
        del seq.hashes[length // PAGE_TOKENS:]
        seq.length = length
        seq._index = None
        self.pages.decref(extra[::-1])

    def release(self, seq: Sequence) -> None:
        """Give the pages back, last page first (so parents stay cached longer)."""
        self.pages.decref(seq.block_table[::-1])
        seq.block_table, seq.length, seq.tokens, seq.hashes = [], 0, [], []
        seq._index = None
