"""TaskSwitcher: the active task's tensors as dense views over one run of weight slots.

Every task of an ``onnx-tasks`` pack has the same tensors (names, dtypes, shapes), so
one layout serves all of them: each tensor starts 4 KiB-aligned inside one contiguous
extent of the arena (the *run*), and block k of a tensor always lands at the same byte
offset (a *position*). A switch A -> B rewrites only the positions whose block hash
differs, copying from the spare-block BlockCache when the block is resident and reading
from the pack (the reader's one verified read path) otherwise. A zero block (nothing
stored) is written by a memset through the same path: no storage read, no cache slot.

NOTE: a switch is all-or-nothing. Displaced blocks are kept in the cache where a slot
is free or evictable; if a storage block fails its checksum, the positions already
written are restored (from the cache, else from storage) and the previous task stays
active and runnable.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..align import ALIGN, align_up
from ..errors import IncompatibleModels, PackCorrupt
from ..memory.arena import Arena
from ..memory.slots import Lease
from ..pack import PackReader
from .block_cache import BlockCache

log = logging.getLogger(__name__)


@dataclass
class SwitchResult:
    task: str
    seconds: float = 0.0
    blocks_moved: int = 0
    bytes_moved: int = 0       # bytes written into the active task's positions
    from_cache: int = 0        # blocks copied from spare slots
    from_storage: int = 0      # blocks read from the pack
    zero_filled: int = 0       # zero blocks written by a memset (no storage read)
    zero_bytes: int = 0        # bytes of those zero blocks
    bytes_read: int = 0        # bytes read from storage for this switch
    reads: int = 0             # storage reads (extents of adjacent blocks) for this switch
    kept: int = 0              # displaced blocks kept in spare slots


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives inside the run."""
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]


class TaskSwitcher:
    """The active task of one pack over a run of arena memory, and its spare-block cache.

    ``label`` names the owner in the arena's accounting; ``lock`` (the owner's) serialises
    switches and prewarms; the cache has a short lock of its own."""

    def __init__(self, reader: PackReader, arena: Arena, label: str, *,
                 keep_displaced: bool = True, lock: threading.RLock | None = None):
        self.reader, self.arena = reader, arena
        self.lock = lock if lock is not None else threading.RLock()
        self.keep_displaced = keep_displaced
        self.layout = _layout(reader)
        self.run_bytes = align_up(max((s.offset + s.nbytes for s in self.layout.values()),
                                      default=0))
        self._positions(reader)                 # IncompatibleModels before anything is taken
        # BudgetExceeded (naming the holders) before anything is read; other models' cache
        # gives way first
        self._lease = Lease(arena, f"{label}: task weights", self.run_bytes)
        self.run = self._lease.view[:self.run_bytes]            # uint8 [run_bytes]
        # NOTE: the cache keeps its own short lock: the owner's is held for whole inferences,
        # and another model's allocation must be able to reclaim spare blocks meanwhile
        self.cache = BlockCache(arena, reader, f"{label}: spare task blocks")
        self.active: str | None = None
        self._cur = np.full(len(self.pos_off), -1, np.int64)    # hash id per position, -1 = empty
        self._cur_blk = np.full(len(self.pos_off), -1, np.int64)
        self.history: list[SwitchResult] = []

    # --- layout --------------------------------------------------------------------------
    def _positions(self, reader: PackReader) -> None:
        bs, off, lens = reader.block_size, [], []
        for s in self.layout.values():
            for k in range(-(-s.nbytes // bs)):
                off.append(s.offset + k * bs)
                lens.append(min(bs, s.nbytes - k * bs))
        self.pos_off, self.pos_len = np.array(off, np.int64), np.array(lens, np.int64)
        hid: dict[bytes, int] = {}
        self.block_hid = np.array([hid.setdefault(b.hash, len(hid)) for b in reader.blocks],
                                  np.int64)
        self.block_zero = np.array([b.zero for b in reader.blocks], bool)
        self._task_blk: dict[str, np.ndarray] = {}
        for t in reader.tasks:
            blk = np.array([b for name in self.layout for b in reader.task(t)[name].blocks],
                           np.int64)
            if len(blk) != len(off) or np.any(
                    np.array([reader.blocks[b].length for b in blk], np.int64) != self.pos_len):
                raise IncompatibleModels(f"task {t!r}: block lengths do not match its tensors")
            self._task_blk[t] = blk

    def tensors(self) -> dict[str, np.ndarray]:
        """Dense views of the active task's tensors; fixed for the switcher's life."""
        out = {}
        for name, s in self.layout.items():
            out[name] = self.run[s.offset:s.offset + s.nbytes].view(s.dtype).reshape(s.shape)
        return out

    def task_blocks(self, task: str) -> np.ndarray:
        if task not in self._task_blk:
            self.reader.task(task)  # raises UnknownTask listing the tasks
        return self._task_blk[task]

    def changed_positions(self, task: str) -> np.ndarray:
        return np.flatnonzero(self.block_hid[self.task_blocks(task)] != self._cur)

    # --- switching -----------------------------------------------------------------------
    def switch(self, task: str) -> SwitchResult:
        with self.lock:
            return self._switch(task)

    def _switch(self, task: str) -> SwitchResult:
        blk = self.task_blocks(task)
        t0 = time.perf_counter()
        res = SwitchResult(str(task))
        diff = np.flatnonzero(self.block_hid[blk] != self._cur)
        is_zero = self.block_zero[blk[diff]]
        fill, copy = diff[is_zero], diff[~is_zero]   # NOTE: zero blocks never go through the cache
        blocks = self.reader.blocks
        hashes = [blocks[b].hash for b in blk[copy].tolist()]
        # NOTE: pinned so that keeping displaced blocks cannot evict them mid-switch
        slots = self.cache.pin_resident(hashes)
        hit = np.fromiter((s is not None for s in slots), bool, len(slots))
        try:
            if self.keep_displaced and self.active is not None:
                res.kept = self._keep(diff)
            missing = copy[~hit]
            if len(missing):
                self.reader.check_unchanged()   # a replaced or cut pack: refuse, change nothing
            if len(missing) or len(fill):
                try:   # the zero blocks are memset only once every read has succeeded
                    res.bytes_read, res.reads = self._read(np.concatenate([missing, fill]), blk)
                except (PackCorrupt, OSError):
                    self._restore(missing.tolist())
                    raise
            run, view = self.run, self.cache.pool.view
            for o, n, s in zip(self.pos_off[copy].tolist(), self.pos_len[copy].tolist(), slots):
                if s is not None:
                    run[o:o + n] = view(s)[:n]
        finally:
            for h, s in zip(hashes, slots):
                if s is not None:
                    self.cache.unpin(h)
        self._cur[diff] = self.block_hid[blk[diff]]
        self._cur_blk[diff] = blk[diff]
        self.active = str(task)
        res.blocks_moved, res.bytes_moved = len(diff), int(self.pos_len[diff].sum())
        res.from_cache, res.from_storage = int(hit.sum()), int((~hit).sum())
        res.zero_filled, res.zero_bytes = len(fill), int(self.pos_len[fill].sum())
        res.seconds = time.perf_counter() - t0
        self.history.append(res)
        return res

    def _keep(self, diff: np.ndarray) -> int:
        kept, blocks = 0, self.reader.blocks
        for p, b in zip(diff.tolist(), self._cur_blk[diff].tolist()):
            if b < 0 or self.block_zero[b] or self.cache.contains(blocks[b].hash):
                continue                                # a zero block comes back by memset
            o = int(self.pos_off[p])
            if self.cache.put(b, self.run[o:o + int(self.pos_len[p])]) is None:
                break                                   # no free or evictable slot left
            kept += 1
        return kept

    def _read(self, positions: np.ndarray, blk: np.ndarray) -> tuple[int, int]:
        """Read the blocks at ``positions`` from the pack straight into the run, verified
        (the pack's one read path: coalesced O_DIRECT scatter reads; zero blocks memset)."""
        views = [self.run[o:o + align_up(int(n))]
                 for o, n in zip(self.pos_off[positions], self.pos_len[positions])]
        return self.reader.read_into(blk[positions].tolist(), views)

    def _restore(self, positions: list[int]) -> None:
        """Put the active task's blocks back at ``positions`` after a failed switch."""
        try:
            for p in positions:
                b = int(self._cur_blk[p])
                if b < 0:
                    continue
                o, n = self.pos_off[p], self.pos_len[p]
                h = self.reader.blocks[b].hash
                (s,) = self.cache.pin_resident([h])   # pinned: no reclaim frees it mid-copy
                if s is not None:
                    try:
                        self.run[o:o + n] = self.cache.pool.view(s)[:n]
                    finally:
                        self.cache.unpin(h)
                else:
                    self.reader.read_into([b], [self.run[o:o + align_up(int(n))]])
        except (PackCorrupt, OSError):
            log.error("cannot restore task %s after a failed switch; no task is active",
                      self.active)
            self.active = None
            self._cur[:] = -1
            self._cur_blk[:] = -1
            raise

    def invalidate(self) -> None:
        """Forget what the run holds: the next switch rewrites every position (a full reload)."""
        self.active = None
        self._cur[:] = -1
        self._cur_blk[:] = -1

    # --- prewarm -------------------------------------------------------------------------
    def prewarm(self, tasks: list[str]) -> dict:
        """Fill spare slots with blocks the named tasks need and the active task lacks,
        blocks needed by more of them first. Returns counts of what was loaded."""
        with self.lock:
            return self._prewarm(tasks)

    def _prewarm(self, tasks: list[str]) -> dict:
        wanted, n = self.plan([(t, 1.0) for t in tasks])
        hits = self.cache.counters.hits
        before = self.cache.counters.bytes_read
        for b in reversed(wanted):          # most-shared last, so LRU evicts it last
            self.cache.prefetch(b)
        self.cache.counters.hits = hits     # NOTE: prewarm touches are not cache hits of a switch
        return {"wanted": n, "resident": len(wanted),
                "bytes_read": self.cache.counters.bytes_read - before}

    def plan(self, weighted: list[tuple[str, float]]) -> tuple[list[int], int]:
        """Blocks the weighted tasks need and the active task lacks, ranked by the summed
        weight of the tasks needing them (ties: the earlier task), cut to what spare memory
        holds (free pages and evictable slots); and how many were wanted in all."""
        need: dict[int, float] = {}        # block index -> summed weight of tasks needing it
        first_seen: dict[int, int] = {}
        for rank, (t, w) in enumerate(weighted):
            blk = self.task_blocks(t)
            moved = (self.block_hid[blk] != self._cur) & ~self.block_zero[blk]
            for b in set(blk[moved].tolist()):
                need[b] = need.get(b, 0.0) + w
                first_seen.setdefault(b, rank)
        order = sorted(need, key=lambda b: (-need[b], first_seen[b], b))
        room = self.arena.free_pages * ALIGN // self.cache.pool.slot_size + self.cache.evictable
        return order[:room], len(need)

    def prefetch(self, blocks: list[int]) -> list[int]:
        """Load ``blocks`` into spare slots (a resident one is only touched: LRU keeps the
        last touched longest); the ones read from storage."""
        with self.lock:
            hits, got = self.cache.counters.hits, []
            for b in blocks:
                fresh = not self.cache.contains(self.reader.blocks[b].hash)
                if self.cache.prefetch(b) and fresh:
                    got.append(b)
            self.cache.counters.hits = hits
            return got

    def close(self) -> None:
        """Give the run and every spare block back to the arena (idempotent)."""
        with self.lock:
            self.cache.close()
            self._lease.close()
            self.active = None

    def stats(self) -> dict:
        h = self.history
        return {"active": self.active, "switches": len(h),
                "bytes_moved": sum(r.bytes_moved for r in h),
                "bytes_read": sum(r.bytes_read for r in h),
                "bytes_zero_filled": sum(r.zero_bytes for r in h),
                "blocks_from_cache": sum(r.from_cache for r in h),
                "blocks_from_storage": sum(r.from_storage for r in h),
                "blocks_zero_filled": sum(r.zero_filled for r in h),
                "run_bytes": self.run_bytes,
                "spare_bytes": self.cache.pool.in_use_bytes,
                "cache": self.cache.stats()}


def _layout(reader: PackReader) -> dict[str, Slot]:
    """One layout for every task: tensors in manifest order, each starting 4 KiB-aligned."""
    tasks = reader.tasks
    if not tasks:
        raise IncompatibleModels(f"{reader.path}: the pack holds no task")
    ref = reader.task(tasks[0])
    for t in tasks[1:]:
        other = reader.task(t)
        for name in ref.keys() | other.keys():
            a, b = ref.get(name), other.get(name)
            if a is None or b is None or (a.dtype, a.shape) != (b.dtype, b.shape):
                raise IncompatibleModels(f"tasks {tasks[0]!r} and {t!r} differ at tensor {name!r}")
    out, pos = {}, 0
    for name, s in ref.items():
        out[name] = Slot(pos, s.nbytes, s.np_dtype, tuple(s.shape))
        pos = align_up(pos + s.nbytes)
    return out
