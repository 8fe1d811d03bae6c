"""Zero blocks: all-zero blocks are recorded, not stored, and cost a memset instead of a read."""
from __future__ import annotations

import msgpack
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_models import base_weights, mlp, variant
from task_packs import assert_matches, config

import edgert
from edgert.cli import main
from edgert.errors import PackCorrupt
from edgert.experts.api import ResidentExperts
from edgert.pack import PackReader, PackWriter
from edgert.pack.format import ALIGN, Footer, align_up, block_hash
from edgert.pack.manifest import FORMAT, FORMAT_ZERO
from edgert.pack.onnx_import import pack_onnx
from edgert.pack.stats import summary

BS = 4096                   # one block = 4 rows of a [256, 256] float32 matrix
ROWS_PER_BLOCK = BS // (256 * 4)


def _task_weights() -> dict[str, dict[str, np.ndarray]]:
    """dense; pruned (w1 rows 0:64 and w0 rows 0:8 zero); sparser (pruned, and w1 rows
    64:128 zero too): every block that differs pruned -> sparser is a zero block; mixed
    (sparser with another head): dense -> mixed both reads and memsets."""
    dense = variant(base_weights(), seed=100)
    pruned = {k: v.copy() for k, v in dense.items()}
    pruned["w1"][0:64] = 0
    pruned["w0"][0:8] = 0
    sparser = {k: v.copy() for k, v in pruned.items()}
    sparser["w1"][64:128] = 0
    mixed = {k: v.copy() for k, v in sparser.items()}
    mixed["w2"] += 0.05 * np.random.default_rng(5).standard_normal(mixed["w2"].shape,
                                                                     dtype=np.float32)
    return {"dense": dense, "pruned": pruned, "sparser": sparser, "mixed": mixed}


@pytest.fixture(scope="module")
def zpack(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    files = {}
    for name, w in _task_weights().items():
        files[name] = root / f"{name}.onnx"
        onnx.save(mlp(w), str(files[name]))
    pack = root / "z.edgepack"
    pack_onnx(files["dense"], files, pack, block_size=BS)
    x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    ref = {t: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for t, p in files.items()}
    return {"root": root, "files": files, "pack": pack, "x": x, "ref": ref}


def test_pack_records_zero_blocks_and_stores_none(zpack):
    with PackReader(zpack["pack"]) as r:
        zero = [b for b in r.blocks if b.zero]
        assert len(zero) == 1 and zero[0].length == BS   # one entry per length, shared
        assert zero[0].hash == block_hash(bytes(BS))
        stored = [b for b in r.blocks if not b.zero]
        assert all(b.hash != block_hash(bytes(b.length)) for b in stored)
        for t in ("pruned", "sparser"):
            np.testing.assert_array_equal(r.read_tensor(t, "w1"), _task_weights()[t]["w1"])
        assert r.verify() == []
        s = summary(r)
    # pruned: 16 + 2 zero positions; sparser and mixed: 32 + 2 each
    assert s["zero_blocks"] == {"entries": 1, "count": 86, "bytes": 86 * BS}
    assert s["switch_bytes"]["pruned->sparser"] == 0
    assert s["switch_zero_bytes"]["pruned->sparser"] == 64 // ROWS_PER_BLOCK * BS
    assert s["switch_bytes"]["sparser->pruned"] == 64 // ROWS_PER_BLOCK * BS
    assert s["switch_zero_bytes"]["sparser->pruned"] == 0
    assert s["bytes_stored"] == sum(b.length for b in stored)


def test_runtime_switches_equal_ort_and_zero_switch_reads_nothing(zpack):
    rt = edgert.Runtime(config("4 MiB", "8 MiB"))
    m = rt.load(zpack["pack"], task="dense", prepack="off")
    x, ref = zpack["x"], zpack["ref"]
    for t in ("pruned", "dense", "sparser", "pruned"):
        m.switch(t)
        assert_matches(m.run({"x": x})["y"], ref[t])
    # the target: pruned -> sparser differs only in zero blocks, so no storage read at all
    read = m.storage.stats()["bytes_read"]
    filled = m.reader.zero_bytes_filled
    res = m.switch("sparser")
    n = 64 // ROWS_PER_BLOCK
    assert (res.blocks_moved, res.zero_filled, res.zero_bytes) == (n, n, n * BS)
    assert (res.bytes_read, res.reads, res.from_storage, res.from_cache) == (0, 0, 0, 0)
    assert m.storage.stats()["bytes_read"] == read
    assert m.reader.zero_bytes_filled - filled == n * BS
    assert not m.switcher.tensors()["w1"][64:128].any()
    assert_matches(m.run({"x": x})["y"], ref["sparser"])
    st = m.stats()
    assert st["last_switch"]["zero_bytes"] == n * BS and st["last_switch"]["bytes_read"] == 0
    assert st["bytes_zero_filled"] >= n * BS and st["zero_fill"]["bytes"] >= n * BS
    # zero blocks never take a spare slot: neither displaced ones nor prewarmed ones
    m.switch("dense")
    m.prewarm(["pruned", "sparser"])
    assert not m.switcher.cache.contains(block_hash(bytes(BS)))
    m.close()


def test_failed_switch_writes_no_zero_block(zpack, tmp_path):
    """dense -> mixed with a damaged stored block (one only mixed uses): PackCorrupt, and
    dense stays intact (the zero blocks are memset only after every read succeeded)."""
    pack = tmp_path / "bad.edgepack"
    pack.write_bytes(zpack["pack"].read_bytes())
    with PackReader(pack) as r:
        dense = {b for s in r.task("dense").values() for b in s.blocks}
        idx = next(b for b in r.task("mixed")["w2"].blocks if b not in dense)
        assert not r.blocks[idx].zero
        off = r.blocks[idx].offset
    with open(pack, "r+b") as f:
        f.seek(off + 3)
        b = f.read(1)
        f.seek(off + 3)
        f.write(bytes([b[0] ^ 0xFF]))
    rt = edgert.Runtime(config("4 MiB", "8 MiB"))
    m = rt.load(pack, task="dense", prepack="off")       # dense's blocks are all sound
    with pytest.raises(PackCorrupt, match=f"block {idx}"):
        m.switch("mixed")
    assert m.active == "dense"
    assert_matches(m.run({"x": zpack["x"]})["y"], zpack["ref"]["dense"])
    m.close()


def test_pack_with_zero_blocks_is_smaller_on_disk(zpack, tmp_path, monkeypatch):
    files = zpack["files"]
    monkeypatch.setattr(PackWriter, "_is_zero", lambda self, data: False)   # the feature off
    without = tmp_path / "stored-zeros.edgepack"
    pack_onnx(files["dense"], files, without, block_size=BS)
    with PackReader(zpack["pack"]) as a, PackReader(without) as b:
        assert not any(e.zero for e in b.blocks)
        # the one all-zero block the old writer stored once (dedup) is gone from the data region
        assert a.footer.manifest_offset == b.footer.manifest_offset - BS
        assert a.file_size < b.file_size
        for t in a.tasks:
            for n in a.task(t):
                np.testing.assert_array_equal(a.read_tensor(t, n), b.read_tensor(t, n))


def _rewrite_manifest(path, mutate) -> None:
    """Replace the pack's manifest by ``mutate(doc)``'s, with valid checksums and footer, so
    only the manifest's own validation can catch it."""
    with PackReader(path) as r:
        mo, gen, prev = r.footer.manifest_offset, r.generation, r.footer.prev_footer
    data = path.read_bytes()
    doc = msgpack.unpackb(data[mo:mo + r.footer.manifest_length], raw=False)
    mutate(doc)
    raw = msgpack.packb(doc, use_bin_type=True)
    body = data[:mo] + raw
    body += bytes(align_up(len(body)) - len(body))
    path.write_bytes(body + Footer(mo, len(raw), block_hash(raw), prev, gen).encode())


def _zero_index(doc) -> int:
    return next(i for i, b in enumerate(doc["blocks"]) if b[1] == 0)


def _set(field, value):
    def mutate(doc):
        doc["blocks"][_zero_index(doc)][field] = value
    return mutate


@pytest.mark.parametrize("case, mutate, says", [
    ("hash", _set(0, block_hash(b"\1" * BS)), "is not the hash of 4096 zero bytes"),
    ("longer than a block", _set(2, BS + ALIGN), "zero block of 8192 bytes"),
    ("empty", _set(2, 0), "zero block of 0 bytes"),
    ("shorter", _set(2, 100), "is not the hash of 100 zero bytes"),
    ("format 1", lambda doc: doc.update(format=FORMAT), "format-1 manifest"),
])
def test_corrupt_zero_entry_is_pack_corrupt_naming_the_file(zpack, tmp_path, capsys, case,
                                                          mutate, says):
    pack = tmp_path / "z.edgepack"
    pack.write_bytes(zpack["pack"].read_bytes())
    _rewrite_manifest(pack, lambda doc: None)
    PackReader(pack).close()                   # the rewrite itself keeps a sound pack
    _rewrite_manifest(pack, mutate)
    with pytest.raises(PackCorrupt) as e:
        PackReader(pack)
    assert str(pack) in str(e.value) and says in str(e.value), str(e.value)
    assert main(["verify", str(pack)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"FAIL {pack}") and says in err


def test_cli_verify_and_inspect_report_zero_blocks(zpack, capsys):
    assert main(["verify", str(zpack["pack"])]) == 0
    out = capsys.readouterr().out
    assert "1 zero blocks (no data; entries checked)" in out
    assert main(["inspect", str(zpack["pack"])]) == 0
    text = capsys.readouterr().out
    assert "zero blocks: 86 block positions" in text
    assert "bytes a switch memsets (zero blocks)" in text
    assert main(["inspect", str(zpack["pack"]), "--json"]) == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    assert doc["switch_bytes"]["pruned->sparser"] == 0
    assert doc["switch_zero_bytes"]["pruned->sparser"] == 16 * BS


def test_read_into_fills_zero_blocks_without_storage(tmp_path):
    p = tmp_path / "p.edgepack"
    rng = np.random.default_rng(1)
    with PackWriter(p, kind="onnx-tasks", block_size=BS) as w:
        a = rng.standard_normal(3 * BS // 4).astype(np.float32)
        a[BS // 4:BS // 2] = 0                        # block 1 of 3 is zero
        tail = np.zeros(100, np.uint8)                 # a short zero block of its own length
        w.add_task("t", {"a": w.add_tensor(a), "tail": w.add_tensor(tail)})
    with PackReader(p) as r:
        spec = r.task("t")
        zb, tb = spec["a"].blocks[1], spec["tail"].blocks[0]
        assert r.blocks[zb].zero and r.blocks[tb].zero and r.blocks[tb].length == 100
        assert not r.blocks[spec["a"].blocks[0]].zero
        before = r.storage.stats()["bytes_read"]
        views = [np.full(BS, 0xFF, np.uint8), np.full(BS, 0xFF, np.uint8),
                 np.full(200, 0xFF, np.uint8)]          # not padded: exactly [:length] written
        assert r.read_into([zb, zb, tb], views) == (0, 0)
        assert r.storage.stats()["bytes_read"] == before
        assert not views[0].any() and not views[1].any()
        assert not views[2][:100].any() and (views[2][100:] == 0xFF).all()
        assert (r.zero_blocks_filled, r.zero_bytes_filled) == (3, 2 * BS + 100)
        np.testing.assert_array_equal(r.read_tensor("t", "a"), a)
    # an append reuses the zero entry of a length it already has
    w = PackWriter.append(p)
    w.add_task("u", {"z": w.add_tensor(np.zeros(2 * BS, np.uint8))})
    w.close()
    with PackReader(p) as r:
        assert r.task("u")["z"].blocks == (zb, zb)


def test_pack_without_zero_blocks_keeps_format_1(tmp_path):
    p = tmp_path / "p.edgepack"
    with PackWriter(p, kind="onnx-tasks", block_size=BS) as w:
        w.add_task("t", {"a": w.add_tensor(np.arange(2000, dtype=np.float32))})
    with PackReader(p) as r:
        raw = p.read_bytes()[r.footer.manifest_offset:][:r.footer.manifest_length]
    assert msgpack.unpackb(raw)["format"] == FORMAT
    with PackWriter(p, kind="onnx-tasks", block_size=BS) as w:
        w.add_task("t", {"a": w.add_tensor(np.zeros(2000, np.float32))})
    with PackReader(p) as r:
        raw = p.read_bytes()[r.footer.manifest_offset:][:r.footer.manifest_length]
    assert msgpack.unpackb(raw)["format"] == FORMAT_ZERO


def test_expert_extents_that_fit_a_block_are_zero_blocks_too(tmp_path):
    """An MoE pack: an all-zero expert extent no longer than a block is a zero block and
    loads by memset; larger extents are stored (a zero block is at most block_size)."""
    hid, ffn = 4, 6
    extent = 3 * hid * ffn * 4
    tensors, off = {}, 0
    for name, shape in (("gate", [ffn, hid]), ("up", [ffn, hid]), ("down", [hid, ffn])):
        tensors[name] = {"dtype": "float32", "shape": shape, "offset": off}
        off += hid * ffn * 4
    p = tmp_path / "moe.edgepack"
    rng = np.random.default_rng(0)
    with PackWriter(p, kind="moe", block_size=BS) as w:
        w.add_task("model", {"embed": w.add_tensor(np.ones((8, hid), np.float32))})
        live = w.add_extent(rng.standard_normal(extent // 4).astype(np.float32).tobytes())
        dead = w.add_extent(bytes(extent))
        w.sections["experts"] = msgpack.packb(
            {"num_layers": 1, "num_experts": 2, "top_k": 1, "extent_bytes": extent,
             "tensors": tensors, "table": [[0, 0, live], [0, 1, dead]], "moe_layers": [0]})
    with PackReader(p) as r:
        assert r.blocks[dead].zero and not r.blocks[live].zero
        experts = ResidentExperts(r)
        assert experts.bytes_read == align_up(extent)   # the live expert only
        w = experts.acquire(0, [1])[1]
        assert not w.gate.any() and not w.up.any() and not w.down.any()
