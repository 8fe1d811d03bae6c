"""FleetDevice: what a Runtime does with a fleet server (``Runtime(config, server=...)``).

It reports task switches, keeps the server's numbered hints (Clone pattern: an update whose
number is not the one after the last, or a beat that names another number, makes it ask
for a snapshot) and prewarms spare memory from them on a thread of its own, blocks ranked
by the summed probability of the tasks needing them (TaskModel.prewarm_weighted), giving
way the moment a request wants the model. A server that is gone, slow or lying changes
nothing a caller sees: the link runs in the background (link.py), hints only decide which
blocks sit in spare slots, and a block is verified when read whoever asked for it.

``stats()``: connected, hints_received, hints_used (switches that took blocks a hint
prewarmed), prewarmed_bytes, unused_prewarm_bytes (prewarmed by a hint, no switch used them
yet), published_chunks and fetched_chunks (KV sharing).
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import weakref

import blake3

from ..errors import ConfigError
from .link import ServerLink

log = logging.getLogger(__name__)
FLUSH_S = 2.0            # close() waits at most this long for reports still in flight
SCHEMES = ("tcp://", "ipc://", "inproc://")


def endpoints_of(spec: str) -> list[str]:
    """``tcp://A:1,tcp://B:2`` -> the list (the link moves to the next on reconnect)."""
    eps = [e.strip() for e in spec.split(",") if e.strip()]
    bad = [e for e in eps if not e.startswith(SCHEMES) or e.endswith("://")]
    if not eps or bad:
        raise ConfigError(f"server {spec!r}: expected tcp://HOST:PORT (several separated by "
                          "commas), ipc://PATH or \"\" for none")
    return eps


def default_device_id() -> str:
    return os.environ.get("EDGERT_DEVICE_ID") or socket.gethostname()[:64] or "device"


def pack_fingerprint(reader) -> str:
    """A pack's identity for the fleet: its blocks' content hashes (not its path)."""
    h = blake3.blake3(b"edgert-pack-v1")
    for b in reader.blocks:
        h.update(b.hash)
    return h.hexdigest()[:32]


class FleetDevice:
    def __init__(self, rt, spec: str, *, device_id: str | None = None, curve=None):
        self._rt = weakref.ref(rt)
        self.spec = spec
        self.device_id = device_id or default_device_id()
        self.clock = time.time             # the time a switch is reported at
        self.seq = 0
        self.hints: dict[str, list] = {}   # model fingerprint -> ranked [task, probability]
        self.counters = dict.fromkeys(
            ("hints_received", "hints_used", "snapshots", "prewarmed_bytes",
             "used_prewarm_bytes", "prewarm_stopped", "switches_reported", "published_chunks",
             "fetched_chunks", "rejected_chunks"), 0)
        self._lock = threading.Lock()
        self._fps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._prewarmed: dict[str, dict[int, int]] = {}     # model name -> block -> bytes
        self._jobs: queue.Queue = queue.Queue(1)             # the latest hint only
        self._tiers: list = []                                # KV server tiers (sockets)
        self._idle = threading.Event()                        # no prewarm waits or runs
        self._idle.set()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=_prewarm_loop,
                                        args=(weakref.ref(self), self._jobs, self._stop,
                                              self._idle),
                                        daemon=True, name="edgert-prewarm")
        self._worker.start()
        self.link = ServerLink(self, endpoints_of(spec), curve=curve)

    # --- what models call (cheap; under the model's lock) ------------------------------
    def fingerprint(self, model) -> str:
        fp = self._fps.get(model)
        if fp is None:
            fp = self._fps[model] = pack_fingerprint(model.reader)
        return fp

    def switched(self, model, prev: str | None, task: str, res, moved_blocks) -> None:
        fp = self.fingerprint(model)
        with self._lock:
            pw = self._prewarmed.get(model.name, {})
            used = {b for b in moved_blocks.tolist() if b in pw}   # a block may sit at several positions
            self.counters["used_prewarm_bytes"] += sum(pw.pop(b) for b in used)
            if used:
                self.counters["hints_used"] += 1
            self.counters["switches_reported"] += 1
        self.link.send("switch", {"device": self.device_id, "model": fp, "task": task,
                                  "t": float(self.clock()), "current": prev})

    def loaded(self, model) -> None:
        """A model just joined the runtime: its KV cache shares chunks through the server;
        it prewarms from a hint that came meanwhile."""
        kv = getattr(model, "kv", None)
        if kv is not None and kv.prefix:
            from .kvtier import ServerTier
            tier = ServerTier(self, kv.fp, kv.pages.nbytes)
            self._tiers.append(tier)
            kv.attach_remote(tier)
        ranked = self.hints.get(self.fingerprint(model))
        if ranked and hasattr(model, "prewarm_weighted"):
            self._prewarm(model, ranked)

    # --- what the link calls (its thread) ------------------------------------------------
    def _link_register(self) -> dict:
        rt = self._rt()
        packs = []
        if rt is not None:
            for m in list(rt._models.values()):
                if not m.closed:
                    packs.append({"name": m.name, "kind": m.kind,
                                  "fingerprint": self.fingerprint(m),
                                  "tasks": list(getattr(m, "tasks", []) or [])})
        budgets = {"total": rt.config.budget.total, "arena": rt.arena.mapped} \
            if rt is not None else {}
        return {"device": self.device_id, "packs": packs, "budgets": budgets}

    def _link_reply(self, op: str, args: dict, rep) -> None:
        if not rep.ok:
            return
        r = rep.result if isinstance(rep.result, dict) else {}
        if op == "register":
            self._snapshot(r.get("snapshot"))
        elif op == "snapshot":
            self._snapshot(r)
        elif op == "beat":
            if r.get("seq") != self.seq:
                self.link.send("snapshot", {"device": self.device_id})
        elif op == "switch":
            seq, model, ranked = r.get("seq"), r.get("model"), _ranked(r.get("hints"))
            if seq != self.seq + 1 or not isinstance(model, str) or ranked is None:
                self.link.send("snapshot", {"device": self.device_id})   # a gap: re-snapshot
                return
            self.seq = seq
            self._hint(model, ranked)

    def _snapshot(self, snap) -> None:
        if not isinstance(snap, dict) or not isinstance(snap.get("seq"), int) \
                or not isinstance(snap.get("hints"), dict):
            return
        self.seq = snap["seq"]
        self.counters["snapshots"] += 1
        for model, ranked in snap["hints"].items():
            ranked = _ranked(ranked)
            if isinstance(model, str) and ranked is not None:
                self._hint(model, ranked)

    def _hint(self, fp: str, ranked: list) -> None:
        with self._lock:
            self.hints[fp] = ranked
            self.counters["hints_received"] += 1
        rt = self._rt()
        if rt is None:
            return
        for m in list(rt._models.values()):
            if not m.closed and hasattr(m, "prewarm_weighted") and self.fingerprint(m) == fp:
                self._prewarm(m, ranked)

    def _prewarm(self, model, ranked) -> None:
        self._idle.clear()
        _latest(self._jobs, (weakref.ref(model), ranked))

    def wait_prewarmed(self, timeout: float) -> bool:
        """Wait until no hinted prewarm waits or runs (benchmarks replaying idle time)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._idle.wait(max(0.0, end - time.monotonic())) and self._jobs.empty():
                return True
            time.sleep(0.005)
        return False

    def _prewarmed_blocks(self, model, blocks: list[int]) -> None:
        blocks_ = model.reader.blocks
        with self._lock:
            pw = self._prewarmed.setdefault(model.name, {})
            for b in blocks:
                if b not in pw:
                    pw[b] = blocks_[b].length
                    self.counters["prewarmed_bytes"] += blocks_[b].length

    # --- accounting, end -----------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            c = dict(self.counters)
        c["unused_prewarm_bytes"] = c["prewarmed_bytes"] - c["used_prewarm_bytes"]
        return {"endpoint": self.spec, "device_id": self.device_id,
                "connected": self.link.connected, "seq": self.seq, **c,
                "link": dict(self.link.counters)}

    def close(self) -> None:
        """Stop prewarming; give reports still queued at most FLUSH_S to reach the server."""
        self._stop.set()
        _latest(self._jobs, None)
        for t in self._tiers:
            t.close()
        self.link.close(FLUSH_S)
        if self._worker is not threading.current_thread():
            self._worker.join(FLUSH_S)


def no_server_stats() -> dict:
    return {"endpoint": "", "connected": False, "hints_received": 0, "hints_used": 0,
            "prewarmed_bytes": 0, "unused_prewarm_bytes": 0, "published_chunks": 0,
            "fetched_chunks": 0}


def _ranked(v) -> list | None:
    """A hint list as sent, checked: [[task, probability], ...]; None when malformed."""
    if not isinstance(v, list) or len(v) > 64:
        return None
    out = []
    for e in v:
        if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                and isinstance(e[1], (int, float)) and not isinstance(e[1], bool)):
            return None
        out.append((e[0], min(1.0, max(0.0, float(e[1])))))
    return out


def _latest(q: queue.Queue, item) -> None:
    """Put ``item``, replacing what waits: only the newest hint is worth prewarming."""
    while True:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            try:
                q.get_nowait()
            except queue.Empty:
                pass


def _prewarm_loop(ref, jobs: queue.Queue, stop: threading.Event, idle: threading.Event) -> None:
    while not stop.is_set():
        job = jobs.get()
        if job is None:
            return
        _prewarm_one(ref, *job, stop)
        if jobs.empty():
            idle.set()


def _prewarm_one(ref, mref, ranked, stop: threading.Event) -> None:
    model = mref()
    if model is None or model.closed:
        return
    try:
        got = model.prewarm_weighted(ranked, stop=stop.is_set)
    except Exception as e:       # NOTE: a prewarm that fails costs a later switch a read
        log.info("prewarm from a server hint failed: %s", e)
        return
    dev = ref()
    if dev is not None:
        dev._prewarmed_blocks(model, got)
        if model._waiting:
            dev.counters["prewarm_stopped"] += 1
