"""What each op of the device service does, apart from sockets: argument checks, the table
of served models, and the work itself (run on the service's worker threads).

Every check here runs before any work: types and ranges of every field, the model a
request names (or the only one of the kind it needs), its tasks and its input specs.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

from ..errors import PackCorrupt
from .protocol import MAX_ITEMS, PROTOCOL, ProtocolError

MAX_NEW_TOKENS = 8192
MAX_TEXT = 1 << 20          # characters of a prompt, a path or a name
LOAD_OPTIONS = {"task": str, "prepack": str, "keep_displaced": bool,        # tasks packs
                "expert_budget": (int, float), "lossy_alpha": (int, float), "policy": str,
                "precision": str, "precision_alpha": (int, float)}               # MoE packs

# op -> the model kind it works on (None: no model)
MODEL_KIND = {"switch": "tasks", "infer": "tasks", "prewarm": "tasks", "generate": "moe"}
LOOP_OPS = ("hello", "health", "cancel", "shutdown")    # answered on the socket loop
ADMIN_OPS = ("load", "unload", "reload", "shutdown")
STREAM_OPS = ("generate",)
RETIRE_WAIT_S = 10.0        # after the drain timeout: how long retired work has to end (it
                            # ends at its next token or when its run returns)


# --- argument checks -------------------------------------------------------------------------
def _text(op, key, v, optional=False):
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > MAX_TEXT:
        raise ProtocolError("bad_request", f"{op}: {key!r} must be a non-empty string")
    return v


def _int(op, key, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError("bad_request", f"{op}: {key!r} must be an integer in [{lo}, {hi}]")
    return v


def _real(op, key, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise ProtocolError("bad_request", f"{op}: {key!r} must be a number in [{lo}, {hi}]")
    return float(v)


def _texts(op, key, v):
    if not isinstance(v, list) or not 0 < len(v) <= 1024:
        raise ProtocolError("bad_request", f"{op}: {key!r} must be a list of 1 to 1024 names")
    return [_text(op, key, t) for t in v]


def _inputs(op, key, v):
    if not isinstance(v, dict) or not v or not all(
            isinstance(a, np.ndarray) for a in v.values()):
        raise ProtocolError("bad_request", f"{op}: {key!r} must be a map of name -> array")
    return v


def _prompt(op, key, v):
    if isinstance(v, str):
        return _text(op, key, v)
    if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and 0 < v.size <= MAX_ITEMS:
        return [int(t) for t in v.reshape(-1)]
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in v):
        return v
    raise ProtocolError("bad_request", f"{op}: {key!r} must be text or a non-empty list of "
                        "token ids")


def _options(op, key, v):
    if not isinstance(v, dict):
        raise ProtocolError("bad_request", f"{op}: {key!r} must be a map")
    for k, x in v.items():
        want = LOAD_OPTIONS.get(k)
        if want is None:
            raise ProtocolError("bad_request", f"{op}: unknown option {k!r}; known: "
                                f"{', '.join(LOAD_OPTIONS)}")
        if x is not None and (not isinstance(x, want) or (isinstance(x, bool) and want
                                                          is not bool)):
            raise ProtocolError("bad_request", f"{op}: option {k!r} has the wrong type")
    return v


OPT_MODEL = ("model", lambda op, k, v: _text(op, k, v, optional=True), None)
# op -> [(key, check, default)]; a key with default ... is required
ARGS = {
    "hello": [], "health": [], "shutdown": [],
    "stats": [OPT_MODEL],
    "cancel": [("id", lambda op, k, v: _int(op, k, v, 0, (1 << 63) - 1), ...)],
    "switch": [("task", _text, ...), OPT_MODEL],
    "infer": [("inputs", _inputs, ...), ("task", lambda op, k, v: _text(op, k, v, True), None),
              OPT_MODEL],
    "prewarm": [("tasks", _texts, ...), OPT_MODEL],
    "generate": [("prompt", _prompt, ...),
                 ("max_new_tokens", lambda op, k, v: _int(op, k, v, 1, MAX_NEW_TOKENS), 64),
                 ("temperature", lambda op, k, v: _real(op, k, v, 0.0, 100.0), 0.0),
                 ("top_p", lambda op, k, v: _real(op, k, v, 1e-6, 1.0), 1.0),
                 ("seed", lambda op, k, v: _int(op, k, v, 0, (1 << 63) - 1), 0), OPT_MODEL],
    "load": [("path", _text, ...), ("name", lambda op, k, v: _text(op, k, v, True), None),
             ("options", _options, {})],
    "unload": [("name", _text, ...)],
    "reload": [("name", _text, ...), ("path", lambda op, k, v: _text(op, k, v, True), None)],
}
OPS = tuple(ARGS)


def check_args(op: str, args: dict) -> dict:
    """Checked and completed args of ``op``; ProtocolError names the first bad field."""
    spec = ARGS.get(op)
    if spec is None:
        raise ProtocolError("unknown_op", f"unknown op {op!r}; known: {', '.join(OPS)}")
    known = {k for k, _, _ in spec}
    extra = [k for k in args if k not in known]
    if extra:
        raise ProtocolError("bad_request", f"{op}: unknown argument {extra[0]!r}; it takes "
                            f"{', '.join(sorted(known)) or 'nothing'}")
    out = {}
    for key, check, default in spec:
        if key in args:
            out[key] = check(op, key, args[key])
        elif default is ...:
            raise ProtocolError("bad_request", f"{op}: {key!r} is required")
        else:
            out[key] = default
    return out


# --- the served models -----------------------------------------------------------------------
class ModelTable:
    """The models a service serves, by the name clients use. The socket loop reads it,
    workers change it (load, unload, reload); a lock keeps both consistent.

    Work on a model holds a lease on it (`lease`) for as long as it runs, a stream until its
    last piece. A reload loads the new model first and swaps only on success; the old one,
    like an unloaded one, takes no new work and is closed once its leases are given back
    (drained), or after ``drain_timeout_s``, when the work still holding it is told to end
    with ``reloaded`` (Triton's model control keeps the old version the same way)."""

    def __init__(self, rt, models: dict | None = None, *, pack_dirs=None,
                 drain_timeout_s: float = 30.0):
        self.rt = rt
        self._models: dict[str, object] = dict(models or {})
        self._busy: set[str] = set()         # names being loaded, unloaded or reloaded
        self._holders: dict[int, list] = {}  # id(model) -> [retire callbacks of its leases]
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self.pack_dirs = [Path(d).resolve() for d in (pack_dirs or [])]
        self.drain_timeout_s = drain_timeout_s

    def names(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def items(self) -> list[tuple[str, object]]:
        with self._lock:
            return list(self._models.items())

    def resolve(self, name: str | None, kind: str):
        """(name, model) of the model ``name``, or of the only model of ``kind``."""
        with self._lock:
            if name is not None:
                m = self._models.get(name)
                if m is None:
                    raise ProtocolError("unknown_model", f"no model {name!r} is served; "
                                        f"served: {', '.join(self._models) or '(none)'}")
                if m.kind != kind:
                    raise ProtocolError("bad_request", f"model {name!r} is a {m.kind} model; "
                                        f"this op needs a {kind} model")
                return name, m
            fit = [(n, m) for n, m in self._models.items() if m.kind == kind]
        if len(fit) == 1:
            return fit[0]
        if not fit:
            raise ProtocolError("unknown_model", f"no {kind} model is served")
        raise ProtocolError("bad_request", f"several {kind} models are served "
                            f"({', '.join(n for n, _ in fit)}); name one with 'model'")

    def get(self, name: str):
        with self._lock:
            m = self._models.get(name)
        if m is None:
            raise ProtocolError("unknown_model", f"no model {name!r} is served")
        return m

    def lease(self, name: str, retire=lambda: None):
        """(model, release): the model served as ``name`` now, held until ``release()``.
        ``retire()`` is called (from another thread) if the model is being replaced and
        the drain timeout passed: the holder should end soon and release."""
        with self._lock:
            m = self._models.get(name)
            if m is None:
                raise ProtocolError("unknown_model", f"no model {name!r} is served (it was "
                                    "unloaded)")
            entry = [retire]
            self._holders.setdefault(id(m), []).append(entry)

        def release():
            with self._lock:
                held = self._holders.get(id(m))
                if held is not None and entry in held:
                    held.remove(entry)
                    if not held:
                        del self._holders[id(m)]
                        self._drained.notify_all()
        return m, release

    def call(self, name: str, fn):
        """``fn(model)`` under a lease on the model served as ``name``."""
        m, release = self.lease(name)
        try:
            return fn(m)
        finally:
            release()

    def leases(self, m) -> int:
        with self._lock:
            return len(self._holders.get(id(m), ()))

    def check(self, op: str, name: str, m, args: dict) -> None:
        """Refuse, before queueing, what the model would refuse: tasks and inputs."""
        if op == "generate":
            prompt, vocab = args["prompt"], m.cfg.vocab_size
            if isinstance(prompt, str) and m.tokenizer is None:
                raise ProtocolError("bad_request", f"model {name!r} has no tokenizer; send "
                                    "token ids")
            if not isinstance(prompt, str) and not all(0 <= t < vocab for t in prompt):
                raise ProtocolError("bad_request", f"token ids must be in [0, {vocab})")
            return
        tasks = args.get("tasks") or ([args["task"]] if args.get("task") else [])
        for t in tasks:
            if t not in m.tasks:
                raise ProtocolError("unknown_task", f"unknown task {t!r}; model {name!r} "
                                    f"holds: {', '.join(m.tasks)}")
        if op == "infer":
            m.engine.check_inputs(args["inputs"])      # InputMismatch names the input

    # --- admin ------------------------------------------------------------------------------
    def _reserve(self, name: str, must_exist: bool) -> None:
        with self._lock:
            if name in self._busy:
                raise ProtocolError("busy", f"model {name!r} is being loaded or unloaded")
            if must_exist and name not in self._models:
                raise ProtocolError("unknown_model", f"no model {name!r} is served; served: "
                                    f"{', '.join(self._models) or '(none)'}")
            if not must_exist and name in self._models:
                raise ProtocolError("bad_request", f"a model named {name!r} is served already;"
                                    " unload it or choose another name")
            self._busy.add(name)

    def allowed_path(self, path: str) -> str:
        """``path`` if it names a file inside one of the pack directories the service was
        started with; ``forbidden`` otherwise. NOTE: a client names files the service
        opens with its own rights, so nothing outside those directories, links included."""
        if not self.pack_dirs:
            raise ProtocolError("forbidden", "this service loads no packs over the socket "
                                "(start it with --pack-dir DIR to allow packs from DIR)")
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(d) for d in self.pack_dirs) or not real.is_file():
            raise ProtocolError("forbidden", f"{path!r} is not a pack file inside the service's "
                                f"pack directories ({', '.join(map(str, self.pack_dirs))})")
        return str(real)

    def load(self, path: str, name: str | None, options: dict) -> dict:
        path = self.allowed_path(path)
        name = name or Path(path).stem
        self._reserve(name, must_exist=False)
        try:
            m = _load(self.rt, path, name, options)
            with self._lock:
                self._models[name] = m
        finally:
            with self._lock:
                self._busy.discard(name)
        return describe(name, m)

    def unload(self, name: str) -> dict:
        """Take ``name`` out of service at once; close it once drained."""
        self._reserve(name, must_exist=True)
        try:
            with self._lock:
                m = self._models.pop(name)
            before = self.rt.arena.stats()["in_use_bytes"]
            drained = self._retire(m)
            after = self.rt.arena.stats()["in_use_bytes"]
        finally:
            with self._lock:
                self._busy.discard(name)
        return {"name": name, "freed_bytes": before - after, "arena_in_use_bytes": after,
                **drained}

    def reload(self, name: str, path: str | None) -> dict:
        """Load ``path`` (default: the pack it came from) beside the old model, then swap;
        the old one drains and closes. A failed load leaves the old model serving."""
        if path is not None:
            path = self.allowed_path(path)
        self._reserve(name, must_exist=True)
        try:
            with self._lock:
                old = self._models[name]
            new = _load(self.rt, path or old.path, name, _reload_options(old))
            with self._lock:
                self._models[name] = new
            drained = self._retire(old)
        finally:
            with self._lock:
                self._busy.discard(name)
        return {**describe(name, new), **drained}

    def _retire(self, m) -> dict:
        """Wait for ``m``'s leases (up to the drain timeout), tell the rest to end, close."""
        t0 = time.monotonic()
        with self._lock:
            in_flight = len(self._holders.get(id(m), ()))
            self._drained.wait_for(lambda: id(m) not in self._holders, self.drain_timeout_s)
            late = [e[0] for e in self._holders.get(id(m), ())]
        for retire in late:
            retire()
        with self._lock:        # NOTE: retired work ends at its next step (a token, a run)
            self._drained.wait_for(lambda: id(m) not in self._holders, RETIRE_WAIT_S)
        m.close()               # waits for a run still inside the model
        return {"drained": in_flight - len(late), "retired": len(late),
                "drain_s": round(time.monotonic() - t0, 3)}

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for m in models:
            m.close()


def _load(rt, path: str, name: str, options: dict):
    """``rt.load`` for a client: its errors say what failed, never what the file holds."""
    try:
        return rt.load(path, name=name, **options)
    except PackCorrupt as e:
        raise PackCorrupt(f"{Path(path).name}: not a valid edgert pack ({_first_clause(e)})") \
            from None


def _first_clause(e: Exception) -> str:
    return str(e).split(":")[-1].strip()[:120]


def _reload_options(m) -> dict:
    """The options ``m`` was loaded with (a reload keeps them), and a task model's prepack
    mode as it is now."""
    opts = dict(getattr(m, "load_options", {}))
    if m.kind == "tasks":
        opts["prepack"] = m.prepack
    return opts


# --- what ops answer -------------------------------------------------------------------------
def describe(name: str, m) -> dict:
    """A served model as hello lists it. Reads only what does not change while serving."""
    d = {"name": name, "kind": m.kind, "label": m.name, "path": m.path}
    if m.kind == "tasks":
        d.update(tasks=list(m.tasks), active=m.active, outputs=list(m.engine.outputs),
                 inputs={n: {"dtype": dt.name, "shape": list(shape)}
                         for n, (dt, shape) in m.engine.inputs.items()})
    elif m.kind == "moe":
        d.update(vocab_size=m.cfg.vocab_size, tokenizer=m.tokenizer is not None,
                 eos_token_ids=list(m.cfg.eos_token_ids))
    return d


def hello(table: ModelTable, version: str, limits: dict) -> dict:
    return {"protocol": PROTOCOL, "version": version, "limits": limits,
            "models": [describe(n, m) for n, m in table.items()]}


def stats(table: ModelTable, name: str | None, service: dict) -> dict:
    if name is not None:
        return _plain(table.call(name, lambda m: m.stats()))
    return _plain({"service": service, "runtime": table.rt.stats(),
                   "models": {n: m.name for n, m in table.items()}})


def switch(m, args):
    return _plain(m.switch(args["task"]))


def infer(m, args):
    return m.run(args["inputs"], task=args["task"])


def prewarm(m, args):
    return _plain(m.prewarm(args["tasks"]))


def generate(m, args):
    """An iterator of pieces: text pieces for a text prompt, token ids for ids (with a
    ``stop_reason`` once it ended, where the model reports one)."""
    return m.generate(args["prompt"], max_new_tokens=args["max_new_tokens"],
                      temperature=args["temperature"], top_p=args["top_p"], seed=args["seed"],
                      stream=True)


def _plain(x):
    """Results as msgpack-friendly data (dataclasses as maps)."""
    if is_dataclass(x) and not isinstance(x, type):
        return asdict(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
