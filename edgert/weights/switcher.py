"""TaskSwitcher: the active task's tensors as dense views over one run of weight slots.

Every task of an ``onnx-tasks`` pack has the same tensors (names, dtypes, shapes), so
one layout serves all of them: each tensor starts 4 KiB-aligned inside a contiguous run
of weight-pool slots, and block k of a tensor always lands at the same byte offset (a
*position*). A switch A -> B rewrites only the positions whose block hash differs,
copying from the spare-slot BlockCache when the block is resident and reading from
storage (coalesced, verified) otherwise. The slots outside the run are the cache.

NOTE: a switch is all-or-nothing. Displaced blocks are kept in the cache where a slot
is free or evictable; if a storage block fails its checksum, the positions already
written are restored (from the cache, else from storage) and the previous task stays
active and runnable.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass

import numpy as np

from ..errors import BudgetExceeded, IncompatibleModels, PackCorrupt
from ..memory import SlotPool, Storage
from ..pack import PackReader
from .block_cache import BlockCache

log = logging.getLogger(__name__)
ALIGN = 4096
MAX_EXTENT = 1 << 20  # coalesce adjacent block reads up to 1 MiB (O_DIRECT peaks near 1 MiB here)
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024
READ_THREADS = 4      # extents read and verified concurrently: O_DIRECT at queue depth 1 gets
                      # ~0.6 GB/s on this machine's disk, ~2 GB/s with a few reads in flight


_gil_lock = threading.Lock()
_gil_depth = 0
_gil_saved = 0.0


@contextmanager
def short_gil_turns(interval: float = 2e-4):
    """Let threads take turns on the GIL every `interval` s (Python's default is 5 ms).

    While this thread hashes under the GIL, a reader whose read completed waits for a
    turn before it can issue the next read: at 5 ms turns that wait, not the disk, set
    the cold-switch time (measured: 18 ms -> 12 ms per switch on the demo pack). The
    process-wide setting is restored when the last user leaves.
    """
    global _gil_depth, _gil_saved
    with _gil_lock:
        if _gil_depth == 0:
            _gil_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _gil_saved))
        _gil_depth += 1
    try:
        yield
    finally:
        with _gil_lock:
            _gil_depth -= 1
            if _gil_depth == 0:
                sys.setswitchinterval(_gil_saved)


def _align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class SwitchResult:
    task: str
    seconds: float = 0.0
    blocks_moved: int = 0
    bytes_moved: int = 0       # bytes written into the active task's positions
    from_cache: int = 0        # blocks copied from spare slots
    from_storage: int = 0      # blocks read from the pack
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
    def __init__(self, reader: PackReader, pool: SlotPool, storage: Storage, *,
                 cache: BlockCache | None = None, keep_displaced: bool = True):
        self.reader, self.pool, self.storage = reader, pool, storage
        self.cache = cache if cache is not None else BlockCache(pool, storage, reader)
        self.keep_displaced = keep_displaced
        self.layout = _layout(reader)
        self.run_bytes = _align_up(max((s.offset + s.nbytes for s in self.layout.values()),
                                       default=0))
        n = -(-self.run_bytes // pool.slot_size)
        if n > pool.free_count + self.cache.evictable:
            raise BudgetExceeded(f"dense weights of a task of {reader.path}", n * pool.slot_size,
                                 (pool.free_count + self.cache.evictable) * pool.slot_size)
        if pool.free_count < n:      # make room: spare blocks are only a cache
            self.cache.clear()
        self.first_slot, self.n_slots = pool.alloc_run(n), n
        self.run = pool.view_run(self.first_slot, n)            # uint8 [n * slot_size]
        self._positions(reader)
        self.active: str | None = None
        self._cur = np.full(len(self.pos_off), -1, np.int64)    # hash id per position, -1 = empty
        self._cur_blk = np.full(len(self.pos_off), -1, np.int64)
        self.history: list[SwitchResult] = []
        self._readers: ThreadPoolExecutor | None = None

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
        blk = self.task_blocks(task)
        t0 = time.perf_counter()
        res = SwitchResult(str(task))
        diff = np.flatnonzero(self.block_hid[blk] != self._cur)
        blocks = self.reader.blocks
        hashes = [blocks[b].hash for b in blk[diff].tolist()]
        # NOTE: pinned so that keeping displaced blocks cannot evict them mid-switch
        slots = self.cache.pin_resident(hashes)
        hit = np.fromiter((s is not None for s in slots), bool, len(slots))
        try:
            if self.keep_displaced and self.active is not None:
                res.kept = self._keep(diff)
            written: list[int] = []
            try:
                res.bytes_read, res.reads = self._read(diff[~hit], blk, written)
            except (PackCorrupt, OSError):
                self._restore(written)
                raise
            run, view = self.run, self.pool.view
            for o, n, s in zip(self.pos_off[diff].tolist(), self.pos_len[diff].tolist(), slots):
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
        res.seconds = time.perf_counter() - t0
        self.history.append(res)
        return res

    def _keep(self, diff: np.ndarray) -> int:
        kept, blocks = 0, self.reader.blocks
        for p, b in zip(diff.tolist(), self._cur_blk[diff].tolist()):
            if b < 0 or self.cache.contains(blocks[b].hash):
                continue
            o = int(self.pos_off[p])
            if self.cache.put(b, self.run[o:o + int(self.pos_len[p])]) is None:
                break                                   # no free or evictable slot left
            kept += 1
        return kept

    def _extents(self, positions: np.ndarray, blk: np.ndarray):
        """Group positions whose blocks lie back to back in the file (in file order).

        Each group is read with one scatter read into its (possibly scattered) positions
        of the run; the pack writer lays blocks out by which tasks use them, so a switch's
        blocks form a few long extents.
        """
        blocks = self.reader.blocks
        order = sorted(positions.tolist(), key=lambda p: blocks[blk[p]].offset)
        group: list[int] = []
        start = end = 0
        for p in order:
            ent = blocks[blk[p]]
            if group and (ent.offset != end or end - start >= MAX_EXTENT
                          or len(group) >= IOV_MAX):
                yield group
                group = []
            if not group:
                start = ent.offset
            group.append(p)
            end = ent.offset + _align_up(ent.length)
        if group:
            yield group

    def _read(self, positions: np.ndarray, blk: np.ndarray,
              written: list[int]) -> tuple[int, int]:
        """Read the blocks at ``positions`` from storage straight into the run; verify each.

        Reader threads only read (the kernel does the work, the GIL is free); this thread
        verifies each extent as its read completes, so hashing overlaps the reads still in
        flight. NOTE: blake3 holds the GIL for 64 KiB inputs, so hashing on the reader
        threads would stall the others' reads. On any failure every read has finished
        before this raises, so the caller can restore ``written`` safely."""
        groups = list(self._extents(positions, blk))
        for g in groups:
            written.extend(g)
        if len(groups) <= 1:
            for g in groups:
                self._read_extent(g, blk)
                self._verify_extent(g, blk)
            return sum(self._extent_bytes(g, blk) for g in groups), len(groups)
        if self._readers is None:
            self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="edgert-read")
        with short_gil_turns():
            futures = {self._readers.submit(self._read_extent, g, blk): g for g in groups}
            try:
                for f in as_completed(futures):
                    f.result()                      # re-raises a failed read
                    self._verify_extent(futures[f], blk)
            except BaseException:
                wait(futures)                       # no read may land after the restore
                raise
        return sum(self._extent_bytes(g, blk) for g in groups), len(groups)

    def _extent_bytes(self, group: list[int], blk: np.ndarray) -> int:
        first, last = self.reader.blocks[blk[group[0]]], self.reader.blocks[blk[group[-1]]]
        return last.offset + last.length - first.offset

    def _read_extent(self, group: list[int], blk: np.ndarray) -> None:
        views = [self.run[o:o + _align_up(int(n))]
                 for o, n in zip(self.pos_off[group], self.pos_len[group])]
        self.storage.read_scatter(self.reader.blocks[blk[group[0]]].offset, views)

    def _verify_extent(self, group: list[int], blk: np.ndarray) -> None:
        for p in group:
            o, n = self.pos_off[p], self.pos_len[p]
            self.reader.check_block(int(blk[p]), self.run[o:o + n])

    def _restore(self, positions: list[int]) -> None:
        """Put the active task's blocks back at ``positions`` after a failed switch."""
        try:
            for p in positions:
                b = int(self._cur_blk[p])
                if b < 0:
                    continue
                o, n = self.pos_off[p], self.pos_len[p]
                src = self.cache.peek(self.reader.blocks[b].hash)
                if src is not None:
                    self.run[o:o + n] = src[:n]
                else:
                    self.storage.read_into(self.reader.blocks[b].offset, n,
                                           self.run[o:o + _align_up(n)])
                    self.reader.check_block(b, self.run[o:o + n])
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
        need: dict[int, int] = {}          # block index -> how many named tasks need it
        first_seen: dict[int, int] = {}
        for rank, t in enumerate(tasks):
            blk = self.task_blocks(t)
            for b in set(blk[self.block_hid[blk] != self._cur].tolist()):
                need[b] = need.get(b, 0) + 1
                first_seen.setdefault(b, rank)
        order = sorted(need, key=lambda b: (-need[b], first_seen[b], b))
        room = self.pool.free_count + self.cache.evictable
        wanted = order[:room]
        hits = self.cache.counters.hits
        before = self.cache.counters.bytes_read
        for b in reversed(wanted):          # most-shared last, so LRU evicts it last
            self.cache.prefetch(b)
        self.cache.counters.hits = hits     # NOTE: prewarm touches are not cache hits of a switch
        return {"wanted": len(need), "resident": len(wanted),
                "bytes_read": self.cache.counters.bytes_read - before}

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown()
        self.cache.clear()
        self.pool.free_run(self.first_slot, self.n_slots)
        self.active = None

    def stats(self) -> dict:
        h = self.history
        return {"active": self.active, "switches": len(h),
                "bytes_moved": sum(r.bytes_moved for r in h),
                "bytes_read": sum(r.bytes_read for r in h),
                "blocks_from_cache": sum(r.from_cache for r in h),
                "blocks_from_storage": sum(r.from_storage for r in h),
                "run_bytes": self.n_slots * self.pool.slot_size,
                "spare_slots": self.pool.capacity - self.n_slots,
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
        pos = _align_up(pos + s.nbytes)
    return out
