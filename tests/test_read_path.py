"""PackReader.read_into, the one verified read path: real files on disk, real O_DIRECT."""
import gc
import mmap
import os
import threading
import time

import numpy as np
import pytest

from edgert import PackCorrupt
from edgert.align import ALIGN, align_up
from edgert.pack import PackReader, PackWriter
from edgert.pack import reader as reader_mod

EXTENT_LENGTHS = [100, 4096, 5000, 8192, 12345, 1, 70000, 4095]


@pytest.fixture
def pack(tmp_path):
    """16 full 4 KiB tensor blocks, then extents of assorted lengths; all adjacent."""
    rng = np.random.default_rng(3)
    p = tmp_path / "read.edgepack"        # tmp_path is on the machine's disk, not tmpfs
    with PackWriter(p, kind="onnx-tasks", block_size=4096) as w:
        w.add_task("t", {"a": w.add_tensor(rng.standard_normal(16 * 1024).astype(np.float32))})
        for n in EXTENT_LENGTHS:
            w.add_extent(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    return p


def truth(path):
    """Block contents straight from the file, unverified."""
    data = path.read_bytes()
    with PackReader(path, read_mode="buffered") as r:
        return [data[b.offset:b.offset + b.length] for b in r.blocks]


def aligned(n: int) -> np.ndarray:
    """n bytes of page-aligned memory (an anonymous mapping, like an arena slot)."""
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.uint8)[:n]


def open_direct(path) -> PackReader:
    r = PackReader(path, read_mode="direct")
    if r.storage.mode != "direct":
        reason = r.storage.fallback_reason
        r.close()
        pytest.skip(f"the filesystem holding {path} refuses O_DIRECT ({reason}): "
                    "direct reads are NOT tested here")
    return r


def padded_views(r, blocks):
    return [aligned(align_up(r.blocks[b].length)) for b in blocks]


def cached(path, offset: int) -> bool:
    """Whether the page at `offset` is in the page cache (a no-wait buffered read).
    NOTE: a miss starts readahead, so only the first probe after a drop tells the truth."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(ALIGN)], offset, os.RWF_NOWAIT) > 0
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_direct_reads_land_in_place_and_bypass_the_page_cache(pack):
    want = truth(pack)
    with open_direct(pack) as r:
        r.storage.drop_cache()
        blocks = list(range(len(r.blocks)))
        views = padded_views(r, blocks)
        before = r.storage.stats()
        nbytes, reads = r.read_into(blocks, views)
        assert reads == 1                                  # every block is adjacent: one preadv
        assert [v[:len(t)].tobytes() for v, t in zip(views, want)] == want
        after = r.storage.stats()
        assert after["mode"] == "direct" and after["reads"] - before["reads"] == reads
        assert after["bytes_read"] - before["bytes_read"] == nbytes
        assert nbytes == r.blocks[-1].offset + align_up(r.blocks[-1].length) - r.blocks[0].offset
        assert not cached(pack, r.blocks[10].offset)                # O_DIRECT, really
    with PackReader(pack, read_mode="buffered") as r:                   # the probe's control
        r.storage.drop_cache()
        r.read_into(blocks, padded_views(r, blocks))
        assert cached(pack, r.blocks[10].offset)


def test_coalescing_follows_file_adjacency_not_call_order(pack, monkeypatch):
    want = truth(pack)
    with open_direct(pack) as r:
        n = len(r.blocks)
        rng = np.random.default_rng(0)
        for blocks, runs in ([list(range(16)), 1], [[0, 1, 2, 5, 6, 9], 3],
                             [[9, 6, 5, 2, 1, 0], 3], [[0, 2, 4, 6], 4]):
            views = padded_views(r, blocks)
            assert r.read_into(blocks, views)[1] == runs, blocks
            assert all(v[:len(want[b])].tobytes() == want[b] for b, v in zip(blocks, views))
        shuffled = rng.permutation(n).tolist()
        assert r.read_into(shuffled, padded_views(r, shuffled))[1] == 1
        monkeypatch.setattr(reader_mod, "MAX_EXTENT", 4 * ALIGN)
        assert r.read_into(list(range(16)), padded_views(r, range(16)))[1] == 4
        monkeypatch.setattr(reader_mod, "MAX_EXTENT", 1 << 20)
        monkeypatch.setattr(reader_mod, "IOV_MAX", 3)
        assert r.read_into(list(range(16)), padded_views(r, range(16)))[1] == 6


def test_scattered_views_inside_one_buffer(pack):
    """Blocks land at arbitrary (padded, aligned) positions of one run, in reverse order."""
    want = truth(pack)
    with open_direct(pack) as r:
        blocks = list(range(len(r.blocks)))
        pos, at = 0, []
        for b in reversed(blocks):
            at.append(pos)
            pos += align_up(r.blocks[b].length) + 2 * ALIGN     # gaps stay untouched
        run = aligned(pos)
        run[:] = 0xAB
        views = [run[o:o + align_up(r.blocks[b].length)] for o, b in zip(at, reversed(blocks))]
        r.read_into(list(reversed(blocks)), views)
        for o, b in zip(at, reversed(blocks)):
            n = align_up(r.blocks[b].length)
            assert run[o:o + len(want[b])].tobytes() == want[b]
            assert not run[o + len(want[b]):o + n].any()         # the file's zero padding
            assert (run[o + n:o + n + 2 * ALIGN] == 0xAB).all()


@pytest.mark.parametrize("shape", ["unaligned", "unpadded"])
def test_views_that_cannot_take_a_direct_read_are_read_buffered(pack, shape):
    """No bounce buffer: the read lands in the caller's memory, and only in view[:length]."""
    want = truth(pack)
    with open_direct(pack) as r:
        blocks = [b for b in range(len(r.blocks))
                  if shape == "unaligned" or r.blocks[b].length % ALIGN]
        bufs, views = [], []
        for b in blocks:
            n = r.blocks[b].length
            buf = aligned(align_up(n) + 2 * ALIGN)
            buf[:] = 0xAB
            v = buf[1:1 + align_up(n)] if shape == "unaligned" else buf[ALIGN:ALIGN + n]
            assert shape == "unaligned" or n % ALIGN      # an unpadded view
            bufs.append(buf)
            views.append(v)
        nbytes, reads = r.read_into(blocks, views)
        assert r.storage.mode == "direct"
        for b, buf, v in zip(blocks, bufs, views):
            n = len(want[b])
            assert v[:n].tobytes() == want[b]
            start = v.ctypes.data - buf.ctypes.data
            end = start + (align_up(n) if shape == "unaligned" else n)
            assert (buf[:start] == 0xAB).all() and (buf[end:] == 0xAB).all()
        # padded views still coalesce (buffered); unpadded ones are a read each
        assert reads == (1 if shape == "unaligned" else len(blocks))


def test_duplicate_blocks_fill_every_view(pack):
    want = truth(pack)
    with open_direct(pack) as r:
        blocks = [3, 17, 3, 5, 3, 17]
        views = padded_views(r, blocks)
        views[0] = np.zeros(r.blocks[3].length + 7, np.uint8)[7:]   # unaligned copy target
        r.read_into(blocks, views)
        assert all(v[:len(want[b])].tobytes() == want[b] for b, v in zip(blocks, views))


def corrupt(path, block: int, at: int = 10):
    with PackReader(path, read_mode="buffered") as r:
        off = r.blocks[block].offset
    with open(path, "r+b") as f:
        f.seek(off + at)
        c = f.read(1)
        f.seek(off + at)
        f.write(bytes([c[0] ^ 0x5A]))
    return off


def test_corrupt_block_is_named_and_waits_for_reads_in_flight(pack, monkeypatch):
    off = corrupt(pack, 18)
    with open_direct(pack) as r:
        blocks = [0, 2, 4, 6, 8, 18, 10, 12, 14]           # 9 separate extents
        started, finished = [], []
        real = r.storage.readv

        def slow_readv(offset, bufs):
            started.append(offset)
            if offset != off:
                time.sleep(0.05)
            got = real(offset, bufs)
            finished.append(offset)
            return got
        monkeypatch.setattr(r.storage, "readv", slow_readv)
        names = [f"x/{b}" for b in blocks]
        with pytest.raises(PackCorrupt) as e:
            r.read_into(blocks, padded_views(r, blocks), tensors=names)
        assert sorted(started) == sorted(finished)           # nothing still reading
        assert e.value.block == 18 and e.value.offset == off
        msg = str(e.value)
        assert "block 18" in msg and f"offset {off}" in msg and "tensor x/18" in msg
        assert str(pack) in msg and "checksum" in msg
        monkeypatch.undo()
        good = [b for b in blocks if b != 18]
        r.read_into(good, padded_views(r, good))              # the rest still reads clean


def test_errors_raised_on_reader_threads_are_all_reported(pack, monkeypatch):
    with open_direct(pack) as r:
        bad = {r.blocks[4].offset: "first", r.blocks[12].offset: "second"}
        real = r.storage.readv
        both = threading.Barrier(2, timeout=10)     # both failures are in flight at once

        def failing_readv(offset, bufs):
            if offset in bad:
                both.wait()
                raise OSError(5, f"injected I/O error ({bad[offset]})")
            return real(offset, bufs)
        monkeypatch.setattr(r.storage, "readv", failing_readv)
        blocks = [0, 4, 8, 12]
        with pytest.raises(OSError) as e:
            r.read_into(blocks, padded_views(r, blocks))
        told = str(e.value) + " ".join(getattr(e.value, "__notes__", []))
        assert "first" in told and "second" in told


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_file_truncated_while_open(pack, mode):
    with (open_direct(pack) if mode == "direct" else PackReader(pack, read_mode=mode)) as r:
        victim = 22                                          # the 70000-byte extent
        ent = r.blocks[victim]
        os.truncate(pack, ent.offset + 1000)
        with pytest.raises(PackCorrupt, match="truncated") as e:
            r.read_into(list(range(len(r.blocks))), padded_views(r, range(len(r.blocks))))
        assert e.value.block == victim and e.value.offset == ent.offset
        with pytest.raises(PackCorrupt, match="changed since it was opened"):
            r.check_unchanged()


def _age(path):
    """Set mtime far in the past, so any later write is seen whatever the clock's tick."""
    os.utime(path, ns=(10**18, 10**18))


def test_append_keeps_an_open_reader_usable(pack):
    """A new version appended (edgert/update/) leaves the old version's bytes as they were:
    a reader of it goes on (a served model keeps serving until it is reloaded)."""
    _age(pack)
    with PackReader(pack) as r:
        want = [r.read_block(i) for i in range(len(r.blocks))]
        w = PackWriter.append(pack)
        w.add_task("t2", {"a": w.add_tensor(np.ones(10, np.float32))})
        w.close()
        r.check_unchanged()
        assert [r.read_block(i) for i in range(len(r.blocks))] == want
        with open(pack, "r+b") as f:                         # the old footer overwritten
            f.seek(r.footer_offset)
            f.write(b"\0" * 8)
        with pytest.raises(PackCorrupt, match="changed since it was opened"):
            r.check_unchanged()


@pytest.mark.parametrize("change", ["overwrite", "truncate", "replace", "remove"])
def test_check_unchanged(pack, tmp_path, change):
    _age(pack)
    with PackReader(pack) as r:
        r.check_unchanged()                                  # nothing happened yet
        if change == "overwrite":                            # same size, new bytes
            corrupt(pack, 2)
        elif change == "truncate":
            os.truncate(pack, os.path.getsize(pack) - 64)
        elif change == "replace":
            other = tmp_path / "other.edgepack"
            other.write_bytes(pack.read_bytes())
            os.replace(other, pack)
        else:
            os.remove(pack)
        with pytest.raises(PackCorrupt, match=r"^pack file changed since it was opened \(") as e:
            r.check_unchanged()
        assert str(pack) in str(e.value)


def test_concurrent_read_into_from_several_threads(pack):
    want = truth(pack)
    with open_direct(pack) as r:
        before = r.storage.stats()
        totals, errors = [], []

        def work(seed):
            rng = np.random.default_rng(seed)
            nb = nr = 0
            try:
                for _ in range(30):
                    blocks = rng.choice(len(r.blocks), size=rng.integers(1, 12)).tolist()
                    views = padded_views(r, blocks)
                    b_, r_ = r.read_into(blocks, views)
                    nb, nr = nb + b_, nr + r_
                    for b, v in zip(blocks, views):
                        assert v[:len(want[b])].tobytes() == want[b]
            except BaseException as e:   # noqa: BLE001  (reported below)
                errors.append(e)
            totals.append((nb, nr))
        threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        after = r.storage.stats()
        assert after["bytes_read"] - before["bytes_read"] == sum(t[0] for t in totals)
        assert after["reads"] - before["reads"] == sum(t[1] for t in totals)


def _fd_names(fds):
    out = []
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def test_close_is_idempotent_and_releases_files_and_threads(pack):
    r = PackReader(pack)
    r.read_into([0, 4, 8], padded_views(r, [0, 4, 8]))     # starts the read threads
    pool = r._owned._pool
    assert pool is not None
    fds = list(r.storage._fds)
    r.close()
    r.close()
    assert str(pack) not in _fd_names(fds)
    assert all(not t.is_alive() for t in pool._threads)
    with pytest.raises(ValueError, match="closed"):
        r.read_into([0], padded_views(r, [0]))
    with PackReader(pack) as r2:
        pass
    r2.close()


def test_a_dropped_reader_closes_itself(pack):
    r = PackReader(pack)
    r.read_into([0, 4], padded_views(r, [0, 4]))
    fds = list(r.storage._fds)
    del r
    gc.collect()
    assert str(pack) not in _fd_names(fds)


def test_bad_arguments(pack):
    with PackReader(pack) as r:
        with pytest.raises(ValueError, match="2 blocks, 1 views"):
            r.read_into([0, 1], [aligned(ALIGN)])
        with pytest.raises(ValueError, match="at least"):
            r.read_into([0], [aligned(100)])
        with pytest.raises(IndexError):
            r.read_into([len(r.blocks)], [aligned(ALIGN)])
        with pytest.raises(ValueError, match="uint8"):
            r.read_into([0], [np.zeros(ALIGN, np.float32)])


def test_offline_tools_share_the_verified_path(pack):
    want = truth(pack)
    with PackReader(pack) as r:
        assert [r.read_block(i) for i in range(len(r.blocks))] == want
        assert r.verify() == []
    corrupt(pack, 3)
    corrupt(pack, 19)
    with PackReader(pack) as r:
        problems = r.verify()
        assert len(problems) == 2 and "block 3" in problems[0] and "block 19" in problems[1]
        assert "tensor t/a" in problems[0]
        with pytest.raises(PackCorrupt, match="block 3"):
            r.read_tensor("t", "a")
