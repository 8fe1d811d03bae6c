"""Runtime: the facade that wires config, arena and storage to the engines."""
from __future__ import annotations

import logging
import os

from .config import DeviceConfig, resolve
from .errors import EdgertError
from .memory import Arena, Storage
from .pack import PackReader

log = logging.getLogger(__name__)


class Runtime:
    """Owns one device config and the arena sized from it.

    ``rt.load(pack)`` opens a pack and returns the model object for its kind:
    a ``TaskModel`` for ``onnx-tasks`` packs, a ``MoeLM`` for ``moe`` packs.
    """

    def __init__(self, config: DeviceConfig | str | os.PathLike | None = None):
        self.config = resolve(config)
        self.arena = Arena(self.config)
        self._torch_threads_set = False

    def set_torch_threads(self) -> None:
        """Give torch the config's thread count, once (torch's setting is process-wide)."""
        if not self._torch_threads_set:
            import torch
            torch.set_num_threads(self.config.threads)
            self._torch_threads_set = True

    def open_storage(self, path) -> Storage:
        return Storage(path, self.config.storage.read_mode)

    def load(self, pack_path, **options):
        reader = PackReader(pack_path)
        if reader.kind == "onnx-tasks":
            from .kinds.task import TaskModel
            return TaskModel(self, reader, **options)
        if reader.kind == "moe":
            from .kinds.moe import MoeLM
            return MoeLM(self, reader, **options)
        reader.close()
        raise EdgertError(f"{pack_path}: pack kind {reader.kind!r} has no engine "
                          "(known: onnx-tasks, moe)")

    def stats(self) -> dict:
        return {"config": self.config.name, "arena": self.arena.stats()}

    def close(self) -> None:
        """Unpin the arena for the GPU (models loaded from this runtime must be closed)."""
        self.arena.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
