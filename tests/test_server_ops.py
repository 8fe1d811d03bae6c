"""The fleet server's ops against its store: round trips per request, the fleet's
predictor folded in across servers, the per-device KV quota."""
from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
from fleet_helpers import redis_url  # noqa: F401  (fixture)

import zmq

from edgert.control.protocol import decode_reply, encode_request
from edgert.server.service import FLEET, FleetServer
from edgert.server.backends import open_store
from edgert.server.store import Store


class Counting(Store):
    """A store that counts the calls that would each be one round trip to Redis."""

    def __init__(self, inner: Store):
        self.inner, self.spec, self.calls = inner, inner.spec, []

    def __getattribute__(self, name):
        if name in ("get_many", "sizes", "put_many", "delete", "keys", "incr", "charge",
                    "put_incr", "merge", "get", "put"):
            inner = object.__getattribute__(self, "inner")
            object.__getattribute__(self, "calls").append(name)
            return getattr(inner, name)
        return object.__getattribute__(self, name)

    get_many = sizes = put_many = delete = keys = incr = charge = stats = None


def serving(store) -> FleetServer:
    """A server whose ops are called directly (no loop thread); devices marked live."""
    srv = FleetServer(store, "tcp://127.0.0.1:0")
    for d in ("d1", "d2"):
        srv._register({"device": d})
    return srv


def switch(srv, d, task, t, cur=None):
    return srv._switch({"device": d, "model": "m1", "task": task, "t": t, "current": cur})


def test_a_switch_report_is_one_round_trip_and_a_beat_none(tmp_path):
    store = Counting(open_store(f"dir:{tmp_path / 's'}"))
    srv = serving(store)
    try:
        switch(srv, "d1", "a", 1.7e9)                    # the first of a model reads its state
        store.calls.clear()
        for i in range(10):
            rep = switch(srv, "d1", "ab"[i % 2], 1.7e9 + 60 * i)
        assert store.calls == ["put_incr"] * 10 and rep["seq"] == 11
        store.calls.clear()
        assert srv._beat({"device": "d1"}) == {"seq": 11}
        assert srv._snapshot({"device": "d1"})["seq"] == 11
        assert store.calls == []
        srv._kv_lookup({"device": "d1", "model": "ab", "names": ["01", "02", "03"]})
        assert store.calls == ["sizes"]
    finally:
        srv._close()


def test_a_burst_of_requests_is_one_redis_round_trip_answered_in_order(redis_url, monkeypatch):  # noqa: F811,E501
    from edgert.server import redisstore
    runs = []
    real = redisstore.RedisBatch.run
    monkeypatch.setattr(redisstore.RedisBatch, "run", lambda b: (runs.append(len(b)), real(b)))
    srv = serving(open_store(redis_url))
    runs.clear()                                     # registering made two (empty) ones
    sent = []
    monkeypatch.setattr(srv, "_send", lambda ident, frames: sent.append(
        (ident, decode_reply([zmq.Frame(f) if isinstance(f, bytes) else f for f in frames]))))
    names = ["01", "02"]
    burst = [("d1", "switch", {"model": "m1", "task": "a", "t": 1.7e9, "current": None}),
             ("d1", "beat", {}),
             ("d2", "kv_lookup", {"model": "ab", "names": names}),
             ("d1", "switch", {"model": "m1", "task": "b", "t": 1.7e9 + 60, "current": "a"}),
             ("d1", "snapshot", {}),
             ("d2", "switch", {"model": "m1", "task": "", "t": 1.7e9, "current": None})]
    try:
        srv.store.put("kv:ab:02", b"xyz")
        for i, (d, op, args) in enumerate(burst):
            srv._serve([zmq.Frame(d.encode()),
                        *map(zmq.Frame, encode_request(i, op, {"device": d, **args}))])
        assert sent == [] and runs == []             # nothing made or answered yet
        srv._settle()
        assert runs == [2 * 3 + 2]                   # two switches' writes and a look-up
        reps = [r for _, r in sent]
        assert [r.id for r in reps] == list(range(6))
        assert [r.ok for r in reps] == [True] * 5 + [False]       # a bad one, in its place
        assert reps[0].result["seq"] == 1 and reps[1].result == {"seq": 1}   # as of then
        assert reps[2].result == {"sizes": [None, 3]} and reps[3].result["seq"] == 2
        assert reps[4].result["seq"] == 2 and reps[4].result["hints"]["m1"]
        srv._serve([zmq.Frame(b"d1"), *map(zmq.Frame, encode_request(9, "hello", {}))])
        assert runs == [8] and sent[-1][1].ok        # an op not queued answers at once
    finally:
        srv._close()


def test_two_servers_fold_their_devices_into_one_fleet_predictor(redis_url):  # noqa: F811
    a, b = serving(open_store(redis_url)), serving(open_store(redis_url))
    try:
        for i in range(20):                      # d1 on a, d2 on b: both alternate x, y
            switch(a, "d1", "xy"[i % 2], 1.7e9 + 60 * i)
            switch(b, "d2", "xy"[i % 2], 1.7e9 + 60 * i)
        a._flush_fleet()
        b._flush_fleet()
        a._flush_fleet()                         # a takes in what b folded in
        st = msgpack.unpackb(a.store.get(f"pred:{FLEET}:m1"))
        assert st["n"] == 40 and a._fleet["m1"]["n"] == 40
        # each device's own transitions, never one device's task "followed" by another's
        assert set(st["trans"]) == {"x", "y"} and set(st["trans"]["x"]) == {"y"}
        # a server restarted on the store carries on from every switch the others reported
        c = serving(open_store(redis_url))
        c._register({"device": "d3"})
        rep = switch(c, "d3", "x", 1.7e9 + 1300)
        assert rep["hints"][0][0] == "y"
        c._close()
    finally:
        a._close()
        b._close()


@pytest.mark.parametrize("kind", ["dir", "redis"])
def test_the_kv_quota_refuses_past_it_and_a_new_window_starts_again(kind, tmp_path, request):
    spec = request.getfixturevalue("redis_url") if kind == "redis" else f"dir:{tmp_path / 's'}"
    srv = serving(open_store(spec))
    srv.kv_quota, srv.kv_window_s = 3000, 0.5
    chunk = np.ones(1000, np.uint8)

    def put(d, name):
        return srv._kv_put({"device": d, "model": "ab", "name": name, "chunk": chunk})
    try:
        assert [put("d1", f"{i:02x}")["stored"] for i in range(4)] == [True] * 3 + [False]
        assert put("d1", "10") == {"stored": False, "why": "quota"}
        assert srv.store.get("kv:ab:10") is None          # nothing of a refused chunk kept
        assert put("d2", "11")["stored"]                   # per device
        time.sleep(0.8)                                    # the window is over
        assert put("d1", "12")["stored"]
        assert srv._kv_get({"device": "d2", "model": "ab", "names": ["00", "12", "03"]})[
            "chunks"][2] is None
    finally:
        srv._close()
        srv.store.close()


def test_concurrent_charges_never_pass_the_quota(redis_url):  # noqa: F811
    """Two server processes charging one device at once (an INCR-then-undo would let one
    see the other's overshoot and refuse wrongly, or both pass)."""
    stores = [open_store(redis_url) for _ in range(4)]
    took = []

    def charge(s):
        took.extend(s.charge("kvq:d", 7, 700, 60) for _ in range(50))
    ts = [threading.Thread(target=charge, args=(s,)) for s in stores]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert took.count(True) == 100 and stores[0].get("kvq:d") == b"700"
    for s in stores:
        s.close()
