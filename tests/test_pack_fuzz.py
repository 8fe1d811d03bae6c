"""Damaged packs: every mutation must end in PackCorrupt or a clean, correct read."""
import time

import numpy as np
import pytest

from edgert import PackCorrupt
from edgert.pack import PackReader, PackWriter
from edgert.pack.manifest import Manifest

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
    """The manifest decoder alone (past the checksum): ValueError or a valid manifest."""
    m = Manifest(kind="onnx-tasks", block_size=4096)
    from edgert.pack.manifest import BlockEntry, TensorSpec
    m.blocks = [BlockEntry(bytes(16), 4096, 4096), BlockEntry(b"\1" * 16, 8192, 100)]
    m.tasks = {"t": {"x": TensorSpec("float32", (1024,), (0,)), "y": TensorSpec("int8", (100,), (1,))}}
    m.sections = {"s": b"abc"}
    raw = m.encode()
    assert Manifest.decode(raw, data_end=1 << 20).tasks == m.tasks
    rng = np.random.default_rng(7)
    ok = bad = 0
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
    assert bad > 1000


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
