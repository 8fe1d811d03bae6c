import os
import shutil

import numpy as np
import pytest

from edgert import PackCorrupt
from edgert.memory import Arena, Storage
from edgert.pack import PackReader
from conftest import small_config


def _direct_supported(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


def _slot(size=8192):
    p = Arena(small_config()).pool("weights")
    p.carve(size)
    return p.view(p.alloc(1)[0])


def test_direct_reads_into_slots(pack_path):
    st = Storage(pack_path, "direct")
    assert st.mode == ("direct" if _direct_supported(pack_path) else "buffered")
    with PackReader(pack_path) as r:
        for i, ent in enumerate(r.blocks):
            view = _slot()
            st.read_into(ent.offset, ent.length, view)
            r.check_block(i, view[:ent.length])
        assert st.bytes_read == sum(b.length for b in r.blocks) and st.reads == len(r.blocks)


def test_unaligned_target_uses_bounce_buffer(pack_path):
    st = Storage(pack_path, "direct")
    with PackReader(pack_path) as r:
        ent = r.blocks[1]
        out = np.zeros(ent.length + 1, np.uint8)[1:]         # unaligned, unpadded
        st.read_into(ent.offset, ent.length, out)
        assert out.tobytes() == r.read_block(1)


def test_buffered_mode_and_fallback(pack_path):
    st = Storage(pack_path, "buffered")
    assert st.mode == "buffered" and st.fallback_reason == ""
    if os.path.isdir("/dev/shm"):                            # tmpfs refuses O_DIRECT
        shm = f"/dev/shm/edgert-test-{os.getpid()}.edgepack"
        shutil.copy(pack_path, shm)
        try:
            st = Storage(shm, "direct")
            if not _direct_supported(shm):
                assert st.mode == "buffered" and "O_DIRECT" in st.fallback_reason
            with PackReader(shm) as r:
                v = _slot()
                st.read_into(r.blocks[0].offset, r.blocks[0].length, v)
                r.check_block(0, v[:r.blocks[0].length])
        finally:
            os.remove(shm)


def test_short_read_is_corrupt(pack_path):
    size = os.path.getsize(pack_path)
    st = Storage(pack_path, "buffered")
    with pytest.raises(PackCorrupt, match="short read"):
        st.read_into(size - 100, 4096, np.zeros(4096, np.uint8))


def test_drop_cache_runs(pack_path):
    Storage(pack_path, "buffered").drop_cache()
