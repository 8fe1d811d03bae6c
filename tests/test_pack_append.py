"""Appending tasks, and what a crash in the middle of an append leaves behind."""
import os

import numpy as np
import pytest

from edgert import PackCorrupt
from edgert.pack import PackReader, PackWriter


def _append_task(path, name, arr):
    w = PackWriter.append(path)
    w.add_task(name, {"a": w.add_tensor(arr)})
    w.close()


def test_append_keeps_old_tasks_and_blocks(pack_path, tensors):
    committed = pack_path.read_bytes()
    with PackReader(pack_path) as r:
        old_blocks = list(r.blocks)
    new = tensors["a"].copy()
    new[-1] = 7.0
    _append_task(pack_path, "t3", new)
    with PackReader(pack_path) as r:
        assert r.tasks == ["t1", "t2", "t3"] and r.generation == 1
        assert r.blocks[:len(old_blocks)] == old_blocks           # nothing rewritten
        assert len(r.blocks) == len(old_blocks) + 1               # only the changed block is new
        assert np.array_equal(r.read_tensor("t3", "a"), new)
        assert np.array_equal(r.read_tensor("t1", "a"), tensors["a"])
        assert r.verify() == []
    appended = pack_path.read_bytes()
    assert len(appended) > len(committed)
    assert appended[:len(committed)] == committed                 # old bytes, footer included


def test_crash_mid_append_leaves_previous_manifest(pack_path, tensors, tmp_path):
    with open(pack_path, "rb") as f:
        committed = f.read()
    new = tensors["a"] * 2
    _append_task(pack_path, "t3", new)
    with open(pack_path, "rb") as f:
        full = f.read()
    assert full[:len(committed)] == committed                     # append only adds
    # Every prefix between the old end and the new end is a possible crash point.
    cuts = list(range(len(committed), len(full), 997)) + [len(full) - 1, len(full) - 64]
    for cut in cuts:
        torn = tmp_path / "torn.edgepack"
        torn.write_bytes(full[:cut])
        with PackReader(torn) as r:
            assert r.tasks == ["t1", "t2"] and r.generation == 0
            assert r.ignored_tail == cut - len(committed)
            assert np.array_equal(r.read_tensor("t2", "b"), tensors["b"])
            assert (r.verify() != []) == (cut > len(committed))
        # the next append cuts the torn tail and commits cleanly
        _append_task(torn, "t4", tensors["a"] + 1)
        with PackReader(torn) as r:
            assert r.tasks == ["t1", "t2", "t4"] and r.ignored_tail == 0 and r.verify() == []


def test_garbage_after_footer_falls_back(pack_path):
    with open(pack_path, "ab") as f:
        f.write(os.urandom(10000))
    with PackReader(pack_path) as r:
        assert r.tasks == ["t1", "t2"] and r.ignored_tail == 10000


def test_truncated_single_generation_is_corrupt(pack_path):
    data = pack_path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 5000):
        pack_path.write_bytes(data[:cut])
        with pytest.raises(PackCorrupt, match="no intact footer"):
            PackReader(pack_path)
