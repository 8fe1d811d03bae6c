"""PackWriter: write a new pack (temporary file + rename) or append to an existing one."""
from __future__ import annotations

import fcntl
import logging
import os

import numpy as np

from .format import (ALIGN, DEFAULT_BLOCK_SIZE, FOOTER_SIZE, MAX_ZERO_BLOCK, ZERO_OFFSET, Footer,
                     align_up, block_hash, encode_header)
from .manifest import DTYPES, BlockEntry, Manifest, TensorSpec

log = logging.getLogger(__name__)


class PackWriter:
    """Builds a pack. Identical blocks (same content hash) are stored once; an all-zero
    block of up to ``block_size`` bytes is not stored at all but recorded as a zero block
    (one entry per length), whatever added it.

    A new pack is written to ``PATH.tmp`` and renamed over PATH on close(), so readers
    never see a half-written file. ``PackWriter.append(PATH)`` instead adds blocks and a
    new manifest after the current end of PATH; the new footer is written last, so a
    crash leaves the previous manifest the newest valid one.
    """

    def __init__(self, path, kind: str, block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size <= 0 or block_size % ALIGN:
            raise ValueError(f"block_size {block_size} must be a positive multiple of {ALIGN}")
        self.path = os.fspath(path)
        check_output(self.path)
        self._tmp = self.path + ".tmp"
        self._f = open(self._tmp, "wb")
        self._f.write(encode_header())
        self._pos = ALIGN
        self._m = Manifest(kind=kind, block_size=block_size)
        self._by_hash: dict[bytes, int] = {}
        self._zero: dict[int, int] = {}          # length -> its zero block's index
        self._prev_footer = 0
        self._appending = False
        self._closed = False

    @classmethod
    def append(cls, path) -> "PackWriter":
        from .reader import PackReader
        reader = PackReader(path)
        reader.close()
        self = cls.__new__(cls)
        self.path = os.fspath(path)
        self._tmp = None
        self._f = open(self.path, "r+b")
        try:                 # NOTE: one appender at a time (a CLI append and an update, say)
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            from ..errors import EdgertError
            raise EdgertError(f"{self.path}: another process is appending to it; try again "
                              "when it is done") from None
        # NOTE: drop any torn tail left by an earlier crashed append; the footer we keep is
        # the newest valid one, so nothing committed is lost.
        self._f.truncate(reader.file_end)
        self._pos = reader.file_end
        self._m = reader.manifest
        self._m.generation += 1
        self._by_hash = {b.hash: i for i, b in enumerate(self._m.blocks) if not b.zero}
        self._zero = {b.length: i for i, b in enumerate(self._m.blocks) if b.zero}
        self._prev_footer = reader.footer_offset
        self._appending = True
        self._closed = False
        return self

    # --- properties mirrored from the manifest ---------------------------------------
    @property
    def block_size(self) -> int:
        return self._m.block_size

    @property
    def generation(self) -> int:
        return self._m.generation

    @property
    def config(self) -> dict:
        return self._m.config

    @config.setter
    def config(self, value: dict) -> None:
        self._m.config = dict(value)

    @property
    def sections(self) -> dict[str, bytes]:
        return self._m.sections

    @property
    def tasks(self) -> list[str]:
        return list(self._m.tasks)

    @property
    def block_count(self) -> int:
        return len(self._m.blocks)

    # --- adding content ----------------------------------------------------------------
    def _write_extent(self, data: memoryview) -> int:
        if self._is_zero(data):
            return self._zero_block(len(data))
        h = block_hash(data)
        idx = self._by_hash.get(h)
        if idx is not None and self._m.blocks[idx].length == len(data):
            return idx
        start = align_up(self._pos)
        self._f.seek(self._pos)
        self._f.write(b"\0" * (start - self._pos))
        self._f.write(data)
        self._pos = start + len(data)
        idx = len(self._m.blocks)
        self._m.blocks.append(BlockEntry(h, start, len(data)))
        self._by_hash[h] = idx
        return idx

    def _is_zero(self, data: memoryview) -> bool:
        n = len(data)
        return 0 < n <= min(self._m.block_size, MAX_ZERO_BLOCK) and \
            not np.frombuffer(data, np.uint8).any()

    def _zero_block(self, length: int) -> int:
        idx = self._zero.get(length)
        if idx is None:
            idx = self._zero[length] = len(self._m.blocks)
            self._m.blocks.append(BlockEntry(block_hash(bytes(length)), ZERO_OFFSET, length))
        return idx

    def add_tensor(self, array: np.ndarray, dtype: str | None = None) -> TensorSpec:
        """Cut a tensor's row-major bytes into block_size pieces; returns its spec.

        ``dtype`` overrides the name stored (``"bfloat16"`` for raw uint16 bf16 bits).
        """
        arr = np.asarray(array)
        if not arr.flags.c_contiguous:  # (ascontiguousarray would turn a scalar into [1])
            arr = arr.copy(order="C")
        name = dtype or arr.dtype.name
        if name not in DTYPES or np.dtype(DTYPES[name]).itemsize != arr.dtype.itemsize:
            raise ValueError(f"dtype {name!r} cannot be stored (array dtype {arr.dtype})")
        raw = memoryview(arr.reshape(-1).view(np.uint8))
        bs = self._m.block_size
        refs = tuple(self._write_extent(raw[i:i + bs]) for i in range(0, len(raw), bs))
        return TensorSpec(name, tuple(int(d) for d in arr.shape), refs)

    def add_extent(self, buffer) -> int:
        """Store one extent of any length (e.g. all of an expert's tensors); its block index."""
        return self._write_extent(memoryview(buffer).cast("B"))

    def find(self, h: bytes, length: int) -> BlockEntry | None:
        """The stored entry of a block with hash ``h`` and ``length`` bytes, if any."""
        idx = self._by_hash.get(h)
        ent = None if idx is None else self._m.blocks[idx]
        return ent if ent is not None and ent.length == length else None

    def store_raw(self, data) -> BlockEntry:
        """Store ``data`` as one extent, as it is (no zero-block detection), unless a block
        of that hash and length is stored; its entry. For a manifest built outside the
        writer (`replace_manifest`, edgert/update/graft.py)."""
        data = memoryview(data).cast("B")
        ent = self.find(block_hash(data), len(data))
        if ent is not None:
            return ent
        start = align_up(self._pos)
        self._f.seek(self._pos)
        self._f.write(b"\0" * (start - self._pos))
        self._f.write(data)
        self._pos = start + len(data)
        ent = BlockEntry(block_hash(data), start, len(data))
        self._by_hash[ent.hash] = len(self._m.blocks)
        self._m.blocks.append(ent)
        return ent

    def replace_manifest(self, manifest: Manifest) -> None:
        """Commit ``manifest`` instead of the one built so far; every stored entry in it
        must come from this pack (`find`, `store_raw`)."""
        self._m = manifest

    def add_task(self, name: str, tensors: dict[str, TensorSpec]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("task name must be a non-empty string")
        for tname, spec in tensors.items():
            for r in spec.blocks:
                if r >= len(self._m.blocks):
                    raise ValueError(f"tensor {tname} refers to block {r} not in this pack")
        self._m.tasks[name] = dict(tensors)

    # --- finishing ---------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        raw = self._m.encode()
        moff = align_up(self._pos)
        self._f.seek(self._pos)
        self._f.write(b"\0" * (moff - self._pos))
        self._f.write(raw)
        foff = align_up(moff + len(raw))
        self._f.write(b"\0" * (foff - moff - len(raw)))
        self._f.flush()
        os.fsync(self._f.fileno())  # blocks and manifest are durable before the footer
        footer = Footer(moff, len(raw), block_hash(raw), self._prev_footer, self._m.generation)
        self._f.write(footer.encode())
        assert self._f.tell() == foff + FOOTER_SIZE
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._closed = True
        if not self._appending:
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Give up: a new pack's temporary file is removed; an append leaves PATH as it was
        committed (the torn tail is ignored by readers and cut by the next append)."""
        if self._closed:
            return
        self._f.close()
        self._closed = True
        if not self._appending:
            try:
                os.remove(self._tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "PackWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def check_output(path: str) -> None:
    """An output path a pack can be written to, before anything is written (EdgertError)."""
    from ..errors import EdgertError
    if os.path.isdir(path):
        raise EdgertError(f"output {path} is a directory; name the pack file, e.g. "
                          f"{os.path.join(path, 'model.edgepack')}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise EdgertError(f"output {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EdgertError(f"output {path}: the directory {parent} is not writable")
