"""`edgert server` processes killed, restarted and doubled on one Redis, with device runtimes
serving on; the server's protocol fuzzed."""
from __future__ import annotations

import signal
import time
import threading

import msgpack
import pytest
import zmq
from fleet_helpers import free_port, redis_url, server_process, wait_for  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st
from task_packs import assert_matches, config, tiny  # noqa: F401  (tiny is a fixture)

import edgert
from edgert.control.protocol import ProtocolError, decode_reply, encode_request
from edgert.server.service import FleetServer
from edgert.server.backends import open_store
from edgert.server.store import WriteBehind


def top(rt, fp: str) -> str | None:
    """The task the device's latest hint ranks first."""
    h = rt.fleet.hints.get(fp)
    return h[0][0] if h else None


def learn(m, rounds: int = 3) -> None:
    for _ in range(rounds):
        m.switch("lane")
        m.switch("detect")


def test_a_killed_server_leaves_devices_serving_and_a_restart_keeps_the_predictor(tmp_path,
                                                                                   tiny):
    port = free_port()
    store = f"dir:{tmp_path / 'store'}"
    srv = server_process(store, port)
    ep = f"tcp://127.0.0.1:{port}"
    a = edgert.Runtime(config(), server=ep, device_id="a")
    b = edgert.Runtime(config(), server=ep, device_id="b")
    try:
        ma, mb = a.load(tiny.pack, name="t", task="detect"), b.load(tiny.pack, name="t")
        assert wait_for(lambda: a.stats()["server"]["connected"]
                        and b.stats()["server"]["connected"])
        learn(ma)
        fp = a.fleet.fingerprint(ma)
        assert wait_for(lambda: top(a, fp) == "lane")
        seq = a.fleet.seq
        time.sleep(2 * WriteBehind.FLUSH_S)   # a crash loses at most the last FLUSH_S
        srv.send_signal(signal.SIGKILL)       # mid-run: no goodbye
        srv.wait(5)
        for t in tiny.names * 2:              # both devices serve every request, exact
            assert_matches(ma.run({"image": tiny.x}, task=t)["logits"], tiny.ref[t])
            assert_matches(mb.run({"image": tiny.x}, task=t)["logits"], tiny.ref[t])
        assert wait_for(lambda: not a.stats()["server"]["connected"], timeout=5)
        srv = server_process(store, port)     # restarted on the same store
        assert wait_for(lambda: a.stats()["server"]["connected"], timeout=8)
        # the snapshot on re-registering carries what the old process learnt
        assert a.fleet.seq >= seq and a.fleet.hints[fp]
        c = edgert.Runtime(config(), server=ep, device_id="c")
        mc = c.load(tiny.pack, name="t", task="detect")
        assert wait_for(lambda: top(c, fp) == "lane")  # the fleet's
        assert mc.active == "detect"
        c.close()
    finally:
        a.close()
        b.close()
        srv.terminate()
        srv.wait(5)


def test_two_server_processes_on_one_redis(redis_url, tiny):  # noqa: F811
    p1, p2 = free_port(), free_port()
    s1, s2 = server_process(redis_url, p1), server_process(redis_url, p2)
    rt = edgert.Runtime(config(), server=f"tcp://127.0.0.1:{p1},tcp://127.0.0.1:{p2}",
                        device_id="fleet-car")
    try:
        m = rt.load(tiny.pack, name="t", task="detect")
        learn(m)
        fp = rt.fleet.fingerprint(m)
        assert wait_for(lambda: top(rt, fp) == "lane")
        seq = rt.fleet.seq
        s1.send_signal(signal.SIGKILL)
        s1.wait(5)
        assert wait_for(lambda: not rt.stats()["server"]["connected"], timeout=5)
        assert wait_for(lambda: rt.stats()["server"]["connected"], timeout=8)   # on s2
        m.switch("lane")
        assert wait_for(lambda: rt.fleet.seq == seq + 1)      # numbering carried on in Redis
        assert rt.fleet.hints[fp][0][0] == "detect"           # and the transitions
        assert_matches(m.run({"image": tiny.x})["logits"], tiny.ref["lane"])
    finally:
        rt.close()
        for s in (s1, s2):
            s.kill()
            s.wait(5)


# --- the protocol, fuzzed -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet_server(tmp_path_factory):
    store = open_store(f"dir:{tmp_path_factory.mktemp('fuzz')}")
    srv = FleetServer(store, "tcp://127.0.0.1:0", heartbeat_s=60)
    yield srv
    srv._close()
    store.close()


values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                      | st.binary(max_size=8),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                          max_size=3),
                      max_leaves=8)
arg_maps = st.dictionaries(st.sampled_from(["device", "packs", "budgets", "model", "task", "t",
                                            "current", "x"]), values, max_size=6)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["register", "beat", "switch", "snapshot", "hello", "stats"]), arg_maps)
def test_fuzz_op_arguments(fleet_server, op, args):
    """Any argument map gets a result or a ProtocolError with a code; never anything else."""
    fleet_server.live["d"] = 1e18                # a registered device to aim at
    if isinstance(args.get("device"), str):
        fleet_server.live[args["device"]] = 1e18
    try:
        out = fleet_server._ops[op](args)
    except ProtocolError as e:
        assert e.code in ("bad_request", "unregistered")
    else:
        assert isinstance(out, dict)
        msgpack.packb(out)


@pytest.fixture(scope="module")
def wire(fleet_server):
    t = threading.Thread(target=fleet_server.run, daemon=True)
    t.start()
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(fleet_server.endpoint)
    yield s
    s.close()
    fleet_server.stop()
    t.join(5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=48), min_size=1, max_size=3))
def test_fuzz_frames_on_the_socket(wire, frames):
    """Garbage on the wire: the server answers each with an error and keeps serving."""
    wire.send_multipart(frames)
    assert wire.poll(3000)
    assert not decode_reply(wire.recv_multipart()).ok
    wire.send_multipart(encode_request(7, "hello", {}))
    assert wire.poll(3000)
    rep = decode_reply(wire.recv_multipart())
    assert rep.ok and rep.id == 7
