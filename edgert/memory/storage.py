"""Storage: positioned reads of pack extents into arena slots, with O_DIRECT when allowed.

O_DIRECT bypasses the page cache, so a read costs what the device costs and the page
cache does not hold a second copy of the weights outside the budget. It needs the file
offset, the length and the buffer address aligned (4 KiB here, which covers 512-byte
and 4 KiB logical sectors). Packs align every extent; arena slots are page aligned.
Where the filesystem refuses O_DIRECT (tmpfs, some overlays) reads fall back to
buffered I/O and the reason is logged once.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import threading

import numpy as np

from ..errors import PackCorrupt

log = logging.getLogger(__name__)
ALIGN = 4096


def _align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Storage:
    def __init__(self, path, read_mode: str = "direct"):
        self.path = os.fspath(path)
        self.requested = read_mode
        self.fallback_reason = ""
        self._fd = os.open(self.path, os.O_RDONLY)
        self._dfd = -1
        if read_mode == "direct":
            if not hasattr(os, "O_DIRECT"):
                self._fall_back("this platform has no O_DIRECT")
            else:
                try:
                    self._dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:
                    self._fall_back(f"open with O_DIRECT failed: {e.strerror}")
        self._lock = threading.Lock()  # read_into may be called from several reader threads
        self.bytes_read = 0
        self.reads = 0

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        log.warning("%s: buffered reads instead of O_DIRECT: %s", self.path, reason)

    @property
    def mode(self) -> str:
        return "direct" if self._dfd >= 0 else "buffered"

    def read_into(self, offset: int, length: int, out: np.ndarray) -> None:
        """Read ``length`` bytes at ``offset`` into ``out[:length]`` (a uint8 array).

        With O_DIRECT the read is padded up to 4 KiB; ``out`` should hold the padded
        length and start 4 KiB-aligned (arena slots do), else a bounce buffer is used.
        """
        if length == 0:
            return
        if self._dfd >= 0 and offset % ALIGN == 0:
            padded = _align_up(length)
            if len(out) >= padded and out.ctypes.data % ALIGN == 0:
                target = out[:padded]
            else:
                # per call, so concurrent readers never share it
                target = np.frombuffer(mmap.mmap(-1, padded), dtype=np.uint8, count=padded)
            try:
                got = os.preadv(self._dfd, [memoryview(target)], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back(f"O_DIRECT read refused: {e.strerror}")
                return self.read_into(offset, length, out)
            if got < length:
                raise PackCorrupt(f"short read: {got} of {length} bytes", path=self.path,
                                  offset=offset)
            if target.ctypes.data != out.ctypes.data:
                out[:length] = target[:length]
        else:
            got = os.preadv(self._fd, [memoryview(out[:length])], offset)
            if got < length:
                raise PackCorrupt(f"short read: {got} of {length} bytes", path=self.path,
                                  offset=offset)
        with self._lock:
            self.bytes_read += length
            self.reads += 1

    def read_scatter(self, offset: int, views: list[np.ndarray]) -> int:
        """One positioned read of a contiguous file range into several buffers (preadv).

        Used to pull a run of adjacent pack blocks into scattered arena positions with one
        syscall. With O_DIRECT every view must start 4 KiB-aligned and hold a multiple of
        4 KiB (padded block positions do); otherwise the read is buffered. Returns the
        bytes requested (the sum of the views' lengths).
        """
        total = sum(len(v) for v in views)
        direct = (self._dfd >= 0 and offset % ALIGN == 0 and
                  all(len(v) % ALIGN == 0 and v.ctypes.data % ALIGN == 0 for v in views))
        fd = self._dfd if direct else self._fd
        try:
            got = os.preadv(fd, [memoryview(v) for v in views], offset)
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            self._fall_back(f"O_DIRECT read refused: {e.strerror}")
            return self.read_scatter(offset, views)
        # NOTE: the last view may run past the end of the file's data (block padding at
        # the very end of the data region is followed by the manifest, so this is rare);
        # callers verify every block's hash, which catches any short read.
        with self._lock:
            self.bytes_read += got
            self.reads += 1
        return total

    def drop_cache(self) -> None:
        """Ask the kernel to drop this file's cached pages (cold buffered reads)."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def stats(self) -> dict:
        return {"mode": self.mode, "requested": self.requested,
                "fallback_reason": self.fallback_reason, "bytes_read": self.bytes_read,
                "reads": self.reads}

    def close(self) -> None:
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
