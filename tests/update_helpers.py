"""Real parts for the update tests: tiny task models, a v2 of one task, signing keys, and a
fleet server (thread) serving a pack directory from a real store."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgert.pack import PackReader
from edgert.update.append import append_onnx
from edgert.pack.onnx_import import pack_onnx
from edgert.recipes.retrain import retrain
from edgert.recipes.tasks import build
from edgert.server import packs as shelf
from edgert.server.service import FleetServer
from edgert.server.backends import open_store
from edgert.update import keys

BLOCK = 4096


class UpdateModels:
    """Tiny task models (v1), lane v2, the v1 pack, ORT references, two key pairs."""

    def __init__(self, root: Path):
        paths = build(str(root / "models"), "tiny")
        self.files = {k: v for k, v in paths.items() if k != "base"}
        self.lane_v2 = retrain(str(root / "models"), "lane", "tiny")
        self.v1 = root / "v1.edgepack"
        pack_onnx(paths["base"], self.files, self.v1, block_size=BLOCK)
        self.other = root / "other.edgepack"           # another lineage: other tasks
        pack_onnx(paths["base"], {"lane": self.files["lane"]}, self.other, block_size=BLOCK)
        self.x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
        self.ref = {t: _ort(p, self.x) for t, p in self.files.items()}
        self.ref_v2 = {**self.ref, "lane": _ort(self.lane_v2, self.x)}
        self.priv, self.pub = keys.generate(root / "keys")
        self.other_priv, self.other_pub = keys.generate(root / "other-keys")


def _ort(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"image": x})[0]


@pytest.fixture(scope="session")
def upd(tmp_path_factory) -> UpdateModels:
    return UpdateModels(tmp_path_factory.mktemp("update-models"))


class Fleet:
    """A server publishing ``srv/tasks.edgepack`` (v1) and a device copy ``dev.edgepack``."""

    def __init__(self, upd: UpdateModels, root: Path, store_spec: str, bind="tcp://127.0.0.1:0"):
        self.upd = upd
        (root / "srv").mkdir()
        self.srv_pack = root / "srv" / "tasks.edgepack"
        shutil.copy(upd.v1, self.srv_pack)
        self.dev = root / "dev.edgepack"
        shutil.copy(upd.v1, self.dev)
        self.store = open_store(store_spec)
        self.srv = FleetServer(self.store, bind, heartbeat_s=0.2,
                               packs=(root / "srv", keys.load_private(upd.priv)))
        self.shelf = self.srv.packs
        self.endpoint = self.srv.endpoint
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()

    def publish_v2(self) -> None:
        append_onnx(self.srv_pack, {"lane": self.upd.lane_v2})
        self.shelf.refresh(force=True)          # published now, not at the watcher's turn

    def lineage(self) -> bytes:
        from edgert.update.signed import lineage_of
        with PackReader(self.dev) as r:
            return lineage_of(r)

    def stop(self) -> None:
        self.srv.stop()
        self.thread.join(5)
        self.store.close()


@pytest.fixture
def fresh_dir(monkeypatch):
    """The server's watcher looks at the pack directory often (tests publish with
    ``shelf.refresh(force=True)`` where they need it at once)."""
    monkeypatch.setattr(shelf, "REFRESH_S", 0.05)
