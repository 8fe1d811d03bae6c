"""Storage: O_DIRECT reads on a real disk, the buffered fallback, counters, the page cache.

`pack_path` lives under pytest's tmp_path, on the machine's disk (not tmpfs)."""
import errno
import mmap
import os
import threading

import numpy as np
import pytest

from edgert import PackCorrupt
from edgert.align import ALIGN, align_up
from edgert.memory import Storage
from edgert.pack import PackReader


def aligned(n: int) -> np.ndarray:
    """Page-aligned memory, like an arena slot."""
    return np.frombuffer(mmap.mmap(-1, n), np.uint8)


def direct_storage(path) -> Storage:
    st = Storage(path, "direct")
    if st.mode != "direct":
        reason = st.fallback_reason
        st.close()
        pytest.skip(f"the filesystem holding {path} refuses O_DIRECT ({reason}): "
                    "direct reads are NOT tested here")
    return st


def blocks_of(path):
    data = path.read_bytes()
    with PackReader(path, read_mode="buffered") as r:
        return [(b.offset, b.length, data[b.offset:b.offset + b.length]) for b in r.blocks]


def test_direct_reads_into_aligned_memory(pack_path):
    st = direct_storage(pack_path)
    blocks = [b for b in blocks_of(pack_path) if b[1]]
    for off, n, want in blocks:
        view = aligned(align_up(n))
        st.read_into(off, n, view)
        assert view[:n].tobytes() == want
    # padded reads: the kernel returns whole 4 KiB units
    assert st.bytes_read == sum(align_up(n) for _, n, _ in blocks)
    assert st.reads == len(blocks) and st.mode == "direct"
    st.close()


def test_unaligned_target_is_read_buffered_in_place(pack_path):
    st = direct_storage(pack_path)
    off, n, want = blocks_of(pack_path)[1]
    buf = aligned(n + 2 * ALIGN)
    buf[:] = 0xAB
    out = buf[1:1 + n]                                       # unaligned and unpadded
    st.read_into(off, n, out)
    assert out.tobytes() == want
    assert buf[0] == 0xAB and (buf[1 + n:] == 0xAB).all()    # nothing written outside
    assert st.mode == "direct" and st.bytes_read == n        # buffered read, no fallback
    st.close()


def test_refused_open_falls_back_to_buffered(pack_path, monkeypatch):
    """What tmpfs did before Linux 6.6 (and some overlays still do), simulated: the
    O_DIRECT open fails, reads are buffered and the reason is kept."""
    real = os.open

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a)
    monkeypatch.setattr(os, "open", refusing_open)
    st = Storage(pack_path, "direct")
    monkeypatch.undo()
    assert st.mode == "buffered" and "O_DIRECT" in st.fallback_reason
    off, n, want = blocks_of(pack_path)[0]
    v = aligned(align_up(n))
    st.read_into(off, n, v)
    assert v[:n].tobytes() == want
    st.close()


def test_buffered_mode_never_opens_direct(pack_path):
    st = Storage(pack_path, "buffered")
    assert st.mode == "buffered" and st.fallback_reason == "" and st._fds[1] == -1
    st.close()


def _names(fds):
    out = []
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            out.append(None)
    return out


def test_refused_direct_read_falls_back_without_closing_under_readers(pack_path, monkeypatch):
    """One reader's O_DIRECT read is refused while others read: they all finish on
    descriptors that stay open (and keep naming the pack) until close()."""
    st = direct_storage(pack_path)
    dfd = st._fds[1]
    blocks = [b for b in blocks_of(pack_path) if b[1]]
    real = os.preadv
    refused = threading.Event()

    def preadv(fd, bufs, offset, *flags):
        if fd == dfd and not refused.is_set() and threading.current_thread().name == "t3":
            refused.set()
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset, *flags)
    monkeypatch.setattr(os, "preadv", preadv)
    errors, calls = [], []

    def work():
        try:
            for i in range(200):
                off, n, want = blocks[i % len(blocks)]
                v = aligned(align_up(n))
                st.read_into(off, n, v)
                assert v[:n].tobytes() == want
                calls.append(1)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, name=f"t{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert refused.is_set() and st.mode == "buffered" and "refused" in st.fallback_reason
    assert st._fds[1] == dfd and _names([dfd]) == [str(pack_path)]   # still open
    assert st.reads == len(calls) == 6 * 200                         # no lost counts
    fds = list(st._fds)
    st.close()
    st.close()
    assert str(pack_path) not in _names(fds)


def test_short_read_is_corrupt(pack_path):
    size = os.path.getsize(pack_path)
    st = Storage(pack_path, "buffered")
    with pytest.raises(PackCorrupt, match="short read"):
        st.read_into(size - 100, 4096, np.zeros(4096, np.uint8))
    st.close()


def test_drop_cache_evicts_the_file_from_the_page_cache(pack_path):
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT here: page-cache residency cannot be observed")
    st = Storage(pack_path, "buffered")
    off, n, _ = blocks_of(pack_path)[2]
    probe = bytearray(ALIGN)

    def cached() -> bool:
        try:
            return os.preadv(st.fd, [probe], off, os.RWF_NOWAIT) > 0
        except BlockingIOError:
            return False
    st.read_into(off, n, np.zeros(n, np.uint8))
    assert cached()
    st.drop_cache()
    assert not cached()      # NOTE: the first probe after the drop (a miss starts readahead)
    st.close()
