"""The resumable half of an update: downloaded blocks, durable, in a file beside the pack.

Why a staging file and not appended-but-uncommitted blocks in the pack itself: the pack's
torn-tail recovery would ignore such blocks, but `edgert verify` reports any bytes after
the newest footer as a problem, and the pack would change under the model serving it.
A staging file keeps the pack exactly as committed until the one append that commits the
update, and every run resumes from what it holds.

``PACK.update-<16 hex of the target manifest hash>``: a magic, then records
``hash (16) | length (u32 le) | bytes``, each batch fsync'd before it counts. On opening,
records are read back and checked against their hash; the first torn or wrong one ends the
file (it is cut there), so a kill at any point loses at most the batch in flight.
Staging files of other targets are read as seeds (their blocks a new target still needs)
and removed once the update commits.
"""
from __future__ import annotations

import glob
import os
import struct

from ..pack.format import HASH_BYTES, block_hash

MAGIC = b"EDGESTG1"
_REC = struct.Struct(f"<{HASH_BYTES}sI")
MAX_BLOCK = 1 << 30


def staging_path(pack: str, target_hash: bytes) -> str:
    return f"{pack}.update-{target_hash[:8].hex()}"


def _read_records(path: str, want: set[bytes] | None, into: dict[bytes, bytes]) -> int:
    """Verified records of ``path`` (those in ``want``, or all) into ``into``; the byte
    offset where the valid records end."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            return 0
        end = len(MAGIC)
        while True:
            head = f.read(_REC.size)
            if len(head) < _REC.size:
                return end
            h, n = _REC.unpack(head)
            if n > MAX_BLOCK:
                return end
            data = f.read(n)
            if len(data) < n or block_hash(data) != h:
                return end
            if want is None or h in want:
                into[h] = data
            end += _REC.size + n


class Staging:
    """Blocks of one target, durable once ``add()`` returns. ``have`` maps hash -> bytes
    (held in memory: an update is the blocks that differ, not the whole model)."""

    def __init__(self, pack: str, target_hash: bytes, needed: set[bytes]):
        self.pack = pack
        self.path = staging_path(pack, target_hash)
        self.have: dict[bytes, bytes] = {}
        self.resumed_bytes = 0
        end = _read_records(self.path, needed, self.have) if os.path.exists(self.path) else 0
        for other in self.others():      # seeds: an older target's blocks this one needs
            _read_records(other, needed - set(self.have), self.have)
        self.resumed_bytes = sum(len(v) for v in self.have.values())
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._f = os.fdopen(fd, "r+b")
        if end == 0:
            self._f.truncate(0)
            self._f.write(MAGIC)
            end = len(MAGIC)
        self._f.truncate(end)            # NOTE: cut a torn record so new ones follow a good one
        self._f.seek(end)
        self._sync()

    def others(self) -> list[str]:
        return [p for p in glob.glob(glob.escape(self.pack) + ".update-*") if p != self.path]

    def add(self, blocks: dict[bytes, bytes]) -> None:
        """Append verified blocks and fsync (the caller checked each hash)."""
        for h, data in blocks.items():
            if h not in self.have:
                self._f.write(_REC.pack(h, len(data)))
                self._f.write(data)
                self.have[h] = data
        self._sync()

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def remove_all(self) -> None:
        """After the commit: this staging file and every older one go."""
        self.close()
        for p in [self.path, *self.others()]:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
