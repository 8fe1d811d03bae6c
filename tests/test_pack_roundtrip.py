import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgert import PackCorrupt, UnknownTask
from edgert.pack import PackReader, PackWriter
from edgert.pack.format import ALIGN, HEADER_SIZE

DTYPES = ["float32", "float16", "float64", "int8", "int32", "int64", "uint8", "bool", "bfloat16"]


def _array(rng, dtype, shape):
    if dtype == "bfloat16":
        return rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-100, 100, size=shape).astype(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), block_pages=st.integers(1, 4),
       specs=st.lists(st.tuples(st.sampled_from(DTYPES),
                                st.lists(st.integers(0, 40), min_size=0, max_size=3)),
                      min_size=1, max_size=5))
def test_round_trip(tmp_path, seed, block_pages, specs):
    rng = np.random.default_rng(seed)
    arrays = {f"t{i}": (dt, _array(rng, dt, tuple(shape))) for i, (dt, shape) in enumerate(specs)}
    path = tmp_path / f"r{seed}.edgepack"
    with PackWriter(path, kind="onnx-tasks", block_size=ALIGN * block_pages) as w:
        w.add_task("only", {n: w.add_tensor(a, dtype="bfloat16" if dt == "bfloat16" else None)
                            for n, (dt, a) in arrays.items()})
    with PackReader(path) as r:
        assert r.tasks == ["only"] and r.block_size == ALIGN * block_pages
        for n, (dt, a) in arrays.items():
            spec = r.task("only")[n]
            assert spec.dtype == dt and spec.shape == a.shape
            got = r.read_tensor("only", n)
            assert got.dtype == a.dtype and np.array_equal(got, a)
        for b in r.blocks:  # every stored extent is aligned and inside the data region
            assert b.length <= r.block_size
            if b.zero:      # a zero block stores nothing (offset 0 marks it)
                assert b.offset == 0 and b.length > 0
                continue
            assert b.offset % ALIGN == 0 and b.offset >= HEADER_SIZE
        assert r.verify() == []


def test_dedup_and_metadata(pack_path, tensors):
    with PackReader(pack_path) as r:
        t1, t2 = r.task("t1"), r.task("t2")
        # identical tensors share every block; the all-zero tensor is one block, stored once
        assert t1["b"].blocks == t2["b"].blocks
        assert len(set(t1["c"].blocks)) == 1
        # t2's "a" differs only in its first block
        assert t1["a"].blocks[1:] == t2["a"].blocks[1:] and t1["a"].blocks[0] != t2["a"].blocks[0]
        distinct = {b.hash for b in r.blocks}
        assert len(distinct) == len(r.blocks)
        assert r.config == {"note": "test"} and r.sections["extra"] == b"\x01\x02"
        assert np.array_equal(r.read_tensor("t1", "a"), tensors["a"])


def test_unknown_task_lists_known(pack_path):
    with PackReader(pack_path) as r:
        with pytest.raises(UnknownTask, match="t1, t2"):
            r.task("nope")


def test_writer_is_atomic(tmp_path):
    p = tmp_path / "x.edgepack"
    with pytest.raises(RuntimeError):
        with PackWriter(p, kind="onnx-tasks", block_size=4096) as w:
            w.add_tensor(np.ones(10, np.float32))
            raise RuntimeError("interrupted")
    assert not p.exists() and not (tmp_path / "x.edgepack.tmp").exists()


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        PackWriter(tmp_path / "x", kind="onnx-tasks", block_size=1000)
    with PackWriter(tmp_path / "y", kind="onnx-tasks", block_size=4096) as w:
        with pytest.raises(ValueError, match="cannot be stored"):
            w.add_tensor(np.array(["a"]))
        with pytest.raises(ValueError, match="cannot be stored"):
            w.add_tensor(np.ones(3, np.float32), dtype="bfloat16")


def test_not_a_pack(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"hello" * 2000)
    with pytest.raises(PackCorrupt, match="bad magic"):
        PackReader(p)
    p.write_bytes(b"")
    with pytest.raises(PackCorrupt, match="shorter than the pack header"):
        PackReader(p)
