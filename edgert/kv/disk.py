"""DiskTier: persistent, crash-safe chunk files of KV pages, one directory per model.

A *chunk* is a run of full pages of one prefix chain (``chunk_tokens`` / 16 of them, 16 =
256 tokens by default), in one file named by its last page's hash::

    DIR/<model fingerprint hex>/<last page hash hex>.kvc
    [magic "EDGEKVC1" | u32 header length | blake3(header)[:16] | header (msgpack)]
    padding to 4 KiB, then each page's bytes padded to 4 KiB

The header records the fingerprint, the page hashes, the parent hash of the first page,
the token ids covered, the page size and a blake3 sum of every page. A file is written to
a temporary name (``.NAME.PID.TID.tmp``), fsynced, renamed, and the directory fsynced, so
a crash leaves either the whole file or a temporary one, which the next start-up deletes
once its writer is gone.

At start-up the index is rebuilt from the files' headers (every page hash -> file and
position); a file whose header is damaged, truncated, foreign (another model's
fingerprint) or wrongly named is deleted. A read checks the header again and each page's
sum; a bad file is deleted and the read reports a miss (the caller recomputes). The tier
keeps DIR within its budget, counting every model's files: the least recently used chunk
goes first (file mtimes carry recency across processes), a chunk never before the chunks
that continue it (`PrefixLRU`).
"""
from __future__ import annotations

import heapq
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgpack
import numpy as np

from edgert.align import align_up

from .prefix import HASH_BYTES, PrefixLRU

log = logging.getLogger(__name__)
MAGIC = b"EDGEKVC1"
VERSION = 1
SUFFIX = ".kvc"
_HEAD = struct.Struct("<8sI16s")    # magic, header length, blake3(header)[:16]
MAX_HEADER = 1 << 20                # a header longer than this is damage, not a chunk
MAX_PAGES = 4096


class ChunkError(Exception):
    """A chunk file that must not be used (why in the message)."""


@dataclass
class Chunk:
    path: Path
    hashes: list[bytes]
    parent: bytes
    size: int


def sum_of(b) -> bytes:
    return blake3.blake3(b).digest(HASH_BYTES)


class DiskTier:
    name = "disk"

    def __init__(self, root, fingerprint: bytes, budget: int, page_nbytes: int):
        self.root = Path(root)
        self.fp = fingerprint
        self.dir = self.root / fingerprint.hex()
        self.budget = int(budget)
        self.page_nbytes = int(page_nbytes)
        self.stride = align_up(page_nbytes)
        self._lock = threading.Lock()
        self._chunks: dict[bytes, Chunk] = {}            # name (last page hash) -> chunk
        self._pages: dict[bytes, tuple[bytes, int]] = {}  # page hash -> (chunk name, index)
        self._order = PrefixLRU()
        self._others: list[tuple[int, str, int]] = []      # other models' (mtime, path, size)
        self.bytes_used = 0
        self.others_bytes = 0
        self.deleted_bad = 0
        self.deleted_tmp = 0
        self.evictions = 0
        self.writes = 0
        if not os.access(self._existing_ancestor(), os.W_OK):
            raise PermissionError(f"{self.dir}: not writable")
        self._scan()        # NOTE: nothing is created until the first chunk is written

    def _existing_ancestor(self) -> Path:
        p = self.dir
        while not p.exists() and p != p.parent:
            p = p.parent
        return p

    # --- start-up: the index from the files -----------------------------------------------
    def _scan(self) -> None:
        if not self.dir.is_dir():
            return
        for sub in self.root.iterdir():
            if sub == self.dir or not sub.is_dir():
                continue
            for f in sub.glob("*" + SUFFIX):
                try:
                    st = f.stat()
                except OSError:
                    continue
                self._others.append((st.st_mtime_ns, str(f), st.st_size))
                self.others_bytes += st.st_size
        heapq.heapify(self._others)
        for f in sorted(self.dir.iterdir()):
            name = f.name
            if name.endswith(".tmp"):
                if not _writer_alive(name):
                    _unlink(f)
                    self.deleted_tmp += 1
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                chunk = self._load_header(f)[0]
                mtime = f.stat().st_mtime_ns
            except ChunkError as e:
                log.warning("kv disk tier: deleting %s: %s", f, e)
                _unlink(f)
                self.deleted_bad += 1
                continue
            except OSError:
                continue
            self._index(chunk, mtime)
        with self._lock:
            self._make_room(0)

    def _index(self, chunk: Chunk, tick: int | None = None) -> None:
        name = chunk.hashes[-1]
        self._chunks[name] = chunk
        for i, h in enumerate(chunk.hashes):
            self._pages[h] = (name, i)
        self._order.add(name, chunk.parent, tick)
        self.bytes_used += chunk.size

    def _unindex(self, name: bytes) -> Chunk | None:
        chunk = self._chunks.pop(name, None)
        if chunk is None:
            return None
        for h in chunk.hashes:
            if self._pages.get(h, (None,))[0] == name:
                del self._pages[h]
        self._order.remove(name)
        self.bytes_used -= chunk.size
        return chunk

    def _load_header(self, path: Path, fd: int | None = None) -> tuple[Chunk, dict, int]:
        """(chunk, header, data offset) after every check that does not read the pages."""
        own = fd is None
        if own:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise
            except OSError as e:
                raise ChunkError(f"cannot open: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 4096, 0)
            if len(head) < _HEAD.size:
                raise ChunkError("truncated header")
            magic, hlen, hsum = _HEAD.unpack_from(head)
            if magic != MAGIC:
                raise ChunkError("not a chunk file (magic)")
            if hlen > MAX_HEADER:
                raise ChunkError("header length out of range")
            if _HEAD.size + hlen > len(head):
                head += os.pread(fd, _HEAD.size + hlen - len(head), len(head))
            raw = head[_HEAD.size:_HEAD.size + hlen]
            if len(raw) < hlen:
                raise ChunkError("truncated header")
            if sum_of(raw) != hsum:
                raise ChunkError("header checksum mismatch")
        finally:
            if own:
                os.close(fd)
        try:
            hdr = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as e:
            raise ChunkError(f"header does not decode: {e}") from None
        chunk = self._check_header(path, hdr)
        data_off = align_up(_HEAD.size + hlen)
        expect = data_off + len(chunk.hashes) * self.stride
        if size != expect:
            raise ChunkError(f"{'truncated' if size < expect else 'oversized'}: {size} bytes, "
                             f"header says {expect}")
        chunk.size = size
        return chunk, hdr, data_off

    def _check_header(self, path: Path, hdr) -> Chunk:
        if not isinstance(hdr, dict) or hdr.get("v") != VERSION:
            raise ChunkError("unknown header version")
        if hdr.get("fp") != self.fp:
            raise ChunkError("foreign chunk (another model's fingerprint)")
        hashes, sums, parent = hdr.get("hashes"), hdr.get("sums"), hdr.get("parent")
        n = len(hashes) if isinstance(hashes, list) else 0
        if not 1 <= n <= MAX_PAGES or not isinstance(sums, list) or len(sums) != n or \
                any(not isinstance(x, bytes) or len(x) != HASH_BYTES for x in hashes + sums) \
                or not isinstance(parent, bytes) or len(parent) != HASH_BYTES:
            raise ChunkError("malformed header")
        if hdr.get("page_nbytes") != self.page_nbytes:
            raise ChunkError(f"page size {hdr.get('page_nbytes')} != {self.page_nbytes}")
        tokens = hdr.get("tokens")
        if not isinstance(tokens, bytes) or len(tokens) % (4 * n):
            raise ChunkError("malformed token ids")
        if path.name != hashes[-1].hex() + SUFFIX:
            raise ChunkError("wrongly named (the name is not its last page's hash)")
        return Chunk(path, hashes, parent, 0)

    # --- lookups ---------------------------------------------------------------------------
    def run(self, hashes) -> list[tuple[bytes, int, int]]:
        """The longest run of `hashes` held here, as (chunk name, first index, count)."""
        out, k = [], 0
        with self._lock:
            while k < len(hashes):
                loc = self._pages.get(hashes[k])
                if loc is None:
                    break
                name, i = loc
                c = 1
                while k + c < len(hashes) and self._pages.get(hashes[k + c]) == (name, i + c):
                    c += 1
                out.append((name, i, c))
                k += c
        return out

    def has_chunk(self, name: bytes) -> bool:
        return name in self._chunks

    def read(self, name: bytes, first: int, hashes, tokens, outs) -> bool:
        """Read pages first .. first+len(outs)-1 of chunk `name` into `outs` (uint8 arrays
        of the page size), checking the header, the page hashes and token ids expected
        and each page's sum. False (the file deleted if it is bad) when anything is off."""
        chunk = self._chunks.get(name)
        if chunk is None:
            return False
        try:
            fd = os.open(chunk.path, os.O_RDONLY)
        except OSError:                         # evicted by another process meanwhile
            self._forget(name, delete=False)
            return False
        try:
            _, hdr, data_off = self._load_header(chunk.path, fd)
            n = len(outs)
            if hdr["hashes"][first:first + n] != list(hashes):
                raise ChunkError("page hashes differ from the index")
            width = len(hdr["tokens"]) // len(hdr["hashes"])          # bytes per page
            want = np.asarray(tokens, np.uint32).astype("<u4").tobytes()
            if hdr["tokens"][first * width:(first + n) * width] != want:
                raise ChunkError("token ids differ from the prompt's")
            pad = np.empty(self.stride - self.page_nbytes, np.uint8)
            bufs = []
            for o in outs:
                bufs += [o, pad] if pad.size else [o]
            got = os.preadv(fd, bufs, data_off + first * self.stride)
            if got < n * self.stride - pad.size:
                raise ChunkError("short read")
            for i, o in enumerate(outs):
                if sum_of(o) != hdr["sums"][first + i]:
                    raise ChunkError(f"page {first + i} fails its checksum")
        except ChunkError as e:
            log.warning("kv disk tier: deleting %s: %s", chunk.path, e)
            self.deleted_bad += 1
            self._forget(name, delete=True)
            return False
        except OSError as e:
            log.warning("kv disk tier: cannot read %s: %s", chunk.path, e)
            return False
        finally:
            os.close(fd)
        return True

    def touch(self, names) -> None:
        """Mark chunks used, in the order given (a chain's last chunk first); the files'
        mtimes carry it to the next process."""
        with self._lock:
            for name in names:
                chunk = self._chunks.get(name)
                if chunk is None:
                    continue
                tick = self._order.touch(name)
                try:
                    os.utime(chunk.path, ns=(tick, tick))
                except OSError:
                    pass

    # --- writes ----------------------------------------------------------------------------
    def write(self, hashes: list[bytes], parent: bytes, tokens, pages) -> bool:
        """Write one chunk (pages: uint8 arrays of the page size); True when it is on disk."""
        name = hashes[-1]
        n = len(hashes)
        hdr = msgpack.packb({
            "v": VERSION, "fp": self.fp, "hashes": list(hashes), "parent": parent,
            "tokens": np.asarray(tokens, np.uint32).astype("<u4").tobytes(),
            "page_nbytes": self.page_nbytes, "sums": [sum_of(p) for p in pages]},
            use_bin_type=True)
        data_off = align_up(_HEAD.size + len(hdr))
        size = data_off + n * self.stride
        with self._lock:
            if name in self._chunks:
                self._order.touch(name)
                return True
            if not self._make_room(size):
                return False
        buf = np.zeros(size, np.uint8)
        head = _HEAD.pack(MAGIC, len(hdr), sum_of(hdr)) + hdr
        buf[:len(head)] = np.frombuffer(head, np.uint8)
        for i, p in enumerate(pages):
            o = data_off + i * self.stride
            buf[o:o + self.page_nbytes] = p
        final = self.dir / (name.hex() + SUFFIX)
        tmp = self.dir / f".{name.hex()}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view, done = memoryview(buf), 0
                while done < size:
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        except OSError as e:
            log.warning("kv disk tier: cannot write %s: %s", final, e)
            _unlink(tmp)
            return False
        with self._lock:
            if name not in self._chunks:
                self._index(Chunk(final, list(hashes), parent, size))
                self.writes += 1
                self._make_room(0)
        return True

    def _make_room(self, need: int) -> bool:
        """Delete chunks (least recently used leaves, other models' files by age) until
        `need` more bytes fit the budget. Under the lock."""
        if need > self.budget:
            return False
        while self.bytes_used + self.others_bytes + need > self.budget:
            own = self._order.peek()
            other = self._others[0] if self._others else None
            if own is None and other is None:
                return False
            if other is not None and (own is None or other[0] < own[0]):
                heapq.heappop(self._others)
                self.others_bytes -= other[2]
                _unlink(Path(other[1]))
            else:
                self._forget(own[1], delete=True, locked=True)
            self.evictions += 1
        return True

    def _forget(self, name: bytes, delete: bool, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                return self._forget(name, delete, locked=True)
        chunk = self._unindex(name)
        if chunk is not None and delete:
            _unlink(chunk.path)

    def clear(self) -> None:
        """Delete every chunk of this model."""
        with self._lock:
            for name in list(self._chunks):
                self._forget(name, delete=True, locked=True)
            self._order.clear()

    def stats(self) -> dict:
        with self._lock:
            return {"budget": self.budget, "bytes_used": self.bytes_used,
                    "others_bytes": self.others_bytes, "chunks": len(self._chunks),
                    "pages": len(self._pages), "writes": self.writes,
                    "evictions": self.evictions, "deleted_bad": self.deleted_bad,
                    "deleted_tmp": self.deleted_tmp, "dir": str(self.dir)}


def _writer_alive(tmp_name: str) -> bool:
    """Is the process that named this temporary file (.NAME.PID.TID.tmp) still running?"""
    try:
        pid = int(tmp_name.split(".")[2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("kv disk tier: cannot delete %s: %s", p, e)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
