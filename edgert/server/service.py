"""FleetServer: the ROUTER loop of `edgert server`.

Devices (edgert/server/link.py) talk protocol v1 (edgert/control/protocol.py: the same
envelopes, limits and checks as the device service). Every request names its device;
ops:

    register {device, packs: [{name, fingerprint, kind, tasks}], budgets}
                                         -> {heartbeat_s, snapshot: {seq, hints}}
    beat     {device}                    -> {seq}          (seq: the device's hint number)
    switch   {device, model, task, t, current}  -> {seq, model, hints}   one numbered update
    snapshot {device}                    -> {seq, hints}
    stats    {}                          -> devices, store, counters
    kv_lookup {device, model, names}     -> {sizes}     chunk sizes, None where absent
    kv_get   {device, model, names}      -> {chunks}    uint8 arrays, None where absent
    kv_put   {device, model, name, chunk: uint8 array}  -> {stored}   within the quota

``hints`` maps a model fingerprint to ranked ``[task, probability]`` pairs. Updates are
numbered per device (Clone pattern): a device that sees a number other than the one after
its last (in a switch reply or a beat) asks for a snapshot. A device that misses
``LIVENESS`` heartbeats is forgotten (Paranoid Pirate); its next request is refused with
``unregistered`` and it registers again. All state but liveness is in the store, so a
restarted server, or a second one on the same Redis, carries on.
"""
from __future__ import annotations

import logging
import re
import time

import msgpack
import numpy as np
import zmq

from ..control.auth import curve_server, public_keys, start_authenticator
from ..control.endpoint import bind_router, check_endpoint, check_plain_tcp
from ..control.protocol import (MAX_MESSAGE, PROTOCOL, ProtocolError, decode_request,
                                encode_error, encode_reply, error_code, failure_id)
from . import predictor as P
from .store import Store, WriteBehind

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0        # a device beats this often
LIVENESS = 3             # beats missed before the server forgets a device (3-5 is reasonable)
POLL_MS = 100
MAX_NAME = 128           # bytes of a device id, model fingerprint or task name
MAX_PACKS = 64
MAX_TASKS = 1024
DEVICE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
FLEET = "fleet"          # the scope name of the fleet-wide predictor
KV_TTL_S = 7 * 24 * 3600    # a KV chunk nobody wrote again for a week expires
KV_QUOTA = 256 << 20     # bytes of KV chunks one device may publish (per KV_TTL_S)
MAX_NAMES = 64           # chunks in one look-up or fetch (16384 tokens of 256-token chunks)
MAX_CHUNK = 64 << 20     # bytes of one chunk
HEX = re.compile(r"[0-9a-f]{1,64}")


class FleetServer:
    """Serves one endpoint from one store. ``run()`` until ``stop()`` (thread-safe)."""

    def __init__(self, store: Store, bind: str = "tcp://127.0.0.1:0", *, curve_secret=None,
                 allow_dir=None, heartbeat_s: float = HEARTBEAT_S, packs=None):
        """``packs``: (DIR, Ed25519 private key) to serve signed pack updates
        (edgert/server/packs.py), or None."""
        if (curve_secret is None) != (allow_dir is None):
            raise ValueError("--curve-secret and --allow-dir go together")
        # NOTE: a store only this process uses keeps small state in memory (store.WriteBehind)
        self.store = WriteBehind(store) if getattr(store, "exclusive", False) else store
        self.heartbeat_s = heartbeat_s
        self.live: dict[str, float] = {}        # device -> last heard (monotonic)
        self.counters = {"requests": 0, "errors": 0, "switches": 0, "forgotten": 0}
        self._stop = False
        self._ctx = zmq.Context()
        self._auth = None
        try:
            if allow_dir is not None:
                self._auth = start_authenticator(self._ctx, public_keys(allow_dir))
            r = self._router = self._ctx.socket(zmq.ROUTER)
            r.linger = 0
            r.maxmsgsize = MAX_MESSAGE
            if curve_secret is not None:
                curve_server(r, curve_secret)
            endpoint = check_endpoint(bind)
            check_plain_tcp(endpoint, curve_secret is not None)
            bind_router(r, endpoint)
            self.endpoint = r.last_endpoint.decode()
        except BaseException:
            self._close()
            raise
        self._ops = {"hello": self._hello, "register": self._register, "beat": self._beat,
                     "switch": self._switch, "snapshot": self._snapshot, "stats": self._stats,
                     "kv_lookup": self._kv_lookup, "kv_get": self._kv_get, "kv_put": self._kv_put}
        self.kv_quota = KV_QUOTA
        self.packs = None
        if packs is not None:
            from .packs import PackShelf
            try:
                self.packs = PackShelf(packs[0], packs[1], self.store)
            except BaseException:
                self._close()
                raise
            self._ops.update(self.packs.ops())

    # --- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        flushed = time.monotonic()
        try:
            while not self._stop:
                if self._router.poll(POLL_MS):
                    for _ in range(256):               # a burst, then housekeeping
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._serve(frames)
                self._purge()
                if time.monotonic() - flushed >= WriteBehind.FLUSH_S:
                    self._flush()
                    flushed = time.monotonic()
        finally:
            self._flush()
            self._close()

    def _flush(self) -> None:
        if isinstance(self.store, WriteBehind):
            try:
                self.store.flush()
            except OSError as e:         # NOTE: a full or failing disk: keep serving
                log.warning("store: cannot write back: %s", e)

    def stop(self) -> None:
        self._stop = True

    def _serve(self, frames: list) -> None:
        ident, body = frames[0].bytes, frames[1:]
        self.counters["requests"] += 1
        try:
            req = decode_request(body)
        except ProtocolError as e:
            self.counters["errors"] += 1
            return self._send(ident, encode_error(failure_id(e), e.code, e.message))
        except Exception as e:       # NOTE: a decoder bug must not end the server
            self.counters["errors"] += 1
            log.warning("undecodable request: %s: %s", type(e).__name__, e)
            return self._send(ident, encode_error(None, "bad_request", "undecodable request"))
        try:
            op = self._ops.get(req.op)
            if op is None:
                raise ProtocolError("unknown_op", f"unknown op {req.op!r}; known: "
                                    f"{', '.join(self._ops)}")
            out = encode_reply(req.id, op(req.args))
        except Exception as e:       # NOTE: a bad request or a store fault; the loop goes on
            self.counters["errors"] += 1
            code = error_code(e)
            if code == "internal":
                log.warning("op %s failed: %s: %s", req.op, type(e).__name__, e)
            out = encode_error(req.id, code, str(e) if not isinstance(e, ProtocolError)
                               else e.message)
        self._send(ident, out)

    def _send(self, ident: bytes, frames: list) -> None:
        try:
            self._router.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:          # a gone or stalled peer: it will ask again
            pass

    def _purge(self) -> None:
        dead = time.monotonic() - LIVENESS * self.heartbeat_s
        for d in [d for d, t in self.live.items() if t < dead]:
            del self.live[d]
            self.counters["forgotten"] += 1
            log.info("forgot device %s (silent for %d heartbeats)", d, LIVENESS)

    def _close(self) -> None:
        """Close the socket and the context (idempotent)."""
        if self._ctx.closed:
            return
        if getattr(self, "packs", None) is not None:
            self.packs.close()
        r = getattr(self, "_router", None)
        if r is not None:
            r.close(0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()

    # --- ops -----------------------------------------------------------------------------
    def _device(self, args: dict, must_be_live: bool = True) -> str:
        d = args.get("device")
        if not isinstance(d, str) or not DEVICE_ID.fullmatch(d):
            raise ProtocolError("bad_request", "'device' must be 1-64 characters of "
                                "[A-Za-z0-9._:@-]")
        if must_be_live:
            if d not in self.live:
                raise ProtocolError("unregistered", f"device {d} is not registered here; "
                                    "register first")
            self.live[d] = time.monotonic()
        return d

    def _hello(self, args: dict) -> dict:
        return {"server": "edgert", "protocol": PROTOCOL, "heartbeat_s": self.heartbeat_s}

    def _register(self, args: dict) -> dict:
        d = self._device(args, must_be_live=False)
        packs = args.get("packs", [])
        if not isinstance(packs, list) or len(packs) > MAX_PACKS:
            raise ProtocolError("bad_request", f"'packs' must be a list of at most {MAX_PACKS}")
        clean = []
        for p in packs:
            if not isinstance(p, dict):
                raise ProtocolError("bad_request", "each pack is a map")
            tasks = p.get("tasks", [])
            if not isinstance(tasks, list) or len(tasks) > MAX_TASKS:
                raise ProtocolError("bad_request", f"'tasks' must be a list of at most "
                                    f"{MAX_TASKS}")
            clean.append({"name": _name(p.get("name"), "pack name"),
                          "fingerprint": _name(p.get("fingerprint"), "fingerprint"),
                          "kind": _name(p.get("kind"), "kind"),
                          "tasks": [_name(t, "task") for t in tasks]})
        budgets = args.get("budgets", {})
        if not isinstance(budgets, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in budgets.values()):
            raise ProtocolError("bad_request", "'budgets' must map names to integers")
        self.store.put(f"dev:{d}", msgpack.packb({"packs": clean, "budgets": budgets,
                                                  "registered": time.time()}))
        self.live[d] = time.monotonic()
        return {"heartbeat_s": self.heartbeat_s, "snapshot": self._snapshot(args)}

    def _beat(self, args: dict) -> dict:
        d = self._device(args)
        return {"seq": int(self.store.get(f"seq:{d}") or b"0")}

    def _snapshot(self, args: dict) -> dict:
        d = self._device(args)
        seq, hints = self.store.get_many([f"seq:{d}", f"hints:{d}"])
        return {"seq": int(seq or b"0"),
                "hints": msgpack.unpackb(hints) if hints else {}}

    def _switch(self, args: dict) -> dict:
        d = self._device(args)
        model, task = _name(args.get("model"), "model"), _name(args.get("task"), "task")
        cur = args.get("current")
        cur = None if cur is None else _name(cur, "current")
        t = args.get("t")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1e11:
            raise ProtocolError("bad_request", "'t' must be a time in seconds since the epoch")
        keys = [f"pred:{d}:{model}", f"pred:{FLEET}:{model}", f"hints:{d}"]
        mine, fleet, hints = self.store.get_many(keys)
        mine = msgpack.unpackb(mine) if mine else P.new_state()
        fleet = msgpack.unpackb(fleet) if fleet else P.new_state()
        hints = msgpack.unpackb(hints) if hints else {}
        if cur is not None and mine["last"] != cur:
            mine["last"] = cur                  # a switch the server did not hear of
        P.observe(mine, task, t)
        P.observe(fleet, task, t)
        ranked = P.blend(mine, fleet, task, t, exclude=task)
        hints[model] = ranked
        self.store.put_many({keys[0]: msgpack.packb(mine), keys[1]: msgpack.packb(fleet),
                             keys[2]: msgpack.packb(hints)})
        seq = self.store.incr(f"seq:{d}")
        self.counters["switches"] += 1
        return {"seq": seq, "model": model, "hints": ranked}

    def _kv_keys(self, args: dict) -> list[str]:
        self._device(args)
        model, names = _hex(args.get("model"), "model"), args.get("names")
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_NAMES:
            raise ProtocolError("bad_request", f"'names' must be a list of 1 to {MAX_NAMES}")
        return [f"kv:{model}:{_hex(n, 'name')}" for n in names]

    def _kv_lookup(self, args: dict) -> dict:
        return {"sizes": self.store.sizes(self._kv_keys(args))}

    def _kv_get(self, args: dict) -> dict:
        got = self.store.get_many(self._kv_keys(args))
        return {"chunks": [None if g is None else np.frombuffer(g, np.uint8) for g in got]}

    def _kv_put(self, args: dict) -> dict:
        d = self._device(args)
        model, name = _hex(args.get("model"), "model"), _hex(args.get("name"), "name")
        chunk = args.get("chunk")
        if not isinstance(chunk, np.ndarray) or chunk.dtype != np.uint8 or chunk.ndim != 1 \
                or not 0 < chunk.size <= MAX_CHUNK:
            raise ProtocolError("bad_request", f"'chunk' must be a uint8 array of 1 to "
                                f"{MAX_CHUNK} bytes")
        used = self.store.incr(f"kvq:{d}", chunk.size)
        if used > self.kv_quota:
            self.store.incr(f"kvq:{d}", -chunk.size)
            return {"stored": False, "why": "quota"}
        self.store.put(f"kv:{model}:{name}", chunk.tobytes(), ttl_s=KV_TTL_S)
        return {"stored": True}

    def _stats(self, args: dict) -> dict:
        return {"endpoint": self.endpoint, "live_devices": sorted(self.live),
                "counters": dict(self.counters), "store": self.store.stats(),
                **({"packs": self.packs.stats()} if self.packs is not None else {})}


def _hex(v, what: str) -> str:
    if not isinstance(v, str) or not HEX.fullmatch(v):
        raise ProtocolError("bad_request", f"{what} must be 1 to 64 lowercase hex digits")
    return v


def _name(v, what: str) -> str:
    if not isinstance(v, str) or not v or len(v.encode()) > MAX_NAME:
        raise ProtocolError("bad_request", f"{what} must be a string of 1 to {MAX_NAME} bytes")
    return v
