"""PackReader: open a pack, find its newest intact manifest, read verified blocks."""
from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import PackCorrupt, UnknownTask
from .format import (ALIGN, FOOTER_SIZE, HEADER_SIZE, Footer, block_hash, decode_header)
from .manifest import BlockEntry, Manifest, TensorSpec

log = logging.getLogger(__name__)
_SCAN_CHUNK = 1 << 20


class PackReader:
    """Read-only view of a pack.

    The footer at the end of the file names the newest manifest. If the tail is torn
    (a crash mid-append), the reader walks back over 4 KiB-aligned offsets to the newest
    intact footer and records how many trailing bytes it ignored in ``ignored_tail``.
    Every block read is checked against its content hash.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._open()
        except BaseException:
            os.close(self._fd)
            raise

    def _corrupt(self, msg: str, **where) -> PackCorrupt:
        return PackCorrupt(msg, path=self.path, **where)

    def _open(self) -> None:
        size = os.fstat(self._fd).st_size
        self.file_size = size
        try:
            decode_header(os.pread(self._fd, HEADER_SIZE, 0))
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
            chunk = os.pread(self._fd, pos - lo + 8, lo)
            p = pos
            while p >= lo:
                if chunk[p - lo:p - lo + 8] == b"EDGEFOOT":
                    yield p
                p -= ALIGN
            pos = p

    def _load(self, footer_pos: int) -> None:
        footer = Footer.decode(os.pread(self._fd, FOOTER_SIZE, footer_pos))
        mo, ml = footer.manifest_offset, footer.manifest_length
        if mo < HEADER_SIZE or mo % ALIGN or mo + ml > footer_pos:
            raise ValueError(f"footer points at manifest {mo}+{ml} outside the file")
        raw = os.pread(self._fd, ml, mo)
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

    # --- block reads -----------------------------------------------------------------------
    def read_block(self, idx: int, *, tensor: str | None = None) -> bytes:
        """The verified bytes of block ``idx``."""
        ent = self.manifest.blocks[idx]
        data = os.pread(self._fd, ent.length, ent.offset)
        if len(data) != ent.length:
            raise self._corrupt(f"block truncated: read {len(data)} of {ent.length} bytes",
                                block=idx, offset=ent.offset, tensor=tensor)
        self.check_block(idx, data, tensor=tensor)
        return data

    def check_block(self, idx: int, data, *, tensor: str | None = None) -> None:
        ent = self.manifest.blocks[idx]
        if block_hash(data) != ent.hash:
            raise self._corrupt("block checksum mismatch", block=idx, offset=ent.offset,
                                tensor=tensor)

    def read_tensor(self, task: str, name: str) -> np.ndarray:
        spec = self.task(task).get(name)
        if spec is None:
            raise KeyError(f"task {task!r} has no tensor {name!r}")
        out = np.empty(spec.nbytes, dtype=np.uint8)
        pos = 0
        for b in spec.blocks:
            data = self.read_block(b, tensor=f"{task}/{name}")
            out[pos:pos + len(data)] = np.frombuffer(data, dtype=np.uint8)
            pos += len(data)
        return out.view(spec.np_dtype).reshape(spec.shape)

    def tensor_of_block(self) -> dict[int, str]:
        """block index -> the first "task/tensor" that uses it (for error messages)."""
        owner: dict[int, str] = {}
        for t, specs in self.manifest.tasks.items():
            for n, s in specs.items():
                for b in s.blocks:
                    owner.setdefault(b, f"{t}/{n}")
        return owner

    def verify(self) -> list[str]:
        """Check every block; a list of problems, empty when the pack is clean."""
        problems = []
        if self.ignored_tail:
            problems.append(f"{self.ignored_tail} trailing bytes after the newest intact footer "
                            f"(torn append?); generation {self.generation} is in use")
        owner = self.tensor_of_block()
        for i in range(len(self.manifest.blocks)):
            try:
                self.read_block(i, tensor=owner.get(i))
            except PackCorrupt as e:
                problems.append(str(e))
        return problems

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "PackReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
