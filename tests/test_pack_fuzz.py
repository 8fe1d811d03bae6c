"""Damaged packs: every mutation must end in PackCorrupt or a clean, correct read."""
import copy
import time
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest

from edgert import PackCorrupt
from edgert.experts.api import ExpertLayout
from edgert.pack import PackReader, PackWriter
from edgert.pack.format import block_hash
from edgert.pack.manifest import BlockEntry, Manifest

CASES = 2500
TIME_CAP_S = 60.0


def _read_all(path):
    """Open and read every tensor of every task; returns {task/tensor: array}."""
    with PackReader(path) as r:
        return {f"{t}/{n}": r.read_tensor(t, n) for t in r.tasks for n in r.task(t)}


def _mutate(data: bytes, rng) -> bytes:
    b = bytearray(data)
    op = rng.integers(0, 6)
    if op == 0:      # flip bits anywhere
        for _ in range(rng.integers(1, 4)):
            i = rng.integers(0, len(b))
            b[i] ^= 1 << rng.integers(0, 8)
    elif op == 1:    # flip bits near the end (footer and manifest)
        i = len(b) - 1 - rng.integers(0, min(len(b), 6000))
        b[i] ^= 0xFF
    elif op == 2:    # truncate
        del b[rng.integers(0, len(b)):]
    elif op == 3:    # extend with random bytes
        b += rng.integers(0, 256, size=rng.integers(1, 9000), dtype=np.uint8).tobytes()
    elif op == 4:    # overwrite a run with zeros
        i = rng.integers(0, len(b))
        b[i:i + rng.integers(1, 5000)] = bytes(min(len(b) - i, 5000))[:len(b[i:i + 5000])]
    else:            # splice: duplicate a random chunk into the file
        i, j = sorted(rng.integers(0, len(b), size=2))
        k = rng.integers(0, len(b))
        b[k:k] = b[i:j]
    return bytes(b)


def test_fuzz_real_pack(pack_path, tmp_path):
    # two generations, so torn tails have somewhere to fall back to
    from edgert.pack import PackWriter as W
    w = W.append(pack_path)
    w.add_task("t3", {"z": w.add_tensor(np.arange(5000, dtype=np.int32))})
    w.close()
    original = pack_path.read_bytes()
    truth = _read_all(pack_path)
    rng = np.random.default_rng(1234)
    target = tmp_path / "fuzz.edgepack"
    start, outcomes = time.monotonic(), {"corrupt": 0, "clean": 0}
    for case in range(CASES):
        target.write_bytes(_mutate(original, rng))
        try:
            got = _read_all(target)
        except PackCorrupt:
            outcomes["corrupt"] += 1
            continue
        # a clean read returns true data: every tensor it shows matches the original's
        for k, v in got.items():
            assert k in truth and np.array_equal(v, truth[k]), f"case {case}: wrong data in {k}"
        outcomes["clean"] += 1
        assert time.monotonic() - start < TIME_CAP_S, "fuzzing is too slow (a hang?)"
    assert outcomes["corrupt"] > CASES // 10 and outcomes["clean"] > 0, outcomes


def test_fuzz_manifest_parser():
    """The manifest decoder alone (past the checksum): ValueError or a valid manifest,
    zero blocks (offset 0, hash of their zeros) included."""
    m = Manifest(kind="onnx-tasks", block_size=4096)
    from edgert.pack.manifest import BlockEntry, TensorSpec
    m.blocks = [BlockEntry(bytes(16), 4096, 4096), BlockEntry(b"\1" * 16, 8192, 100),
                BlockEntry(block_hash(bytes(4096)), 0, 4096),
                BlockEntry(block_hash(bytes(100)), 0, 100)]
    m.tasks = {"t": {"x": TensorSpec("float32", (1024,), (0,)), "y": TensorSpec("int8", (100,), (1,)),
                     "z": TensorSpec("float32", (1024 + 25,), (2, 3))}}
    m.sections = {"s": b"abc"}
    raw = m.encode()
    assert Manifest.decode(raw, data_end=1 << 20).tasks == m.tasks
    rng = np.random.default_rng(7)
    ok = bad = zero_seen = 0
    for _ in range(4000):
        b = bytearray(raw)
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(0, len(b))] = rng.integers(0, 256)
        if rng.random() < 0.2:
            del b[rng.integers(0, len(b)):]
        try:
            got = Manifest.decode(bytes(b), data_end=1 << 20)
        except ValueError:
            bad += 1
            continue
        ok += 1
        for specs in got.tasks.values():  # what validates is internally consistent
            for s in specs.values():
                assert sum(got.blocks[i].length for i in s.blocks) == s.nbytes
        for b in got.blocks:              # a zero block that decodes is what a memset writes
            assert not b.zero or (0 < b.length <= got.block_size
                                  and b.hash == block_hash(bytes(b.length)))
        zero_seen += any(b.zero for b in got.blocks)
    assert bad > 1000 and zero_seen > 100, (bad, zero_seen)


def test_fuzz_zero_block_entries():
    """Block entries and the format field mutated towards zero blocks (offset 0, hashes of
    other zero runs, lengths around block_size): ValueError, or entries a memset serves."""
    m = Manifest(kind="onnx-tasks", block_size=4096)
    m.blocks = [BlockEntry(block_hash(bytes(4096)), 0, 4096), BlockEntry(b"\1" * 16, 4096, 4096),
                BlockEntry(block_hash(bytes(100)), 0, 100)]
    doc = msgpack.unpackb(m.encode(), raw=False)
    odd = [0, 4096, 8192, 100, 4095, 4097, 8192 + 4096, -4096, 1 << 40, 1, 2, True, None,
           block_hash(bytes(100)), block_hash(bytes(4096)), block_hash(bytes(8192)), bytes(16),
           b"\1" * 16, b"\0" * 15]
    rng = np.random.default_rng(13)
    outcomes = {"bad": 0, "ok": 0, "zero": 0}
    for _ in range(3000):
        d = copy.deepcopy(doc)
        for _ in range(rng.integers(1, 3)):
            if rng.random() < 0.1:
                d["format"] = [1, 2, 3, 0, True, 2.0][rng.integers(6)]
            else:
                ent = d["blocks"][rng.integers(len(d["blocks"]))]
                ent[rng.integers(3)] = odd[rng.integers(len(odd))]
        try:
            got = Manifest.decode(msgpack.packb(d, use_bin_type=True), data_end=1 << 20)
        except ValueError:
            outcomes["bad"] += 1
            continue
        outcomes["ok"] += 1
        for b in got.blocks:
            if b.zero:
                outcomes["zero"] += 1
                assert 0 < b.length <= got.block_size and b.hash == block_hash(bytes(b.length))
            else:
                assert b.offset >= 4096 and b.offset % 4096 == 0
    assert outcomes["bad"] > 1500 and outcomes["ok"] > 100 and outcomes["zero"] > 100, outcomes


@pytest.mark.parametrize("where", ["block", "manifest", "footer", "header"])
def test_single_flips_are_named(pack_path, where):
    data = bytearray(pack_path.read_bytes())
    with PackReader(pack_path) as r:
        first = r.blocks[0]
        pos = {"block": first.offset + 10, "manifest": r.footer.manifest_offset + 5,
               "footer": len(data) - 30, "header": 3}[where]
    data[pos] ^= 0x40
    pack_path.write_bytes(bytes(data))
    with pytest.raises(PackCorrupt) as e:
        _read_all(pack_path)
    msg = str(e.value)
    if where == "block":
        assert "block 0" in msg and f"offset {first.offset}" in msg and "tensor t1/a" in msg
    elif where == "header":
        assert "bad magic" in msg
    else:
        assert "no intact footer" in msg


# --- the "experts" section of an MoE pack ----------------------------------------------------
L, E, K, HID, FFN = 3, 4, 2, 4, 6


def _experts_doc(blocks: list[int], dtype="float32") -> dict:
    item = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    tensors, off = {}, 0
    for name, shape in (("gate", [FFN, HID]), ("up", [FFN, HID]), ("down", [HID, FFN])):
        tensors[name] = {"dtype": dtype, "shape": shape, "offset": off}
        off += FFN * HID * item
    table = [[l, e, blocks[l * E + e]] for l in range(L) for e in range(E)]
    return {"num_layers": L, "num_experts": E, "top_k": K, "extent_bytes": off,
            "tensors": tensors, "table": table, "moe_layers": list(range(L))}


def _slots(doc):
    """Every (container, key) in a nested doc, the doc itself first."""
    out, todo = [], [doc]
    while todo:
        node = todo.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node))
        for k in keys:
            out.append((node, k))
            if isinstance(node[k], (dict, list)):
                todo.append(node[k])
    return out


ODD_VALUES = [-1, 0, 1, 2, 5, 1 << 40, -(1 << 40), (1 << 64) - 1, 1.5, True, None, "float32",
              "bfloat16", "int8", "gate", "", b"\0", [], [1, 2], [0, 0, 0], {}, {"a": 1}]


def _mutate_doc(doc: dict, rng) -> bytes:
    doc = copy.deepcopy(doc)
    for _ in range(rng.integers(1, 3)):
        slots = _slots(doc)
        node, k = slots[rng.integers(len(slots))]
        op = rng.integers(0, 5)
        if op == 0:
            node[k] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
        elif op == 1:
            del node[k]
        elif op == 2 and isinstance(node[k], int) and not isinstance(node[k], bool):
            node[k] += int(rng.choice([-1, 1, -7, 1000, 1 << 33]))
        elif op == 3 and isinstance(node[k], list) and node[k]:
            node[k].append(copy.deepcopy(node[k][rng.integers(len(node[k]))]))
        elif isinstance(node, dict):           # rename a key
            odd = [-1, 0, 1.5, None, True, "", "gate", b"\0", f"extra{rng.integers(3)}"]
            node[odd[rng.integers(len(odd))]] = node.pop(k)
    try:
        raw = msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        raw = msgpack.packb({"broken": True})
    if rng.random() < 0.25:                 # and sometimes damage the bytes themselves
        b = bytearray(raw)
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(0, len(b))] = rng.integers(0, 256)
        if rng.random() < 0.3:
            del b[rng.integers(0, len(b)):]
        raw = bytes(b)
    return raw


def _check_layout(reader_like) -> None:
    """What a clean decode promises: a layout whose every block and view is usable."""
    lay = ExpertLayout.from_reader(reader_like)
    blocks = reader_like.manifest.blocks
    assert lay.moe_layers and set(lay.table) == {(l, e) for l in lay.moe_layers
                                                 for e in range(lay.num_experts)}
    assert 1 <= lay.top_k <= lay.num_experts
    for b in lay.table.values():
        assert 0 <= b < len(blocks) and blocks[b].length == lay.extent_bytes
    w = lay.views(np.zeros(lay.extent_bytes, np.uint8))
    assert w.gate.shape == w.up.shape == w.down.shape[::-1]


def test_fuzz_experts_section_decoder():
    """ExpertsSection alone, through Manifest.decode: ValueError or a usable layout."""
    doc = _experts_doc(list(range(L * E)))
    extent = doc["extent_bytes"]
    m = Manifest(kind="moe", block_size=4096)
    m.blocks = [BlockEntry(bytes([i]) * 16, 4096 * (i + 1), extent) for i in range(L * E)]
    m.blocks.append(BlockEntry(b"\xff" * 16, 4096 * (L * E + 1), 100))   # not an expert
    m.sections = {"experts": msgpack.packb(doc, use_bin_type=True)}
    good = Manifest.decode(m.encode(), data_end=1 << 20)
    _check_layout(SimpleNamespace(manifest=good, path="p"))
    rng = np.random.default_rng(11)
    outcomes = {"bad": 0, "ok": 0}
    for case in range(3000):
        m.sections = {"experts": _mutate_doc(doc, rng)}
        try:
            got = Manifest.decode(m.encode(), data_end=1 << 20)
        except ValueError:
            outcomes["bad"] += 1
            continue
        _check_layout(SimpleNamespace(manifest=got, path="p"))
        outcomes["ok"] += 1
    assert outcomes["bad"] > 1500 and outcomes["ok"] > 50, outcomes


def test_moe_pack_needs_its_experts_section():
    m = Manifest(kind="moe", block_size=4096)
    with pytest.raises(ValueError, match="no 'experts' section"):
        Manifest.decode(m.encode(), data_end=1 << 20)


def _write_moe_pack(path, section) -> None:
    """A small MoE pack; `section(expert block indices)` gives its "experts" bytes."""
    rng = np.random.default_rng(0)
    w = PackWriter(path, kind="moe", block_size=4096)
    w.add_task("model", {"embed": w.add_tensor(np.ones((8, HID), np.float32))})
    blocks = [w.add_extent(rng.standard_normal(3 * FFN * HID).astype(np.float32).tobytes())
              for _ in range(L * E)]
    w.sections["experts"] = section(blocks)
    w.close()


def test_fuzz_experts_section_in_a_real_pack(tmp_path):
    """Whole packs with a mutated section: PackCorrupt, or a pack whose every expert reads
    and views cleanly."""
    rng = np.random.default_rng(5)
    path = tmp_path / "moe.edgepack"
    outcomes = {"corrupt": 0, "clean": 0}
    for case in range(150):
        _write_moe_pack(path, lambda blocks: msgpack.packb(_experts_doc(blocks)) if case == 0
                        else _mutate_doc(_experts_doc(blocks), rng))
        try:
            with PackReader(path) as r:
                lay = ExpertLayout.from_reader(r)
                keys = sorted(lay.table)
                views = [np.zeros(lay.slot_bytes, np.uint8) for _ in keys]
                r.read_into([lay.block(*k) for k in keys], views)
                for v in views:
                    lay.views(v)
        except PackCorrupt:
            outcomes["corrupt"] += 1
            continue
        outcomes["clean"] += 1
    assert outcomes["corrupt"] > 50 and outcomes["clean"] > 1, outcomes
