"""DiskTier: persistent, crash-safe chunk files of KV pages, one directory per model.

A *chunk* is a run of full pages of one prefix chain (``chunk_tokens`` / 16 of them, 16 =
256 tokens by default), in one file named by its last page's hash::

    DIR/<model fingerprint hex>/<last page hash hex>.kvc
    [magic "EDGEKVC1" | u32 header length | blake3(header)[:16] | header (msgpack)]
    padding to 4 KiB, then each page's bytes padded to 4 KiB

The header records the fingerprint, the page hashes, the parent hash of the first page,
the token ids covered, the page size and a blake3 sum of every page. A file is written to
a temporary name (``.NAME.PID.TID.tmp``, created at full size under DIR's lock: it reserves
the chunk's bytes), fsynced, renamed, and the directory fsynced, so
a crash leaves either the whole file or a temporary one, which the next scan of DIR (any
process's next write or start-up) deletes once its writer is gone.

At start-up the index is rebuilt from the files' headers (every page hash -> file and
position); a file whose header is damaged, truncated, foreign (another model's
fingerprint) or wrongly named is deleted. A read checks the header again and each page's
sum; a bad file is deleted and the read reports a miss (the caller recomputes), as does a
chunk another process deleted. DIR has one budget whichever processes and models use it
(`ChunkDir`: one lock, every model's files counted under it): before each write the
least recently used chunk goes first (file mtimes carry recency across processes), a
chunk of this model never before the chunks that continue it (`PrefixLRU`), other files
by age.
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

from .chunkdir import SUFFIX, ChunkDir, fsync_dir, tmp_name, unlink
from .prefix import HASH_BYTES, PrefixLRU

log = logging.getLogger(__name__)
MAGIC = b"EDGEKVC1"
VERSION = 1
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
        self.shelf = ChunkDir(self.root)
        self.bytes_used = 0         # this tier's indexed chunks
        self.others_bytes = 0       # every other file under root, at the last scan
        self.reserved_bytes = 0     # live writers' temporary files, at the last scan
        self.deleted_bad = 0
        self.deleted_tmp = 0
        self.evictions = 0
        self.writes = 0
        if not os.access(self._existing_ancestor(), os.W_OK):
            raise PermissionError(f"{self.dir}: not writable")
        self._scan()        # NOTE: nothing but DIR/.lock is created until the first chunk

    def _existing_ancestor(self) -> Path:
        p = self.dir
        while not p.exists() and p != p.parent:
            p = p.parent
        return p

    # --- start-up: the index from the files -----------------------------------------------
    def _scan(self) -> None:
        if self.dir.is_dir():
            for f in sorted(self.dir.iterdir()):
                if not f.name.endswith(SUFFIX):
                    continue
                try:
                    chunk = self._load_header(f)[0]
                    mtime = f.stat().st_mtime_ns
                except ChunkError as e:
                    log.warning("kv disk tier: deleting %s: %s", f, e)
                    unlink(f)
                    self.deleted_bad += 1
                    continue
                except OSError:
                    continue
                self._index(chunk, mtime)
        if self.root.is_dir():     # other models' files count before this one writes
            with self.shelf.locked():
                self._settle(0)

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
        with self._lock:
            if name in self._chunks:
                self._order.touch(name)
                return True
        buf = chunk_bytes(self.fp, hashes, parent, tokens, pages, self.page_nbytes)
        size = buf.size
        if size > self.budget:
            return False
        final = self.dir / (name.hex() + SUFFIX)
        tmp = self.dir / tmp_name(name.hex())
        fd = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self.shelf.locked():
                if self._adopt(final):
                    return True
                if not self._settle(size):
                    return False
                fd = self.shelf.reserve(tmp, size)
            try:
                view, done = memoryview(buf), 0
                while done < size:
                    done += os.pwrite(fd, view[done:], done)
                os.fsync(fd)
            finally:
                os.close(fd)
            with self.shelf.locked():   # NOTE: a scan never sees a rename half done
                os.replace(tmp, final)
                self.shelf.done(tmp)
            fsync_dir(self.dir)
        except OSError as e:
            log.warning("kv disk tier: cannot write %s: %s", final, e)
            if fd is not None:
                self.shelf.done(tmp, remove=True)
            return False
        with self._lock:
            if name not in self._chunks:
                self._index(Chunk(final, list(hashes), parent, size))
                self.writes += 1
            tick = self._order.tick(name)
        try:                # the same recency for every process (file times are coarse)
            os.utime(final, ns=(tick, tick))
        except OSError:
            pass
        return True

    def _adopt(self, path: Path) -> bool:
        """Index chunk file `path` another process of this model wrote (True), or delete it
        when it is bad. Under the directory's lock."""
        try:
            chunk = self._load_header(path)[0]
        except ChunkError as e:
            log.warning("kv disk tier: deleting %s: %s", path, e)
            unlink(path)
            with self._lock:
                self.deleted_bad += 1
            return False
        except OSError:             # absent (the usual case) or unreadable: write it anew
            return False
        with self._lock:
            if chunk.hashes[-1] not in self._chunks:
                self._index(chunk)
            tick = self._order.touch(chunk.hashes[-1])
        try:
            os.utime(path, ns=(tick, tick))
        except OSError:
            pass
        return True

    def _settle(self, need: int) -> bool:
        """Count every file under root; forget this model's chunks another process deleted;
        delete chunks (least recently used leaves of this model, other files by age) until
        `need` more bytes fit the budget. Under the directory's lock."""
        files, reserved, dead = self.shelf.scan()
        with self._lock:
            self.deleted_tmp += dead
            self.reserved_bytes = reserved
            mine, others, model = {}, [], self.dir.name
            for f in files:
                name = _chunk_name(f.path) if f.model == model else None
                if name in self._chunks:
                    mine[name] = f.mtime
                else:
                    others.append(f)
            for name in [n for n in self._chunks if n not in mine]:
                self._unindex(name)            # deleted elsewhere: a miss from now on
            for name, mtime in mine.items():   # used by another process of this model
                if mtime > self._order.tick(name):
                    self._order.touch(name, mtime)
            heapq.heapify(others)              # DirFile: (mtime, path, size, model)
            self.others_bytes = sum(o.size for o in others)
            while self.bytes_used + self.others_bytes + reserved + need > self.budget:
                own = self._order.peek()
                other = others[0] if others else None
                if own is None and other is None:
                    return False            # live writers' reservations fill the budget
                if other is not None and (own is None or other.mtime < own[0]):
                    heapq.heappop(others)
                    self.others_bytes -= other.size
                    unlink(Path(other.path))
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
            unlink(chunk.path)

    def clear(self) -> None:
        """Delete every chunk of this model (other processes' of it too)."""
        with self._lock:
            for name in list(self._chunks):
                self._forget(name, delete=True, locked=True)
            self._order.clear()
        for f in self.dir.glob("*" + SUFFIX):
            unlink(f)

    def stats(self) -> dict:
        with self._lock:
            return {"budget": self.budget, "bytes_used": self.bytes_used,
                    "others_bytes": self.others_bytes,
                    "reserved_bytes": self.reserved_bytes, "chunks": len(self._chunks),
                    "pages": len(self._pages), "writes": self.writes,
                    "evictions": self.evictions, "deleted_bad": self.deleted_bad,
                    "deleted_tmp": self.deleted_tmp, "dir": str(self.dir)}


def chunk_bytes(fp: bytes, hashes: list[bytes], parent: bytes, tokens, pages,
                page_nbytes: int) -> np.ndarray:
    """One chunk in the file format above (the fleet server stores the same bytes)."""
    n, stride = len(hashes), align_up(page_nbytes)
    hdr = msgpack.packb({
        "v": VERSION, "fp": fp, "hashes": list(hashes), "parent": parent,
        "tokens": np.asarray(tokens, np.uint32).astype("<u4").tobytes(),
        "page_nbytes": page_nbytes, "sums": [sum_of(p) for p in pages]}, use_bin_type=True)
    data_off = align_up(_HEAD.size + len(hdr))
    buf = np.zeros(data_off + n * stride, np.uint8)
    head = _HEAD.pack(MAGIC, len(hdr), sum_of(hdr)) + hdr
    buf[:len(head)] = np.frombuffer(head, np.uint8)
    for i, p in enumerate(pages):
        o = data_off + i * stride
        buf[o:o + page_nbytes] = p
    return buf


def check_chunk(raw, fp: bytes, page_nbytes: int, hashes: list[bytes], parent: bytes,
                tokens) -> list[memoryview]:
    """The pages of a whole chunk received from elsewhere, after every check: format, header
    sum, fingerprint, page size, the page hashes, parent and token ids the caller expects,
    length, and each page's sum. ChunkError says what is wrong."""
    raw = memoryview(raw).cast("B")
    if len(raw) < _HEAD.size:
        raise ChunkError("truncated header")
    magic, hlen, hsum = _HEAD.unpack_from(raw)
    if magic != MAGIC or hlen > MAX_HEADER or _HEAD.size + hlen > len(raw):
        raise ChunkError("not a chunk (magic or header length)")
    hraw = bytes(raw[_HEAD.size:_HEAD.size + hlen])
    if sum_of(hraw) != hsum:
        raise ChunkError("header checksum mismatch")
    try:
        hdr = msgpack.unpackb(hraw, raw=False, strict_map_key=True)
    except Exception as e:
        raise ChunkError(f"header does not decode: {e}") from None
    if not isinstance(hdr, dict) or hdr.get("v") != VERSION:
        raise ChunkError("unknown header version")
    if hdr.get("fp") != fp:
        raise ChunkError("foreign chunk (another model's fingerprint)")
    if hdr.get("page_nbytes") != page_nbytes:
        raise ChunkError(f"page size {hdr.get('page_nbytes')} != {page_nbytes}")
    if hdr.get("hashes") != list(hashes) or hdr.get("parent") != parent:
        raise ChunkError("page names differ from the prompt's")
    want = np.asarray(tokens, np.uint32).astype("<u4").tobytes()
    if hdr.get("tokens") != want:
        raise ChunkError("token ids differ from the prompt's")
    sums = hdr.get("sums")
    if not isinstance(sums, list) or len(sums) != len(hashes):
        raise ChunkError("malformed header")
    stride = align_up(page_nbytes)
    data_off = align_up(_HEAD.size + hlen)
    if len(raw) != data_off + len(hashes) * stride:
        raise ChunkError(f"{len(raw)} bytes; the header says {data_off + len(hashes) * stride}")
    pages = [raw[data_off + i * stride:data_off + i * stride + page_nbytes]
             for i in range(len(hashes))]
    for i, (p, want_sum) in enumerate(zip(pages, sums)):
        if sum_of(p) != want_sum:
            raise ChunkError(f"page {i} fails its checksum")
    return pages


def _chunk_name(path: str) -> bytes | None:
    try:
        return bytes.fromhex(os.path.basename(path)[:-len(SUFFIX)])
    except ValueError:
        return None
