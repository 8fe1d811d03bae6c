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

Round trips to the store: a live device's seq, hints and predictors are kept in memory
(a device talks to one server at a time; they are read afresh when it registers) and
written through; beat, switch, snapshot and kv_lookup put their store calls in one batch
per burst of requests (``Store.batch``: one Redis pipeline) answered in order once it has
run. The fleet-wide predictor is folded in every ``WriteBehind.FLUSH_S`` (``Store.merge``,
atomic across servers), so a killed server loses at most that long of the fleet's
learning, never a device's.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

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
BURST = 256              # requests taken at once; their store calls made in one round trip
COPY_BELOW = 64 << 10    # a reply smaller than this is copied into its message (faster)
MAX_NAME = 128           # bytes of a device id, model fingerprint or task name
MAX_PACKS = 64
MAX_TASKS = 1024
DEVICE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
FLEET = "fleet"          # the scope name of the fleet-wide predictor
KV_TTL_S = 7 * 24 * 3600    # a KV chunk nobody wrote again for a week expires
KV_QUOTA = 256 << 20     # bytes of KV chunks one device may publish per KV_TTL_S window
                         # (from its first chunk; a chunk published again counts again)
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
        # NOTE: a live device's seq, hints and predictors are kept here (it talks to one
        # server at a time) and written through; read afresh when it registers
        self._cache: dict[str, Live] = {}
        self._fleet: dict[str, dict] = {}       # model -> fleet predictor (merged at flush)
        self._fleet_news: dict[str, list] = {}  # model -> switches not yet folded in
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
        self._queued = {"beat": self._q_beat, "switch": self._q_switch,
                        "snapshot": self._q_snapshot, "kv_lookup": self._q_kv_lookup}
        self._batch = None          # the burst's store calls (Store.batch), made by _settle
        self._pending: list = []    # (ident, request, getter) answered by _settle
        self.kv_quota, self.kv_window_s = KV_QUOTA, KV_TTL_S
        self.packs = None
        if packs is not None:
            from .packs import PackShelf
            try:
                self.packs = PackShelf(packs[0], packs[1], self.store)
            except BaseException:
                self._close()
                raise
            self._ops.update(self.packs.ops())      # not batched: each runs after the burst

    # --- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        flushed = time.monotonic()
        try:
            while not self._stop:
                if self._router.poll(POLL_MS):
                    for _ in range(BURST):             # a burst, then housekeeping
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._serve(frames)
                    self._settle()
                self._purge()
                if time.monotonic() - flushed >= WriteBehind.FLUSH_S:
                    self._flush()
                    flushed = time.monotonic()
        finally:
            self._flush()
            self._close()

    def _flush(self) -> None:
        try:
            self._flush_fleet()
            if isinstance(self.store, WriteBehind):
                self.store.flush()
        except Exception as e:       # NOTE: a full disk or a Redis gone: keep serving
            log.warning("store: cannot write back: %s: %s", type(e).__name__, e)

    def stop(self) -> None:
        self._stop = True

    def _serve(self, frames: list) -> None:
        """Answer one request. Ops in ``_queued`` put their store calls in the burst's
        batch and are answered by ``_settle`` (one round trip for the burst); any other op
        settles the batch first, so every request sees the ones before it done."""
        ident, body = frames[0].bytes, frames[1:]
        self.counters["requests"] += 1
        try:
            req = decode_request(body)
        except ProtocolError as e:
            self.counters["errors"] += 1
            return self._reply(ident, None, e)
        except Exception as e:       # NOTE: a decoder bug must not end the server
            self.counters["errors"] += 1
            log.warning("undecodable request: %s: %s", type(e).__name__, e)
            return self._reply(ident, None, ProtocolError("bad_request",
                                                          "undecodable request"))
        try:
            queued = self._queued.get(req.op)
            if queued is not None:
                if self._batch is None:
                    self._batch = self.store.batch()
                self._pending.append((ident, req, queued(req.args, self._batch)))
                return
            op = self._ops.get(req.op)
            if op is None:
                raise ProtocolError("unknown_op", f"unknown op {req.op!r}; known: "
                                    f"{', '.join(self._ops)}")
            self._settle()
            out = op(req.args)
        except Exception as e:       # NOTE: a bad request or a store fault; the loop goes on
            return self._reply(ident, req, e)
        self._answer(ident, req, out)

    def _reply(self, ident: bytes, req, out) -> None:
        """Answer now, or after the requests queued before it (replies keep their order)."""
        if self._pending:
            self._pending.append((ident, req, lambda: out))
        else:
            self._answer(ident, req, out)

    def _settle(self) -> None:
        """Make the batch's store calls (one round trip) and answer the requests waiting."""
        batch, pending, self._batch, self._pending = self._batch, self._pending, None, []
        if batch is not None:
            batch.run()
        for ident, req, get in pending:
            try:
                out = get()
            except Exception as e:   # NOTE: the store failed this request; the loop goes on
                out = e
            self._answer(ident, req, out)        # (an error queued in order is returned)

    def _answer(self, ident: bytes, req, out) -> None:
        """Send ``out``: a result, or an exception as a one-line error."""
        if not isinstance(out, Exception):
            return self._send(ident, encode_reply(req.id, out))
        if req is None:
            return self._send(ident, encode_error(failure_id(out), out.code, out.message))
        self.counters["errors"] += 1
        code = error_code(out)
        if code == "internal":
            log.warning("op %s failed: %s: %s", req.op, type(out).__name__, out)
        self._send(ident, encode_error(req.id, code, str(out) if not isinstance(
            out, ProtocolError) else out.message))

    def _send(self, ident: bytes, frames: list) -> None:
        try:
            # NOTE: zero-copy only pays for large frames (KV chunks); a small reply sent
            # without copying cost ~20 us of the ~130 us a request took (profiled)
            big = len(frames) > 1 or len(frames[0]) > COPY_BELOW
            self._router.send_multipart([ident, *frames], zmq.NOBLOCK, copy=not big)
        except zmq.ZMQError:          # a gone or stalled peer: it will ask again
            pass

    def _purge(self) -> None:
        dead = time.monotonic() - LIVENESS * self.heartbeat_s
        for d in [d for d, t in self.live.items() if t < dead]:
            del self.live[d]
            self._cache.pop(d, None)
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
        self._cache.pop(d, None)        # NOTE: read afresh: another server may have served it
        return {"heartbeat_s": self.heartbeat_s, "snapshot": self._snapshot(args)}

    def _direct(self, queued, args: dict) -> dict:
        """A queued op made at once (register's snapshot; callers outside the loop)."""
        batch = self.store.batch()
        get = queued(args, batch)
        batch.run()
        return get()

    def _beat(self, args: dict) -> dict:
        return self._direct(self._q_beat, args)

    def _snapshot(self, args: dict) -> dict:
        return self._direct(self._q_snapshot, args)

    def _switch(self, args: dict) -> dict:
        return self._direct(self._q_switch, args)

    def _kv_lookup(self, args: dict) -> dict:
        return self._direct(self._q_kv_lookup, args)

    # NOTE: a queued op reads what it needs now and answers after the batch has run, from
    # the live device's state as it then is (a beat after a switch in one burst names the
    # switch's number)
    def _q_beat(self, args: dict, batch):
        st = self._state(self._device(args))
        return lambda: {"seq": st.seq}

    def _q_snapshot(self, args: dict, batch):
        st = self._state(self._device(args))
        return lambda: {"seq": st.seq, "hints": st.hints}

    def _state(self, d: str) -> Live:
        """A live device's small state, read from the store at its first request here."""
        st = self._cache.get(d)
        if st is None:
            seq, hints = self.store.get_many([f"seq:{d}", f"hints:{d}"])
            st = self._cache[d] = Live(int(seq or b"0"), msgpack.unpackb(hints) if hints else {})
        return st

    def _q_switch(self, args: dict, batch):
        d = self._device(args)
        model, task = _name(args.get("model"), "model"), _name(args.get("task"), "task")
        cur = args.get("current")
        cur = None if cur is None else _name(cur, "current")
        t = args.get("t")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1e11:
            raise ProtocolError("bad_request", "'t' must be a time in seconds since the epoch")
        st = self._state(d)
        mine, fleet = st.pred.get(model), self._fleet.get(model)
        if mine is None or fleet is None:       # the first switch of this model here
            got = self.store.get_many([f"pred:{d}:{model}", f"pred:{FLEET}:{model}"])
            if mine is None:
                mine = st.pred[model] = _state_of(got[0])
            if fleet is None:
                fleet = self._fleet[model] = _state_of(got[1])
        if cur is not None and mine["last"] != cur:
            mine["last"] = cur                  # a switch the server did not hear of
        prev = mine["last"]
        P.observe(mine, task, t)
        P.observe(fleet, task, t, prev=prev)
        self._fleet_news.setdefault(model, []).append((task, t, prev))
        ranked = P.blend(mine, fleet, task, t, exclude=task)
        st.hints[model] = ranked
        # NOTE: no round trip of its own: the device's state is written through in the
        # burst's batch (a server taking the device over reads it); the fleet's is folded
        # in at the next flush (_flush_fleet)
        get = batch.put_incr({f"pred:{d}:{model}": msgpack.packb(mine),
                              f"hints:{d}": msgpack.packb(st.hints)}, {f"seq:{d}": 1})
        self.counters["switches"] += 1

        def reply():
            st.seq = get()[f"seq:{d}"]
            return {"seq": st.seq, "model": model, "hints": ranked}
        return reply

    def _flush_fleet(self) -> None:
        """Fold the switches reported here since the last flush into the stored fleet-wide
        predictors (atomically: other servers on the store fold theirs in too) and take the
        merged states as ours; re-read the others."""
        news, self._fleet_news = self._fleet_news, {}
        for model, obs in news.items():
            def fold(old, obs=obs):
                st = _state_of(old)
                for task, t, prev in obs:
                    P.observe(st, task, t, prev=prev)
                return msgpack.packb(st)
            self._fleet[model] = _state_of(self.store.merge(f"pred:{FLEET}:{model}", fold))
        quiet = [m for m in self._fleet if m not in news]     # what other servers learnt
        if quiet:
            for m, raw in zip(quiet, self.store.get_many([f"pred:{FLEET}:{m}" for m in quiet])):
                self._fleet[m] = _state_of(raw)

    def _kv_keys(self, args: dict) -> list[str]:
        self._device(args)
        model, names = _hex(args.get("model"), "model"), args.get("names")
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_NAMES:
            raise ProtocolError("bad_request", f"'names' must be a list of 1 to {MAX_NAMES}")
        return [f"kv:{model}:{_hex(n, 'name')}" for n in names]

    def _q_kv_lookup(self, args: dict, batch):
        get = batch.sizes(self._kv_keys(args))
        return lambda: {"sizes": get()}

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
        if not self.store.charge(f"kvq:{d}", chunk.size, self.kv_quota, self.kv_window_s):
            return {"stored": False, "why": "quota"}
        self.store.put(f"kv:{model}:{name}", chunk.tobytes(), ttl_s=KV_TTL_S)
        return {"stored": True}

    def _stats(self, args: dict) -> dict:
        return {"endpoint": self.endpoint, "live_devices": sorted(self.live),
                "counters": dict(self.counters), "store": self.store.stats(),
                **({"packs": self.packs.stats()} if self.packs is not None else {})}


@dataclass
class Live:
    """What the server keeps of a live device between its requests."""
    seq: int
    hints: dict
    pred: dict = field(default_factory=dict)    # model -> the device's predictor state


def _state_of(raw: bytes | None) -> dict:
    return P.upgrade(msgpack.unpackb(raw)) if raw else P.new_state()


def _hex(v, what: str) -> str:
    if not isinstance(v, str) or not HEX.fullmatch(v):
        raise ProtocolError("bad_request", f"{what} must be 1 to 64 lowercase hex digits")
    return v


def _name(v, what: str) -> str:
    if not isinstance(v, str) or not v or len(v.encode()) > MAX_NAME:
        raise ProtocolError("bad_request", f"{what} must be a string of 1 to {MAX_NAME} bytes")
    return v
