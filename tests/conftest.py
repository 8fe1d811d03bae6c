import numpy as np
import pytest

from edgert.config import DeviceConfig, parse_bytes
from edgert.pack import PackWriter


def small_config(weights="1 MiB", experts="1 MiB", kv="256 KiB", total="4 MiB", **kw):
    """An arena of weights + experts + kv bytes (experts and kv are also the caps), the
    rest of ``total`` the engine allowance."""
    size = {k: parse_bytes(v, k) for k, v in
            {"weights": weights, "experts": experts, "kv": kv, "total": total}.items()}
    engine = size["total"] - size["weights"] - size["experts"] - size["kv"]
    doc = {"name": "test", "memory": {"total": size["total"], "engine": engine,
                                      "experts": size["experts"], "kv": size["kv"]}}
    doc.update(kw)
    return DeviceConfig.from_dict(doc)


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    return {
        "a": rng.standard_normal((64, 100)).astype(np.float32),       # 25600 B: 7 blocks of 4 KiB
        "b": rng.integers(-5, 5, size=(3000,)).astype(np.int64),      # 24000 B
        "c": np.zeros((4096,), np.float16),                           # all-zero blocks dedup
    }


@pytest.fixture
def pack_path(tmp_path, tensors):
    """A two-task pack: "t1" and "t2" where t2 differs from t1 in tensor a's first block."""
    p = tmp_path / "p.edgepack"
    with PackWriter(p, kind="onnx-tasks", block_size=4096) as w:
        w.add_task("t1", {k: w.add_tensor(v) for k, v in tensors.items()})
        t2 = dict(tensors)
        t2["a"] = tensors["a"].copy()
        t2["a"][0, :4] += 1.0
        w.add_task("t2", {k: w.add_tensor(v) for k, v in t2.items()})
        w.config = {"note": "test"}
        w.sections["extra"] = b"\x01\x02"
    return p
