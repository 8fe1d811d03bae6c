"""Storage: positioned reads of one pack file into caller memory, O_DIRECT when allowed.

O_DIRECT bypasses the page cache, so a read costs what the device costs and the page
cache does not hold a second copy of the weights outside the budget. It needs the file
offset, the length and the buffer address aligned (`edgert.align.ALIGN`). Packs align
every extent; arena slots are page aligned. A read whose buffers are not aligned is
buffered (never bounced through a hidden buffer). Where the filesystem refuses O_DIRECT
(tmpfs, some overlays) every read is buffered and the reason is logged once.

Verification is not done here: `PackReader.read_into` is the one verified read path.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import weakref

import numpy as np

from ..align import ALIGN, align_up
from ..errors import PackCorrupt

log = logging.getLogger(__name__)
READ_MODES = ("direct", "buffered")


def _close_fds(fds: list[int]) -> None:
    for i, fd in enumerate(fds):
        if fd >= 0:
            os.close(fd)
            fds[i] = -1


def _direct_ok(b: np.ndarray) -> bool:
    return len(b) % ALIGN == 0 and b.ctypes.data % ALIGN == 0


class Storage:
    """One pack file open for reading: a buffered descriptor, and an O_DIRECT one when asked
    for and allowed. Safe to call from several threads at once.

    NOTE: both descriptors stay open until `close()`. Falling back to buffered reads (an
    O_DIRECT read refused) only clears a flag under the lock: reader threads may be inside
    a read on the direct descriptor, and a closed descriptor number can be handed to the
    next open() of any file in the process while they are.
    """

    def __init__(self, path, read_mode: str = "direct"):
        if read_mode not in READ_MODES:
            raise ValueError(f"read_mode must be one of {READ_MODES}, got {read_mode!r}")
        self.path = os.fspath(path)
        self.requested = read_mode
        self.fallback_reason = ""
        self._lock = threading.Lock()   # guards the mode switch and the counters
        self.bytes_read = 0             # bytes the read syscalls returned (padding included)
        self.reads = 0                  # read syscalls
        self._fds = [os.open(self.path, os.O_RDONLY), -1]   # [buffered, direct]
        self._finalize = weakref.finalize(self, _close_fds, self._fds)
        self._direct = False
        if read_mode == "direct":
            self._open_direct()

    def _open_direct(self) -> None:
        if not hasattr(os, "O_DIRECT"):
            return self._fall_back("this platform has no O_DIRECT")
        try:
            self._fds[1] = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            return self._fall_back(f"open with O_DIRECT failed: {e.strerror}")
        a, b = os.fstat(self._fds[0]), os.fstat(self._fds[1])
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            return self._fall_back("the file was replaced while it was being opened")
        self._direct = True

    def _fall_back(self, reason: str) -> None:
        with self._lock:
            if self.fallback_reason:
                return                  # another reader already switched
            self._direct = False
            self.fallback_reason = reason
        log.warning("%s: buffered reads instead of O_DIRECT: %s", self.path, reason)

    @property
    def mode(self) -> str:
        return "direct" if self._direct else "buffered"

    @property
    def fd(self) -> int:
        """The buffered descriptor (-1 once closed)."""
        return self._fds[0]

    def readv(self, offset: int, bufs: list[np.ndarray]) -> int:
        """One positioned read (preadv) of the file range at ``offset`` into ``bufs`` (uint8,
        C-contiguous, writable), in order. Returns the bytes read: fewer than asked at the end
        of the file. With O_DIRECT when the offset and every buffer's address and length are
        ALIGN-aligned, buffered otherwise."""
        mvs = [memoryview(b) for b in bufs]
        got = -1
        if self._direct and offset % ALIGN == 0 and all(_direct_ok(b) for b in bufs):
            try:
                got = os.preadv(self._fds[1], mvs, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back(f"O_DIRECT read refused: {e.strerror}")
        if got < 0:
            got = os.preadv(self._fds[0], mvs, offset)
        with self._lock:
            self.bytes_read += got
            self.reads += 1
        return got

    def read_into(self, offset: int, length: int, out: np.ndarray) -> None:
        """Read ``length`` bytes at ``offset`` into ``out`` (uint8). When ``out`` holds
        align_up(length) bytes and starts aligned, the padded read lands in place (O_DIRECT);
        otherwise exactly ``out[:length]`` is read, buffered. Unverified: use
        `PackReader.read_into` for pack blocks."""
        if length == 0:
            return
        if len(out) < length:
            raise ValueError(f"buffer of {len(out)} bytes cannot hold {length}")
        padded = align_up(length)
        buf = out[:padded] if len(out) >= padded and out.ctypes.data % ALIGN == 0 else out[:length]
        got = self.readv(offset, [buf])
        if got < length:
            raise PackCorrupt(f"short read: {got} of {length} bytes", path=self.path,
                              offset=offset)

    def drop_cache(self) -> None:
        """Ask the kernel to drop this file's cached pages (cold buffered reads)."""
        os.posix_fadvise(self._fds[0], 0, 0, os.POSIX_FADV_DONTNEED)

    def stats(self) -> dict:
        with self._lock:
            return {"mode": self.mode, "requested": self.requested,
                    "fallback_reason": self.fallback_reason, "bytes_read": self.bytes_read,
                    "reads": self.reads}

    def close(self) -> None:
        """Close both descriptors; idempotent. No read may be in flight (callers that read
        on threads stop them first, as `PackReader.close` does)."""
        with self._lock:
            self._finalize()
