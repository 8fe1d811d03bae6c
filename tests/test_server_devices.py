"""A fleet server and device runtimes on loopback: registration, heartbeats, hints."""
from __future__ import annotations

import numpy as np
import pytest
import zmq
from fleet_helpers import ServerThread, wait_for
from task_packs import assert_matches, config, tiny  # noqa: F401  (tiny is a fixture)

import edgert
from edgert.control.protocol import decode_reply, encode_request
from edgert.errors import ConfigError
from edgert.server.backends import open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(f"dir:{tmp_path / 'store'}")
    yield s
    s.close()


@pytest.fixture
def server(store):
    srv = ServerThread(store)
    yield srv
    srv.stop()


def device(srv_endpoint: str, name: str) -> edgert.Runtime:
    return edgert.Runtime(config(), server=srv_endpoint, device_id=name)


def call(endpoint: str, op: str, args: dict):
    """One request on a socket of its own; the decoded reply."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    try:
        s.send_multipart(encode_request(1, op, args))
        assert s.poll(5000), f"no reply to {op}"
        return decode_reply(s.recv_multipart())
    finally:
        s.close()


def test_a_device_registers_with_its_packs_and_beats(server, tiny):
    with device(server.endpoint, "cam-1") as rt:
        m = rt.load(tiny.pack, name="tasks")
        assert wait_for(lambda: rt.stats()["server"]["connected"])
        assert "cam-1" in server.srv._stats({})["live_devices"]
        reg = call(server.endpoint, "stats", {}).result
        assert reg["counters"]["requests"] >= 1
        assert_matches(m.run({"image": tiny.x}, task="lane")["logits"], tiny.ref["lane"])
        beats = server.srv.counters["requests"]
        assert wait_for(lambda: server.srv.counters["requests"] >= beats + 3)   # heartbeats
    # closed: silent, so the server forgets it after 3 heartbeats
    assert wait_for(lambda: "cam-1" not in server.srv.live, timeout=3)
    assert server.srv.counters["forgotten"] == 1


def test_no_server_is_one_stats_shape_and_bad_endpoints_are_config_errors():
    with edgert.Runtime(config()) as rt:
        st = rt.stats()["server"]
        assert st["connected"] is False and st["hints_received"] == 0
    with pytest.raises(ConfigError, match="expected tcp://HOST:PORT"):
        edgert.Runtime(config(), server="http://x")
    with edgert.Runtime(config(), server="") as rt:      # "" overrides a config's server
        assert rt.fleet is None


def test_heartbeat_loss_and_recovery_on_a_restarted_server(tmp_path, tiny):
    store = open_store(f"dir:{tmp_path / 's'}")
    srv = ServerThread(store)
    port = srv.endpoint.rpartition(":")[2]
    with device(srv.endpoint, "cam-2") as rt:
        m = rt.load(tiny.pack, name="tasks")
        assert wait_for(lambda: rt.stats()["server"]["connected"])
        srv.stop()
        assert wait_for(lambda: not rt.stats()["server"]["connected"], timeout=4)
        for t in tiny.names:             # the device serves on, exact, with no server
            assert_matches(m.run({"image": tiny.x}, task=t)["logits"], tiny.ref[t])
        srv = ServerThread(store, bind=f"tcp://127.0.0.1:{port}")
        assert wait_for(lambda: rt.stats()["server"]["connected"], timeout=6)
        assert "cam-2" in srv.srv.live
        assert rt.stats()["server"]["link"]["reconnects"] >= 1
    srv.stop()
    store.close()


def test_a_prediction_is_pushed_and_prewarms_the_next_task(server, tiny):
    a = device(server.endpoint, "car-a")
    ma = a.load(tiny.pack, name="tasks", task="detect")
    for _ in range(4):                   # the fleet learns: detect is followed by sign
        ma.switch("sign")
        ma.switch("detect")
    a.close()                            # flushes its reports
    b = device(server.endpoint, "car-b")
    mb = b.load(tiny.pack, name="tasks", task="detect")
    assert wait_for(lambda: b.stats()["server"]["prewarmed_bytes"] > 0)
    st = b.stats()["server"]
    assert st["hints_received"] >= 1
    hint = b.fleet.hints[b.fleet.fingerprint(mb)]
    assert hint[0][0] == "sign" and hint[0][1] > 0.5
    res = mb.switch("sign")
    assert res.from_storage == 0 and res.from_cache > 0          # served from memory
    st = b.stats()["server"]
    assert st["hints_used"] == 1
    assert st["unused_prewarm_bytes"] < st["prewarmed_bytes"]
    assert_matches(mb.run({"image": tiny.x})["logits"], tiny.ref["sign"])
    b.close()


def test_a_missed_update_brings_a_snapshot(server, tiny):
    with device(server.endpoint, "bot-1") as rt:
        m = rt.load(tiny.pack, name="tasks", task="detect")
        assert wait_for(lambda: rt.fleet.seq == 1)      # the load's switch: update 1
        snaps = rt.fleet.counters["snapshots"]
        # an update this device never hears of (another server process, a lost reply)
        fp = rt.fleet.fingerprint(m)
        r = call(server.endpoint, "switch", {"device": "bot-1", "model": fp, "task": "lane",
                                             "t": 1.7e9, "current": "detect"})
        assert r.ok and r.result["seq"] == 2
        # its next beat names seq 2: the device asks for a snapshot
        assert wait_for(lambda: rt.fleet.seq == 2 and rt.fleet.counters["snapshots"] > snaps)
        snap = server.srv._snapshot({"device": "bot-1"})
        assert snap["seq"] == 2
        assert [list(h) for h in rt.fleet.hints[fp]] == snap["hints"][fp]   # made after "lane"


def test_a_lying_server_changes_no_output(server, tiny):
    """Hints naming unknown tasks or absurd probabilities only decide what sits in spare
    slots: outputs stay exact."""
    with device(server.endpoint, "liar") as rt:
        m = rt.load(tiny.pack, name="tasks")
        assert wait_for(lambda: rt.stats()["server"]["connected"])
        fp = rt.fleet.fingerprint(m)
        rt.fleet._snapshot({"seq": 9, "hints": {fp: [["nope", 5.0], ["parking", -1]],
                                                "x": "junk"}})
        rt.fleet._hint(fp, [("lane", 1.0)])
        for t in tiny.names:
            assert_matches(m.run({"image": tiny.x}, task=t)["logits"], tiny.ref[t])


def test_a_request_stops_a_hinted_prewarm(tiny):
    with edgert.Runtime(config()) as rt:
        m = rt.load(tiny.pack, name="tasks", task="detect")
        calls = []

        def stop():
            calls.append(1)
            return len(calls) > 1        # a request arrives after the first turn
        got = m.prewarm_weighted([("lane", 0.6), ("sign", 0.4)], stop=stop)
        assert 0 < len(got) <= 8         # one turn of PREWARM_STEP blocks, then it stopped
        full = m.prewarm_weighted([("lane", 0.6), ("sign", 0.4)])
        assert len(full) > 0 and not set(full) & set(got)
        assert np.array_equal(m.run({"image": tiny.x}, task="lane")["logits"],
                              m.run({"image": tiny.x})["logits"])


def test_serve_with_a_server_registers_and_a_clean_stop_flushes(server, tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from fleet_helpers import ROOT, free_port
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "edgert", "serve", "--pack", f"t={tiny.pack}",
                          "--bind", f"tcp://127.0.0.1:{free_port()}", "--server",
                          server.endpoint, "--device-id", "svc-1"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert "ready on" in p.stdout.readline()
        assert wait_for(lambda: "svc-1" in server.srv.live, timeout=8)
        assert wait_for(lambda: server.srv.counters["switches"] >= 1)   # its load's task
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0


@pytest.mark.parametrize("argv, says", [
    (["--store", "foo"], "expected dir:PATH or redis://"),
    (["--store", "dir:"], "needs a path"),
    (["--store", "redis://127.0.0.1:1/0"], "cannot reach Redis"),
    (["--bind", "tcp://0.0.0.0:5"], "loopback only"),
    (["--bind", "nope"], "expected ipc://PATH"),
    (["--curve-secret", "x"], "go together"),
    (["--heartbeat", "0"], "--heartbeat must be"),
])
def test_every_wrong_argument_of_edgert_server_is_one_line(argv, says, capsys):
    from edgert.cli import main
    assert main(["server", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_a_curve_server_admits_allowed_devices_only(store, tiny, tmp_path):
    import shutil
    import threading

    from edgert.control.auth import generate
    from edgert.server.service import FleetServer
    own, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    srv_pub, srv_sec = generate(own, "server")
    car_pub, car_sec = generate(own, "car")
    _, eve_sec = generate(own, "eve")
    shutil.copy(car_pub, allow)
    srv = FleetServer(store, "tcp://127.0.0.1:0", curve_secret=srv_sec, allow_dir=allow,
                      heartbeat_s=0.2)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        with edgert.Runtime(config(), server=srv.endpoint, device_id="car",
                            server_curve=(srv_pub, car_sec)) as car, \
                edgert.Runtime(config(), server=srv.endpoint, device_id="eve",
                               server_curve=(srv_pub, eve_sec)) as eve, \
                edgert.Runtime(config(), server=srv.endpoint, device_id="plain") as plain:
            assert wait_for(lambda: car.stats()["server"]["connected"])
            m = eve.load(tiny.pack, name="t")              # refused devices serve on
            assert_matches(m.run({"image": tiny.x}, task="lane")["logits"], tiny.ref["lane"])
            assert not eve.stats()["server"]["connected"]
            assert not plain.stats()["server"]["connected"]
            assert srv.live.keys() == {"car"}
    finally:
        srv.stop()
        t.join(5)


def test_a_hinted_prewarm_keeps_the_wanted_blocks_it_already_holds(tiny):
    with edgert.Runtime(config(weights=500 * 1024 + 80 * 4096)) as rt:
        m = rt.load(tiny.pack, name="tasks", task="detect", prepack="off")
        m.switch("lane")                 # detect's blocks kept in spare slots, then lane's
        m.switch("sign")                 # (newer): a full cache, detect's the oldest
        sw, blocks = m.switcher, m.reader.blocks
        assert sw.cache.pool.try_alloc(reclaim=False) is None     # full
        before = {b for b in range(len(blocks)) if sw.cache.contains(blocks[b].hash)}
        want = set(sw.plan([("parking", 0.6), ("detect", 0.4)])[0])
        kept = want & before
        assert kept and want - before    # some wanted blocks held, some to read
        got = m.prewarm_weighted([("parking", 0.6), ("detect", 0.4)])
        assert not set(got) & before     # nothing it held was read again
        assert set(got) == want - before
        assert all(sw.cache.contains(blocks[b].hash) for b in want)
