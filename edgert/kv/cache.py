"""KVCache: a model's KV cache: paged sequences, and prefixes reused across three tiers.

The model calls a small API: ``new_sequence(extra)``, ``match(seq, ids)`` before a prefill
(cached pages join the sequence; returns the tokens they cover), ``reserve``/``write``/
``read``/``write_tails``/``advance`` around a forward step, ``release``, ``note_compute``.

Tiers, walked in order by a lookup, hits promoted into arena pages:
- arena: full pages carry their prefix hash as a tag in the PagePool and stay findable
  while idle, until the pool or the arena takes them back (`PageIndex`, `on_evict`);
- host: `HostTier`, copies made by the writer thread when a page goes idle (write-behind,
  off the decode path; a page evicted before its copy was made is copied at eviction);
- disk: `DiskTier`, a chunk file written by the writer thread as soon as a sequence fills
  a chunk (write-through), so a crash or a clean exit leaves every full chunk on disk;
- server: the fleet server (`attach_remote`, edgert/server/kvtier.py): the same chunks,
  published by the writer, fetched whole and verified, only at chunk boundaries.
The writer is bounded (`WRITE_BEHIND_BYTES`): a prefill that gets that far ahead of the
disk waits for it (back-pressure), so copies of evicted pages never pile up unbounded.
A tier hit is taken only when reading it is cheaper than computing it, by figures measured
in this process (or, before any, the last process's figures kept beside the disk tier).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from edgert.config import KvCache
from edgert.errors import BudgetExceeded

from .disk import DiskTier
from .host import HostTier
from .paged import PAGE_TOKENS, PagedKV, PagePool, Sequence
from .prefix import PageIndex, chain_hashes, page_hash
from .writer import TierWriter

log = logging.getLogger(__name__)
TIERS = ("arena", "host", "disk", "server")
EWMA = 0.3          # weight of a new measurement in the cost figures
# The writer's bound: bytes of pages its queued and running jobs may need (and so the most
# that copies of evicted pages waiting for it can take, outside every budget). 64 MiB is two
# 256-token chunks of a Mixtral-size model (2 MiB pages), a quarter of the smallest shipped
# host tier; a prefill only waits once the disk is that far behind. Never above the tiers'
# budgets together, never below one chunk (a chunk job must fit).
WRITE_BEHIND_BYTES = 64 << 20


def default_dir() -> Path:
    """The user's cache directory: $XDG_CACHE_HOME/edgert/kv, else ~/.cache/edgert/kv."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgert" / "kv"


class Costs:
    """Measured costs: seconds per computed prompt token, seconds per byte read per tier."""

    def __init__(self, path: Path | None):
        self.path = path
        self.compute_s_per_token: float | None = None
        self.read_s_per_byte: dict[str, float] = {}
        if path is not None:
            try:
                doc = json.loads(path.read_text())
                self.compute_s_per_token = float(doc["compute_s_per_token"]) \
                    if doc.get("compute_s_per_token") else None
                self.read_s_per_byte = {k: float(v) for k, v in doc["read_s_per_byte"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass

    @staticmethod
    def _mix(old, new):
        return new if old is None else (1 - EWMA) * old + EWMA * new

    def note_compute(self, tokens: int, seconds: float) -> None:
        self.compute_s_per_token = self._mix(self.compute_s_per_token, seconds / tokens)

    def note_read(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes:
            self.read_s_per_byte[tier] = self._mix(self.read_s_per_byte.get(tier),
                                                   seconds / nbytes)

    def worth_reading(self, tier: str, nbytes: int, tokens: int) -> bool:
        """Is reading `nbytes` from `tier` faster than computing `tokens`? (True until both
        figures are measured: the first read measures the tier.)"""
        read = self.read_s_per_byte.get(tier)
        if read is None or self.compute_s_per_token is None:
            return True
        return nbytes * read < tokens * self.compute_s_per_token

    def save(self) -> None:
        if self.path is None or not self.path.parent.is_dir():
            return
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"compute_s_per_token": self.compute_s_per_token,
                                       "read_s_per_byte": self.read_s_per_byte}))
            os.replace(tmp, self.path)
        except OSError as e:
            log.debug("cannot save kv cost figures: %s", e)

    def stats(self) -> dict:
        return {"compute_s_per_token": self.compute_s_per_token,
                "read_s_per_byte": dict(self.read_s_per_byte)}


class KVCache:
    """Paged sequences over `pages`, with prefix reuse when ``options.prefix``."""

    def __init__(self, pages: PagePool, fingerprint: bytes, options: KvCache,
                 device="cpu", lock=None):
        """`lock`: the owner's lock, held by `clear` (the model's: no forward step runs while
        the tiers are emptied)."""
        self.pages = pages
        self.paged = PagedKV(pages, device)
        self.fp = fingerprint
        self.options = options
        self.prefix = bool(options.prefix)
        self.chunk_pages = max(1, options.chunk_tokens // PAGE_TOKENS)
        self.index = PageIndex()
        self.host = HostTier(options.host, pages.nbytes) \
            if self.prefix and options.host > 0 else None
        self.disk = self._disk_tier(options) if self.prefix and options.disk > 0 else None
        self.costs = Costs(self.disk.dir / "costs.json" if self.disk else None)
        self._lock = threading.Lock()       # pending, stash, counters
        self._pending: dict[bytes, int] = {}    # page hash -> queued jobs that need its bytes
        self._stash: dict[bytes, np.ndarray] = {}   # bytes of pending pages evicted early
        self.counters = {"lookups": 0, "hit_tokens": 0, "computed_tokens": 0,
                         "evict_copies": 0}
        self.tier_counters = {t: {"hit_tokens": 0, "bytes_read": 0, "bytes_written": 0,
                                  "skipped_tokens": 0} for t in TIERS}
        self._writer = TierWriter(weakref.WeakMethod(self._run), self.write_behind_bound()) \
            if self.host or self.disk else None
        self.remote = None                  # the fleet server tier, once attached
        self._closed = False
        self._owner_lock = lock if lock is not None else threading.RLock()
        if self.prefix:
            pages.on_evict = self._on_evict

    def write_behind_bound(self) -> int:
        """The writer's bound in bytes (see WRITE_BEHIND_BYTES)."""
        tiers = (self.host.budget if self.host else 0) + (self.disk.budget if self.disk else 0)
        return max(self.chunk_pages * self.pages.nbytes, min(WRITE_BEHIND_BYTES, tiers))

    def attach_remote(self, tier) -> None:
        """Share chunks through the fleet server (a ServerTier): publish every full chunk,
        look it up before a prefill. No-op without prefix reuse."""
        if not self.prefix or self._closed:
            return
        if self._writer is None:
            self._writer = TierWriter(weakref.WeakMethod(self._run), self.write_behind_bound())
        self.remote = tier

    def _disk_tier(self, options: KvCache) -> DiskTier | None:
        root = Path(options.dir) if options.dir else default_dir()
        try:
            return DiskTier(root, self.fp, options.disk, self.pages.nbytes)
        except OSError as e:
            log.warning("kv cache: no disk tier (%s); prefixes are kept in memory only", e)
            return None

    # --- sequences (the paged mechanism) ----------------------------------------------------
    def new_sequence(self, extra: tuple = ()) -> Sequence:
        return self.paged.new_sequence(extra)

    def reserve(self, seq, n):
        self.paged.reserve(seq, n)

    def write(self, seq, layer, k, v):
        self.paged.write(seq, layer, k, v)

    def read(self, seq, layer, end):
        return self.paged.read(seq, layer, end)

    def write_tails(self, seq, h):
        self.paged.write_tails(seq, h)

    def tail(self, seq):
        return self.paged.tail(seq)

    def fork(self, seq):
        return self.paged.fork(seq)

    def truncate(self, seq, pages, length):
        self.paged.truncate(seq, pages, length)

    def advance(self, seq: Sequence, tokens) -> None:
        """The written tokens join the sequence; pages they fill are named and cached."""
        self.paged.advance(seq, tokens)
        if not self.prefix:
            return
        parent = seq.hashes[-1] if seq.hashes else self.fp
        for j in range(len(seq.hashes), seq.length // PAGE_TOKENS):
            h = page_hash(parent, seq.tokens[j * PAGE_TOKENS:(j + 1) * PAGE_TOKENS], seq.extra)
            pid = seq.block_table[j]
            self.pages.set_tag(pid, h)
            self.index.add(h, pid)
            seq.hashes.append(h)
            parent = h
            if (self.disk is not None or self.remote is not None) \
                    and (j + 1) % self.chunk_pages == 0:
                self._queue_chunk(seq, j + 1 - self.chunk_pages, j + 1)

    def release(self, seq: Sequence) -> None:
        """Give the sequence's pages back; cached pages nobody holds any more are copied
        to the host tier by the writer (leaf first)."""
        named = [(pid, h) for pid, h in zip(seq.block_table, seq.hashes)] \
            if self.host is not None else []
        parents = [self.fp] + list(seq.hashes[:-1])
        self.paged.release(seq)
        jobs = [("host", pid, h, parent) for (pid, h), parent in zip(named, parents)
                if h not in self.host and self.pages.ref_count(pid) == 0] if named else []
        for job in reversed(jobs):
            self._submit(job, [job[2]])

    # --- prefix lookup ----------------------------------------------------------------------
    def match(self, seq: Sequence, ids: list[int]) -> int:
        """Cached pages for the full pages of `ids` (fed after what `seq` holds) join the
        sequence, longest run first from the arena, then host, then disk; the tokens they
        cover (a multiple of 16; the caller computes the rest)."""
        if not self.prefix or len(ids) < PAGE_TOKENS or seq.length % PAGE_TOKENS \
                or len(seq.hashes) != seq.length // PAGE_TOKENS \
                or len(seq.block_table) != len(seq.hashes):
            return 0
        parent = seq.hashes[-1] if seq.hashes else self.fp
        hashes = chain_hashes(self.fp, ids, PAGE_TOKENS, seq.extra, parent=parent)
        n, k = len(hashes), 0
        while k < n:
            got = self._from_arena(seq, hashes[k:])
            if not got and self.host is not None:
                got = self._from_host(seq, hashes[k:])
            if not got and self.disk is not None:
                got = self._from_disk(seq, hashes[k:], ids[k * PAGE_TOKENS:])
            if not got and self.remote is not None \
                    and (len(seq.hashes) + k) % self.chunk_pages == 0:
                got = self._from_remote(seq, hashes[k:], ids[k * PAGE_TOKENS:],
                                        hashes[k - 1] if k else parent)
            if not got:
                break
            k += got
        if k and self.disk is not None:     # chunks in use stay on disk longest
            first = len(seq.hashes)
            names = [hashes[j - first] for j in range(first, first + k)
                     if (j + 1) % self.chunk_pages == 0]
            self.disk.touch(reversed(names))
        t = k * PAGE_TOKENS
        seq.length += t
        seq.tokens.extend(ids[:t])
        seq.hashes.extend(hashes[:k])
        seq._index = None
        with self._lock:
            self.counters["lookups"] += 1
            self.counters["hit_tokens"] += t
        return t

    def _from_arena(self, seq, hashes) -> int:
        pids = self.index.run(hashes)
        got = self.pages.share_tagged(zip(pids, hashes)) if pids else []
        seq.block_table.extend(got)
        self._count("arena", hit_tokens=len(got) * PAGE_TOKENS)
        return len(got)

    def _from_host(self, seq, hashes) -> int:
        entries = self.host.run(hashes)
        m = len(entries)
        if not m or not self._worth("host", m):
            return 0
        try:
            pids = self.pages.allocate(m)
        except BudgetExceeded:
            return 0
        t0 = time.perf_counter()
        for pid, data in zip(pids, entries):
            self.pages.cpu_bytes(pid)[:] = data
        nbytes = m * self.pages.nbytes
        self.costs.note_read("host", nbytes, time.perf_counter() - t0)
        self._adopt(seq, pids, hashes[:m])
        self.host.touch(reversed(hashes[:m]))
        self._count("host", hit_tokens=m * PAGE_TOKENS, bytes_read=nbytes)
        self._count("arena", bytes_written=nbytes)
        return m

    def _from_disk(self, seq, hashes, ids) -> int:
        runs = self.disk.run(hashes)
        total = sum(c for _, _, c in runs)
        if not total or not self._worth("disk", total):
            return 0
        m = 0
        for name, first, count in runs:
            try:
                pids = self.pages.allocate(count)
            except BudgetExceeded:
                break
            outs = [self.pages.cpu_bytes(p) for p in pids]
            t0 = time.perf_counter()
            ok = self.disk.read(name, first, hashes[m:m + count],
                                ids[m * PAGE_TOKENS:(m + count) * PAGE_TOKENS], outs)
            if not ok:
                self.pages.drop(pids)
                break
            nbytes = count * self.pages.nbytes
            self.costs.note_read("disk", nbytes, time.perf_counter() - t0)
            self._adopt(seq, pids, hashes[m:m + count])
            self._count("disk", hit_tokens=count * PAGE_TOKENS, bytes_read=nbytes)
            self._count("arena", bytes_written=nbytes)
            m += count
        return m

    def _from_remote(self, seq, hashes, ids, parent: bytes) -> int:
        """Whole chunks from the fleet server: one look-up, a fetch only where it is
        measured faster than computing, every chunk verified before a page is used."""
        cp = self.chunk_pages
        names = [hashes[(i + 1) * cp - 1] for i in range(len(hashes) // cp)]
        sizes = self.remote.lookup(names) if names else []
        n = next((i for i, z in enumerate(sizes) if z is None), len(sizes))
        if not n or not self._worth("server", n * cp):
            return 0
        t0 = time.perf_counter()
        raws = self.remote.fetch(names[:n])
        m = 0
        for i, raw in enumerate(raws):
            pages = self.remote.verify(raw, hashes[m:m + cp], parent if m == 0 else hashes[m - 1],
                                       ids[m * PAGE_TOKENS:(m + cp) * PAGE_TOKENS])
            if pages is None:
                break                                   # in doubt: computed instead
            try:
                pids = self.pages.allocate(cp)
            except BudgetExceeded:
                break
            for pid, data in zip(pids, pages):
                self.pages.cpu_bytes(pid)[:] = np.frombuffer(data, np.uint8)
            self._adopt(seq, pids, hashes[m:m + cp])
            nbytes = cp * self.pages.nbytes
            self._count("server", hit_tokens=cp * PAGE_TOKENS, bytes_read=len(raw))
            self._count("arena", bytes_written=nbytes)
            m += cp
        if m:
            self.costs.note_read("server", m * self.pages.nbytes, time.perf_counter() - t0)
        return m

    def _adopt(self, seq, pids, hashes) -> None:
        for pid, h in zip(pids, hashes):
            self.pages.set_tag(pid, h)
            self.index.add(h, pid)
        seq.block_table.extend(pids)

    def _worth(self, tier: str, pages: int) -> bool:
        if self.costs.worth_reading(tier, pages * self.pages.nbytes, pages * PAGE_TOKENS):
            return True
        self._count(tier, skipped_tokens=pages * PAGE_TOKENS)
        return False

    def note_compute(self, tokens: int, seconds: float) -> None:
        """A forward step computed `tokens` prompt tokens in `seconds`."""
        with self._lock:
            self.counters["computed_tokens"] += tokens
        if tokens >= PAGE_TOKENS:
            self.costs.note_compute(tokens, seconds)

    # --- the writer: host copies and disk chunks ---------------------------------------------
    def _queue_chunk(self, seq, lo: int, hi: int) -> None:
        hashes = seq.hashes[lo:hi]
        if (self.disk is None or self.disk.has_chunk(hashes[-1])) and \
                (self.remote is None or self.remote.has(hashes[-1])):
            return
        if self.paged.device.type == "cuda":   # the writer reads what the kernels wrote
            import torch
            torch.cuda.current_stream().synchronize()
        parent = seq.hashes[lo - 1] if lo else self.fp
        tokens = seq.tokens[lo * PAGE_TOKENS:hi * PAGE_TOKENS]
        self._submit(("chunk", seq.block_table[lo:hi], hashes, parent, tokens), hashes)

    def _submit(self, job, hashes) -> None:
        """Queue a writer job, waiting while the writer is at its bound (back-pressure).
        NOTE: pages become pending only once admitted, so the stash of evicted pending pages
        never exceeds the bound; an idle page evicted during the wait is not copied."""
        nbytes = len(hashes) * self.pages.nbytes
        if not self._writer.admit(nbytes):
            return                                  # closed
        with self._lock:
            for h in hashes:
                self._pending[h] = self._pending.get(h, 0) + 1
        self._writer.submit(job, nbytes)

    def _done(self, hashes) -> None:
        with self._lock:
            for h in hashes:
                left = self._pending.get(h, 0) - 1
                if left > 0:
                    self._pending[h] = left
                else:
                    self._pending.pop(h, None)
                    self._stash.pop(h, None)

    def _on_evict(self, pid: int) -> None:
        """An arena page loses its contents (the pool's lock is held)."""
        h = self.pages.tags.get(pid)
        if h is None:
            return
        self.index.forget(h, pid)
        with self._lock:
            if h in self._pending and h not in self._stash:
                self._stash[h] = self.pages.cpu_bytes(pid).copy()    # the writer is behind
                self.counters["evict_copies"] += 1

    def _bytes(self, pid: int, h: bytes, out: np.ndarray) -> bool:
        """Page `h`'s bytes into `out`: from its arena page, the stash, or the host tier."""
        if self.pages.read_tagged(pid, h, out):
            return True
        with self._lock:
            s = self._stash.get(h)
        if s is None and self.host is not None:
            s = self.host.get(h)
        if s is None:
            return False
        out[:] = s
        return True

    def _run(self, job) -> None:
        """One writer job (on the writer thread)."""
        kind = job[0]
        if kind == "host":
            _, pid, h, parent = job
            try:
                if self.host.put(h, parent, lambda out: self._bytes(pid, h, out)):
                    self._count("host", bytes_written=self.pages.nbytes)
            finally:
                self._done([h])
        elif kind == "chunk":
            _, pids, hashes, parent, tokens = job
            try:
                on_disk = self.disk is None or self.disk.has_chunk(hashes[-1])
                if on_disk and (self.remote is None or self.remote.has(hashes[-1])):
                    return
                bufs = []
                for pid, h in zip(pids, hashes):
                    out = np.empty(self.pages.nbytes, np.uint8)
                    if not self._bytes(pid, h, out):
                        return
                    bufs.append(out)
                if not on_disk and self.disk.write(hashes, parent, tokens, bufs):
                    self._count("disk", bytes_written=len(bufs) * self.pages.nbytes)
                if self.remote is not None and not self.remote.has(hashes[-1]):
                    self._count("server", bytes_written=self.remote.publish(hashes, parent,
                                                                            tokens, bufs))
            finally:
                self._done(hashes)

    def drain(self) -> None:
        """Wait until the writer has done every queued copy and chunk."""
        if self._writer is not None:
            self._writer.drain()

    # --- surface ----------------------------------------------------------------------------
    def clear(self, tiers=TIERS) -> None:
        """Empty the given tiers (default: all). Pages sequences hold stay theirs, unnamed."""
        unknown = set(tiers) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown kv tiers {sorted(unknown)}; known: {', '.join(TIERS)}")
        with self._owner_lock:
            self.drain()
            if "arena" in tiers:
                self.index.clear()
                self.pages.untag_all()
                self.pages.forget_idle()
            if "host" in tiers and self.host is not None:
                self.host.clear()
            if "disk" in tiers and self.disk is not None:
                self.disk.clear()

    def _count(self, tier: str, **kw) -> None:
        with self._lock:
            c = self.tier_counters[tier]
            for k, v in kw.items():
                c[k] += v

    def stats(self) -> dict:
        """The paged pool's figures, plus ``prefix``: lookups, hit and computed tokens,
        per tier hit tokens and bytes read/written (and each lower tier's own figures)."""
        with self._lock:
            prefix = {"enabled": self.prefix, **self.counters,
                      "tiers": {t: dict(c) for t, c in self.tier_counters.items()}}
        prefix["tiers"]["arena"]["pages"] = len(self.index)
        if self.host is not None:
            prefix["tiers"]["host"].update(self.host.stats())
        if self.disk is not None:
            prefix["tiers"]["disk"].update(self.disk.stats())
        prefix["costs"] = self.costs.stats()
        if self._writer is not None:
            prefix["writer"] = self._writer.stats()
        return {**self.pages.stats(), "prefix": prefix}

    def close(self) -> None:
        """Finish every queued write (every full chunk reaches the disk tier), stop the
        writer, keep the measured costs beside the disk tier, drop the host tier. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self.disk is not None:
            self.costs.save()
        if self.host is not None:
            self.host.clear()
        self.pages.on_evict = None
