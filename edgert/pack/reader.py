"""PackReader: open a pack, find its newest intact manifest, read verified blocks.

`PackReader.read_into` is the one way bytes move from a pack into memory: blocks adjacent
in the file are coalesced into one scatter read (O_DIRECT straight into the caller's
views when they allow it), extents are read concurrently on the reader's threads, and
every block is checked against its content hash before the call returns. Zero blocks
(nothing stored; their hash was checked against their zeros when the manifest was
opened) are written with a memset and never touch storage.
"""
from __future__ import annotations

import logging
import operator
import os
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..align import ALIGN, align_up
from ..errors import PackCorrupt, UnknownTask
from ..memory.storage import Storage
from .format import FOOTER_SIZE, HEADER_SIZE, Footer, block_hash, decode_header
from .manifest import BlockEntry, Manifest, TensorSpec

log = logging.getLogger(__name__)
_SCAN_CHUNK = 1 << 20
MAX_EXTENT = 1 << 20  # coalesce adjacent blocks up to 1 MiB a read (O_DIRECT peaks near 1 MiB here)
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024
READ_THREADS = 4      # extents in flight: O_DIRECT at queue depth 1 gets ~0.6 GB/s on this
                      # machine's disk, ~2 GB/s with a few reads in flight
VERIFY_BATCH = 16 << 20  # bytes per read_into call of verify()

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


@dataclass
class _Extent:
    """One read: adjacent blocks of the file into their views (``at[i]`` = views index)."""
    offset: int
    at: list[int]
    bufs: list[np.ndarray]


def _read_extent(storage: Storage, ext: _Extent) -> int:
    return storage.readv(ext.offset, ext.bufs)


class _Owned:
    """What a PackReader releases: its read threads, then its storage (the descriptors).
    The finalizer holds this, never the reader. Idempotent."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self.closed:
                raise ValueError("read from a closed PackReader")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="edgert-read")
            return self._pool

    def close(self) -> None:
        with self._lock:
            self.closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)   # no read is in flight when the descriptors close
        self.storage.close()


class PackReader:
    """Read-only view of a pack, and the pack's one verified read path (`read_into`).

    The footer at the end of the file names the newest manifest. If the tail is torn
    (a crash mid-append), the reader walks back over 4 KiB-aligned offsets to the newest
    intact footer and records how many trailing bytes it ignored in ``ignored_tail``.
    The reader owns ``storage`` (O_DIRECT where allowed, see ``read_mode``) and a few
    read threads; ``close()`` (or the reader being collected) releases them.
    """

    def __init__(self, path, read_mode: str = "direct"):
        self.path = os.fspath(path)
        self.storage = Storage(self.path, read_mode)
        self._owned = _Owned(self.storage)
        self._fill_lock = threading.Lock()
        self.zero_blocks_filled = 0     # zero blocks memset by read_into (no storage read)
        self.zero_bytes_filled = 0
        self._finalize = weakref.finalize(self, self._owned.close)
        try:
            st = os.fstat(self.storage.fd)
            self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self._open(st.st_size)
        except BaseException:
            self.close()
            raise

    def _corrupt(self, msg: str, **where) -> PackCorrupt:
        return PackCorrupt(msg, path=self.path, **where)

    def _open(self, size: int) -> None:
        self.file_size = size
        try:
            decode_header(os.pread(self.storage.fd, HEADER_SIZE, 0))
        except ValueError as e:
            raise self._corrupt(f"bad header: {e}", offset=0) from None
        last = size - FOOTER_SIZE
        first_error = None
        if last >= HEADER_SIZE and last % ALIGN == 0:
            try:
                self._load(last)
                self.ignored_tail = 0
                return
            except ValueError as e:
                first_error = str(e)
        # NOTE: the newest footer is missing or damaged: walk back to an older intact one.
        for pos in self._footer_candidates(min(last, size - FOOTER_SIZE)):
            try:
                self._load(pos)
            except ValueError:
                continue
            self.ignored_tail = size - (pos + FOOTER_SIZE)
            log.warning("%s: newest footer unusable (%s); using generation %d at offset %d, "
                        "ignoring %d trailing bytes", self.path, first_error or "torn tail",
                        self.generation, pos, self.ignored_tail)
            return
        raise self._corrupt(f"no intact footer found ({first_error or 'file truncated'})",
                            offset=max(last, 0))

    def _footer_candidates(self, start: int):
        pos = start - start % ALIGN
        while pos >= HEADER_SIZE:
            lo = max(HEADER_SIZE, pos - _SCAN_CHUNK)
            chunk = os.pread(self.storage.fd, pos - lo + 8, lo)
            p = pos
            while p >= lo:
                if chunk[p - lo:p - lo + 8] == b"EDGEFOOT":
                    yield p
                p -= ALIGN
            pos = p

    def _load(self, footer_pos: int) -> None:
        fd = self.storage.fd
        footer = Footer.decode(os.pread(fd, FOOTER_SIZE, footer_pos))
        mo, ml = footer.manifest_offset, footer.manifest_length
        if mo < HEADER_SIZE or mo % ALIGN or mo + ml > footer_pos:
            raise ValueError(f"footer points at manifest {mo}+{ml} outside the file")
        raw = os.pread(fd, ml, mo)
        if len(raw) != ml or block_hash(raw) != footer.manifest_hash:
            raise ValueError(f"manifest at offset {mo} fails its checksum")
        manifest = Manifest.decode(raw, data_end=mo)
        if manifest.generation != footer.generation:
            raise ValueError("manifest generation differs from its footer")
        self.manifest = manifest
        self.footer = footer
        self.footer_offset = footer_pos
        self.file_end = footer_pos + FOOTER_SIZE

    # --- manifest accessors --------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def block_size(self) -> int:
        return self.manifest.block_size

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @property
    def config(self) -> dict:
        return self.manifest.config

    @property
    def sections(self) -> dict[str, bytes]:
        return self.manifest.sections

    @property
    def blocks(self) -> list[BlockEntry]:
        return self.manifest.blocks

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.tasks)

    def task(self, name: str) -> dict[str, TensorSpec]:
        try:
            return self.manifest.tasks[name]
        except (KeyError, TypeError):
            raise UnknownTask(name, self.tasks) from None

    # --- the read path -------------------------------------------------------------------
    def read_into(self, blocks: list[int], views: list[np.ndarray], *,
                  tensors: list[str | None] | None = None) -> tuple[int, int]:
        """Read block ``blocks[i]`` into ``views[i]`` and verify it; (bytes read from storage,
        read syscalls).

        Each view is uint8, C-contiguous, writable and holds at least the block's length.
        When it holds ``align_up(length)`` bytes and starts ALIGN-aligned, the read lands
        in place with O_DIRECT and writes the padding too; otherwise exactly
        ``view[:length]`` is read, buffered. Nothing else in a view is written. Blocks
        adjacent in the file are read with one scatter read; ``blocks`` may be in any
        order and hold an index more than once (each such view gets the verified bytes).
        ``tensors[i]``, when given, names block i's tensor in errors. A zero block is
        written as ``view[:length] = 0`` once every read has succeeded: no storage read,
        not in the bytes returned, counted in ``zero_blocks_filled``/``zero_bytes_filled``.

        A hash mismatch or short read is PackCorrupt naming file, block, offset (and
        tensor); on any failure every read has finished before this raises, so views
        are not written behind the caller's back.
        """
        if len(views) != len(blocks) or (tensors is not None and len(tensors) != len(blocks)):
            raise ValueError(f"{len(blocks)} blocks, {len(views)} views"
                             + ("" if tensors is None else f", {len(tensors)} tensor names"))
        if self._owned.closed:
            raise ValueError("read from a closed PackReader")
        blocks = [operator.index(b) for b in blocks]
        extents, empty, zeros, copies = self._plan(blocks, views)
        nbytes = 0
        if len(extents) <= 1:
            for ext in extents:
                nbytes += self._check_extent(ext, _read_extent(self.storage, ext), blocks,
                                             views, tensors)
        else:
            pool = self._owned.pool()
            with short_gil_turns():
                futures = {pool.submit(_read_extent, self.storage, ext): ext for ext in extents}
                try:
                    # NOTE: reader threads only read; this thread verifies each extent as it
                    # lands. blake3 holds the GIL for block-sized inputs, so hashing on the
                    # reader threads would stall the others' reads.
                    for f in as_completed(futures):
                        nbytes += self._check_extent(futures[f], f.result(), blocks, views,
                                                     tensors)
                except BaseException as e:
                    for f in futures:
                        f.cancel()
                    wait(futures)          # no read lands after this raises
                    for f in futures:      # nothing raised on a reader thread is lost
                        if not f.cancelled() and f.exception() not in (None, e):
                            e.add_note(f"another read failed too: {f.exception()!r}")
                    raise
        for i in empty:
            self._check(blocks[i], views[i][:0], tensors and tensors[i])
        filled = 0
        for i in zeros:                    # NOTE: after the reads, so a failed call writes none
            n = self.manifest.blocks[blocks[i]].length
            views[i][:n] = 0
            filled += n
        if zeros:
            with self._fill_lock:
                self.zero_blocks_filled += len(zeros)
                self.zero_bytes_filled += filled
        for i, j in copies:                # duplicates: the verified bytes of another view
            n = self.manifest.blocks[blocks[i]].length
            views[i][:n] = views[j][:n]
        return nbytes, len(extents)

    def read_block_into(self, idx: int, view: np.ndarray, *,
                        tensor: str | None = None) -> tuple[int, int]:
        """`read_into` for one block."""
        return self.read_into([idx], [view], tensors=None if tensor is None else [tensor])

    def _plan(self, blocks: list[int], views: list[np.ndarray]):
        """Extents to read (file order), views of empty blocks, views of zero blocks, and
        (dup, source) copies."""
        ents = self.manifest.blocks
        padded = []      # per view: True when the read may fill align_up(length)
        for i, (b, v) in enumerate(zip(blocks, views)):
            if not 0 <= b < len(ents):
                raise IndexError(f"block {b} is not in {self.path} ({len(ents)} blocks)")
            n = ents[b].length
            if not (isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 1
                    and v.flags.c_contiguous and v.flags.writeable and len(v) >= n):
                raise ValueError(f"view {i} for block {b} ({n} bytes) is not a writable, "
                                 f"contiguous uint8 array of at least {n} bytes")
            padded.append(len(v) >= align_up(n))
        direct = [p and v.ctypes.data % ALIGN == 0 for p, v in zip(padded, views)]
        zeros = [i for i, b in enumerate(blocks) if ents[b].zero]   # every view: a memset
        source: dict[int, int] = {}        # block -> the view read from the file
        for i, b in enumerate(blocks):     # prefer a view that can take a direct read
            if not ents[b].zero and (b not in source or (direct[i] and not direct[source[b]])):
                source[b] = i
        copies = [(i, source[b]) for i, b in enumerate(blocks)
                  if not ents[b].zero and source[b] != i]
        empty = [i for i in source.values() if ents[blocks[i]].length == 0]
        order = sorted((i for i in source.values() if ents[blocks[i]].length),
                       key=lambda i: ents[blocks[i]].offset)
        extents: list[_Extent] = []
        end, last_kind = -1, None
        for i in order:
            ent = ents[blocks[i]]
            size = align_up(ent.length) if padded[i] else ent.length
            kind = (direct[i], padded[i])
            # NOTE: only padded views coalesce: the next block starts at align_up(end) in
            # the file, and the padding in between must land inside the caller's view.
            if (not extents or not padded[i] or kind != last_kind or ent.offset != end
                    or end - extents[-1].offset + size > MAX_EXTENT
                    or len(extents[-1].at) >= IOV_MAX):
                extents.append(_Extent(ent.offset, [], []))
            extents[-1].at.append(i)
            extents[-1].bufs.append(views[i][:size])
            end, last_kind = ent.offset + size, kind
        return extents, empty, zeros, copies

    def _check_extent(self, ext: _Extent, got: int, blocks, views, tensors) -> int:
        pos = 0
        for i, buf in zip(ext.at, ext.bufs):
            ent = self.manifest.blocks[blocks[i]]
            if got < pos + ent.length:
                raise self._corrupt(f"block truncated: read {max(0, got - pos)} of "
                                    f"{ent.length} bytes", block=blocks[i], offset=ent.offset,
                                    tensor=tensors and tensors[i])
            self._check(blocks[i], views[i][:ent.length], tensors and tensors[i])
            pos += len(buf)
        return got

    def _check(self, idx: int, data, tensor: str | None) -> None:
        ent = self.manifest.blocks[idx]
        if block_hash(data) != ent.hash:
            raise self._corrupt("block checksum mismatch", block=idx, offset=ent.offset,
                                tensor=tensor)

    def check_block(self, idx: int, data, *, tensor: str | None = None) -> None:
        """PackCorrupt unless ``data`` (bytes or a uint8 view) is block ``idx``'s content."""
        self._check(idx, data, tensor)

    def check_unchanged(self) -> None:
        """PackCorrupt when the file at ``path`` is no longer the one this reader opened
        (replaced, truncated, appended to or rewritten): re-open the pack to use it."""
        dev, ino, size, mtime = self._identity
        if self._owned.closed:
            raise ValueError("check_unchanged on a closed PackReader")
        now = os.fstat(self.storage.fd)
        changes = []
        try:
            named = os.stat(self.path)
            if (named.st_dev, named.st_ino) != (dev, ino):
                changes.append("the path now names another file")
        except FileNotFoundError:
            changes.append("the path no longer exists")
        # NOTE: an append (a new version: edgert/update/) keeps every committed byte, so a
        # reader of the old version may go on: the file grew and our footer is intact
        appended = now.st_size > size and self._footer_intact()
        if now.st_size != size and not appended:
            changes.append(f"size {size} -> {now.st_size} bytes")
        if now.st_mtime_ns != mtime and not appended:
            changes.append("modified")
        if changes:
            raise self._corrupt(f"pack file changed since it was opened ({', '.join(changes)}); "
                                "open it again (rt.load) to use the new contents")

    def _footer_intact(self) -> bool:
        try:
            raw = os.pread(self.storage.fd, FOOTER_SIZE, self.footer_offset)
            return Footer.decode(raw) == self.footer
        except (OSError, ValueError):
            return False

    # --- offline tools (verify, inspect) -------------------------------------------------
    def read_block(self, idx: int, *, tensor: str | None = None) -> bytes:
        """The verified bytes of block ``idx`` (a copy; models read with `read_into`)."""
        n = self.manifest.blocks[idx].length
        buf = _aligned_empty(align_up(n))
        self.read_block_into(idx, buf, tensor=tensor)
        return buf[:n].tobytes()

    def read_tensor(self, task: str, name: str) -> np.ndarray:
        spec = self.task(task).get(name)
        if spec is None:
            raise KeyError(f"task {task!r} has no tensor {name!r}")
        lens = [self.manifest.blocks[b].length for b in spec.blocks]
        starts = np.cumsum([0] + lens).tolist()
        out = _aligned_empty(align_up(spec.nbytes))
        # a block's padding may land in the buffer only where nothing else goes
        limits = starts[1:-1] + [len(out)]
        views = [out[s:s + (align_up(n) if s + align_up(n) <= lim else n)]
                 for s, n, lim in zip(starts, lens, limits)]
        self.read_into(list(spec.blocks), views, tensors=[f"{task}/{name}"] * len(views))
        return out[:spec.nbytes].view(spec.np_dtype).reshape(spec.shape)

    def tensor_of_block(self) -> dict[int, str]:
        """block index -> the first "task/tensor" that uses it (for error messages)."""
        owner: dict[int, str] = {}
        for t, specs in self.manifest.tasks.items():
            for n, s in specs.items():
                for b in s.blocks:
                    owner.setdefault(b, f"{t}/{n}")
        lowbit = self.manifest.lowbit
        for scheme, c in (lowbit.copies.items() if lowbit is not None else ()):
            for (l, e), b in c.table.items():
                owner.setdefault(b, f"expert {l}.{e} ({scheme} copy)")
        return owner

    def verify(self) -> list[str]:
        """Check every stored block; a list of problems, empty when the pack is clean.

        Zero blocks have no bytes to read: their entries (length, hash of their zeros)
        were checked when the manifest was opened."""
        problems = []
        if self.ignored_tail:
            problems.append(f"{self.ignored_tail} trailing bytes after the newest intact footer "
                            f"(torn append?); generation {self.generation} is in use")
        owner = self.tensor_of_block()
        batch: list[int] = []
        size = 0
        for i, ent in enumerate(self.manifest.blocks):
            if ent.zero:
                continue
            if batch and size + align_up(ent.length) > VERIFY_BATCH:
                problems += self._verify_batch(batch, owner)
                batch, size = [], 0
            batch.append(i)
            size += align_up(ent.length)
        if batch:
            problems += self._verify_batch(batch, owner)
        return problems

    def _verify_batch(self, batch: list[int], owner: dict[int, str]) -> list[str]:
        lens = [align_up(self.manifest.blocks[b].length) for b in batch]
        buf = _aligned_empty(sum(lens))
        starts = np.cumsum([0] + lens).tolist()
        views = [buf[s:s + n] for s, n in zip(starts, lens)]
        names = [owner.get(b) for b in batch]
        try:
            self.read_into(batch, views, tensors=names)
            return []
        except PackCorrupt:
            pass
        problems = []          # one at a time, to name every bad block of the batch
        for b, v, t in zip(batch, views, names):
            try:
                self.read_block_into(b, v, tensor=t)
            except PackCorrupt as e:
                problems.append(str(e))
        return problems

    def close(self) -> None:
        """Stop the read threads and close the file; idempotent."""
        self._finalize()

    def __enter__(self) -> "PackReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _aligned_empty(n: int) -> np.ndarray:
    """n uninitialised bytes starting ALIGN-aligned (a direct read target)."""
    raw = np.empty(n + ALIGN, np.uint8)
    off = -raw.ctypes.data % ALIGN
    return raw[off:off + n]
