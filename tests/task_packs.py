"""Tiny task-model packs for the task-switching tests (the demo recipe's "tiny" preset)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgert.config import DeviceConfig, parse_bytes
from edgert.pack import PackReader
from edgert.pack.onnx_import import pack_onnx

from edgert.recipes.tasks import build

BLOCK = 4096
RTOL, ATOL = 1e-5, 1e-6


class TinyTasks:
    """Tiny ViT task models, their pack, and ORT reference outputs on a fixed input."""

    def __init__(self, root: Path):
        paths = build(str(root / "models"), "tiny")
        self.files = {k: v for k, v in paths.items() if k != "base"}
        self.names = list(self.files)
        self.pack = root / "tasks.edgepack"
        pack_onnx(paths["base"], self.files, self.pack, block_size=BLOCK)
        self.x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
        self.ref = {t: ort.InferenceSession(p, providers=["CPUExecutionProvider"])
                    .run(None, {"image": self.x})[0] for t, p in self.files.items()}

    def copy_pack(self, dest: Path) -> Path:
        out = dest / "copy.edgepack"
        shutil.copy(self.pack, out)
        return out

    def corrupt_block_of(self, pack: Path, task: str, not_in: str) -> int:
        """Flip one byte of a block that ``task`` uses and ``not_in`` does not; its index."""
        with PackReader(pack) as r:
            other = {b for s in r.task(not_in).values() for b in s.blocks}
            idx = next(b for s in r.task(task).values() for b in s.blocks if b not in other)
            off = r.blocks[idx].offset
        with open(pack, "r+b") as f:
            f.seek(off + 7)
            byte = f.read(1)
            f.seek(off + 7)
            f.write(bytes([byte[0] ^ 0xFF]))
        return idx


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyTasks:
    return TinyTasks(tmp_path_factory.mktemp("tiny-tasks"))


def config(weights: int | str = "4 MiB", extra: int | str = "8 MiB", read_mode="direct",
           threads=1) -> DeviceConfig:
    """A config whose arena is ``weights`` bytes and engine allowance ``extra``."""
    w, e = parse_bytes(weights, "weights"), parse_bytes(extra, "extra")
    return DeviceConfig.from_dict({
        "name": "test-tasks", "threads": threads, "storage": {"read_mode": read_mode},
        "memory": {"total": w + e, "engine": e, "experts": 0, "kv": 0}})


def assert_matches(out: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
