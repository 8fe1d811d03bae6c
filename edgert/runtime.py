"""Runtime: the owner of one memory budget and of every model loaded from it."""
from __future__ import annotations

import logging
import os
import threading
import weakref
from pathlib import Path

from .config import DeviceConfig, resolve
from .errors import EdgertError, ModelClosed
from .memory import Arena
from .pack import PackReader

log = logging.getLogger(__name__)


class Runtime:
    """Owns one device config, the arena sized from it, and the models loaded into it.

    ``rt.load(pack)`` opens a pack and returns the model for its kind: a ``TaskModel``
    for ``onnx-tasks`` packs, a ``MoeLM`` for ``moe`` packs. Models share the arena:
    whatever one holds only as cache (spare task blocks, idle KV pages, unpinned experts
    above a model's minimum) gives way when another load or request needs memory
    (edgert/memory/arena.py says in which order). The runtime holds its models weakly:
    dropping the last reference to a model releases it; ``rt.close()`` closes the rest.
    """

    def __init__(self, config: DeviceConfig | str | os.PathLike | None = None, *,
                 server: str | None = None, device_id: str | None = None, server_curve=None):
        """``server`` overrides the config's ``server:`` ("" = none): the fleet server's
        endpoint (edgert/server/device.py); ``device_id`` names this device to it (default:
        $EDGERT_DEVICE_ID, else the host name); ``server_curve`` = (server public key file,
        this device's secret key file) for a server behind CURVE."""
        self.config = resolve(config)
        spec = self.config.server if server is None else server
        self.fleet = None
        if spec:
            from .server.device import FleetDevice, endpoints_of
            endpoints_of(spec)                      # ConfigError before anything is taken
        self.arena = Arena(self.config)
        self._models: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._loading: set[str] = set()
        self._lock = threading.Lock()
        self._torch_threads_set = False
        self._closed = False
        if spec:
            self.fleet = FleetDevice(self, spec, device_id=device_id, curve=server_curve)
        self.updater = None
        if spec and self.config.updates.check_s > 0:    # docs/updates.md
            from .update.auto import AutoUpdater
            self.updater = AutoUpdater(self, endpoints_of(spec), self.config.updates.public_key,
                                       self.config.updates.check_s, curve=server_curve)

    def set_torch_threads(self) -> None:
        """Give torch the config's thread count, once (torch's setting is process-wide)."""
        if not self._torch_threads_set:
            import torch
            torch.set_num_threads(self.config.threads)
            self._torch_threads_set = True

    def load(self, pack_path, *, name: str | None = None, **options):
        """Load a pack; ``name`` labels the model in ``models()`` and ``stats()`` (default:
        the file's stem, made unique). Options go to the model (see TaskModel, MoeLM).
        A load that fails gives back everything it took."""
        if self._closed:
            raise ModelClosed("this runtime is closed")
        path = os.fspath(pack_path)
        if os.path.isdir(path):
            raise EdgertError(f"{path}: is a directory, not a pack file")
        try:
            reader = PackReader(path, read_mode=self.config.storage.read_mode)
        except OSError as e:
            raise EdgertError(f"cannot open pack {path}: {e.strerror}") from None
        try:
            with self._lock:
                name = self._unique(name or Path(path).stem)
                self._loading.add(name)               # the name is taken while it loads
            if reader.kind == "onnx-tasks":
                from .kinds.task import TaskModel as kind
            elif reader.kind == "moe":
                from .kinds.moe import MoeLM as kind
            else:
                raise EdgertError(f"{path}: pack kind {reader.kind!r} has no engine "
                                  "(known: onnx-tasks, moe)")
            _check_options(kind, path, reader.kind, options)
            model = kind(self, reader, name, **options)
            model.load_options = dict(options)    # what a reload of it loads with again
        except BaseException:
            reader.close()
            with self._lock:
                self._loading.discard(name)
            raise
        with self._lock:
            self._loading.discard(name)
            self._models[name] = model
        if self.fleet is not None:
            self.fleet.loaded(model)
        return model

    def _unique(self, name: str) -> str:
        taken = set(self._models.keys()) | self._loading
        if name not in taken:
            return name
        i = 2
        while f"{name}#{i}" in taken:
            i += 1
        return f"{name}#{i}"

    def models(self) -> list[dict]:
        """Every open model: name, kind, pack, and its memory (held / reclaimable bytes)."""
        with self._lock:
            live = list(self._models.values())
        return [{"name": m.name, "kind": m.kind, "path": m.path, **m.memory()}
                for m in live if not m.closed]

    def model(self, name: str):
        m = self._models.get(name)
        if m is None or m.closed:
            known = ", ".join(x["name"] for x in self.models()) or "(none)"
            raise EdgertError(f"no model {name!r} is loaded; loaded: {known}")
        return m

    def _memory_of(self, name: str) -> dict:
        st = self.arena.stats()
        prefix = f"{name}: "
        held = sum(h["bytes"] for lab, h in st["holders"].items() if lab.startswith(prefix))
        cache = sum(h["reclaimable"] for lab, h in st["holders"].items()
                    if lab.startswith(prefix))
        engine = sum(v for lab, v in st["engine"]["charges"].items() if lab.startswith(prefix))
        return {"arena_bytes": held, "reclaimable_bytes": cache, "pinned_bytes": held - cache,
                "engine_bytes": engine}

    def stats(self) -> dict:
        """The arena with every byte attributed to its holder, the models, the fleet server."""
        from .server.device import no_server_stats
        return {"config": self.config.name, "arena": self.arena.stats(), "models": self.models(),
                "server": self.fleet.stats() if self.fleet is not None else no_server_stats(),
                **({"updates": self.updater.stats()} if self.updater is not None else {})}

    def close(self) -> None:
        """Send what the server is still owed (bounded), close every model, then unpin the
        arena for the GPU. Idempotent."""
        self._closed = True
        if self.updater is not None:
            self.updater.close()    # no update of a loaded pack in flight while models close
        with self._lock:
            live = list(self._models.values())
        for m in live:
            m.close()               # NOTE: first: a KV writer's last chunks go to the link
        if self.fleet is not None:
            self.fleet.close()
        self.arena.close()

    def __repr__(self) -> str:
        head = f"<edgert.Runtime config {self.config.name!r}"
        if self._closed:
            return head + ": closed>"
        models = self.models()
        held = ", ".join(f"{m['name']} ({m['kind']}, {m['arena_bytes'] / 2**20:.1f} MiB)"
                         for m in models)
        return (f"{head}: arena {self.arena.mapped / 2**20:.1f} MiB, "
                f"{self.arena.stats()['in_use_bytes'] / 2**20:.1f} MiB in use; "
                f"{len(models)} model(s){': ' + held if held else ''}>")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_options(kind, path: str, pack_kind: str, options: dict) -> None:
    """Options that the model kind does not take: one clear error before anything loads."""
    import inspect
    takes = [p for p in inspect.signature(kind.__init__).parameters
             if p not in ("self", "rt", "reader", "name")]
    wrong = [k for k in options if k not in takes]
    if wrong:
        what = _KIND_USE.get(pack_kind, f"a {pack_kind} pack")
        raise EdgertError(f"{path} is {what}; option(s) {', '.join(wrong)} do not apply "
                          f"to it (it takes {', '.join(takes)})")


# what a pack of each kind is for, so a mistaken command names the right one
_KIND_USE = {"onnx-tasks": "a task pack: run a task with `edgert run PACK --task T --input "
                           "NAME=FILE.npy` (Python: rt.load(PACK).run(inputs, task=T))",
             "moe": "an MoE pack: generate text with `edgert generate PACK --prompt TEXT` "
                    "(Python: rt.load(PACK).generate(prompt))"}
