"""The device service's discipline (issue 17), in process over real sockets: work bound to
a live caller, caps per caller and per service, reload and unload that drain, one service
per endpoint, packs loaded only from --pack-dir. Slow work is held by events, not timed."""
from __future__ import annotations

import threading
import time

import pytest
import zmq

pytest.importorskip("transformers")

import edgert
from edgert.config import ServiceLimits
from edgert.control import protocol as P
from edgert.control.client import RemoteError
from edgert.control.service import Service
from edgert.errors import ConfigError
from task_packs import assert_matches, tiny  # noqa: F401  (tiny is a fixture)
from test_control_service import WAIT, Served, config, gate_generate, lm_pack  # noqa: F401


def until(cond, what: str, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    return s


def replies(sock: zmq.Socket, n: int, keep=lambda r: not r.beat) -> list:
    """The next ``n`` replies on ``sock`` that ``keep`` takes (beats skipped)."""
    out = []
    while len(out) < n:
        assert sock.poll(WAIT * 1000), f"{len(out)} of {n} replies"
        r = P.decode_reply(sock.recv_multipart())
        if keep(r):
            out.append(r)
    return out


# --- work for nobody ---------------------------------------------------------------------------
def test_a_caller_that_disconnects_leaves_no_job_behind(tiny, lm_pack):
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0",
               limits=ServiceLimits(max_tokens_per_client=16000, max_tokens=16000))
    try:
        gate, made = threading.Event(), []
        gate_generate(s.lm, gate, made)
        sock = dealer(s.endpoint)
        for rid in range(16):                       # one running, 15 queued in its lane
            sock.send_multipart(P.encode_request(rid, "generate",
                                                 {"prompt": [1], "max_new_tokens": 1000}))
        with s.client() as c:
            until(lambda: c.health()["jobs"] == 16, "16 jobs admitted")
            sock.close()                            # the caller vanishes
            t0 = time.monotonic()
            # the 15 queued go at once; the running one is held inside its token by the gate
            until(lambda: c.health()["jobs"] == 1, "queued jobs of a gone caller dropped", 5)
            gone_after = time.monotonic() - t0
            gate.set()                              # it ends at its next token
            until(lambda: c.health()["jobs"] == 0, "the running job cancelled", 5)
            st = c.stats()["service"]
        assert gone_after < 2.0, gone_after
        assert st["disconnects"] == 1 and st["orphaned"]["jobs"] == 16
        assert len(made) <= 3, made
        until(lambda: s.idle(), "service idle")
    finally:
        s.close()


def replies_until_busy(sock: zmq.Socket, n: int) -> list:
    out = replies(sock, n, keep=lambda r: not r.ok)
    assert all(r.code == "busy" for r in out), out
    return out


# --- caps ----------------------------------------------------------------------------------------
def test_caps_per_caller_and_per_service_answer_busy_before_any_work(tiny, lm_pack):
    lim = ServiceLimits(max_jobs_per_client=3, max_jobs=4, max_tokens_per_client=100,
                        max_tokens=150)
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0", limits=lim)
    try:
        gate, made = threading.Event(), []
        gate_generate(s.lm, gate, made)
        a, b = dealer(s.endpoint), dealer(s.endpoint)
        send = lambda sock, rid, n: sock.send_multipart(  # noqa: E731
            P.encode_request(rid, "generate", {"prompt": [1], "max_new_tokens": n}))
        send(a, 1, 60)
        send(a, 2, 60)                              # 120 > 100 tokens of one caller
        r = replies(a, 2)
        running = [x for x in r if x.ok]
        busy = [x for x in r if not x.ok]
        assert len(running) == 1 and busy[0].code == "busy" and busy[0].id == 2
        assert busy[0].retry_after_s and busy[0].retry_after_s > 0
        assert "tokens" in busy[0].message
        send(a, 3, 500)                             # never admissible for one caller
        assert replies(a, 1)[0].code == "too_large"
        send(b, 1, 80)                              # 60 + 80 <= 150 service tokens
        send(b, 2, 20)                              # 160 > 150
        r = {x.id: x for x in replies(b, 2) if not x.ok or x.more}
        assert r[2].code == "busy" and "service" in r[2].message
        for rid in (4, 5):                          # jobs: a holds 1 stream; 2 infers fit
            a.send_multipart(P.encode_request(rid, "health", {}))
        st = s.svc.stats_of_service()
        assert st["caps"]["client_tokens"] == 1 and st["caps"]["service_tokens"] == 1
        assert made == [0, 0]                       # nothing ran for what was refused
        gate.set()
        a.close()
        b.close()
        until(lambda: s.idle(), "service idle")
    finally:
        s.close()


def test_the_job_caps_count_per_caller_and_for_the_service(tiny, lm_pack):
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0",
               limits=ServiceLimits(max_jobs_per_client=2, max_jobs=3))
    try:
        gate, made = threading.Event(), []
        gate_generate(s.lm, gate, made)
        socks = [dealer(s.endpoint) for _ in range(3)]
        for sock in socks:                          # in order: 2 + 1 admitted, 6 refused
            for rid in range(3):
                sock.send_multipart(P.encode_request(rid, "generate", {
                    "prompt": [1], "max_new_tokens": 5}))
            with s.client() as c:
                c.health()                          # every earlier message was taken
        busy = {i: [r.id for r in replies_until_busy(sock, want)]
                for i, (sock, want) in enumerate(zip(socks, (1, 2, 3)))}
        assert busy == {0: [2], 1: [1, 2], 2: [0, 1, 2]}, busy
        caps = s.svc.stats_of_service()["caps"]
        assert caps["client_jobs"] == 1 and caps["service_jobs"] == 5, caps
        with s.client() as c:                       # a full service can still be read
            assert c.stats()["service"]["caps"]["service_jobs"] == 5
        gate.set()
        for sock in socks:
            sock.close()
        until(lambda: s.idle(), "service idle")
    finally:
        s.close()


def test_a_many_frame_message_is_refused_with_its_id(tiny, lm_pack):
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0")
    try:
        sock = dealer(s.endpoint)
        frames = P.encode_request(77, "health", {})
        sock.send_multipart([*frames, *([b"x"] * (P.MAX_ARRAYS + 1))])
        r = replies(sock, 1)[0]
        assert r.code == "too_large" and r.id == 77
        sock.close()
    finally:
        s.close()


# --- reload and unload drain ---------------------------------------------------------------------
def _streams(s, n: int, made: list):
    clients = [s.client() for _ in range(n)]
    streams = [c.generate([1], max_new_tokens=6, stream=True) for c in clients]
    for st in streams:
        assert next(st) == 1                         # all running, held by the gate
    return clients, streams


@pytest.mark.parametrize("op", ["reload", "unload"])
def test_reload_and_unload_under_four_streams_let_them_finish(tiny, lm_pack, op):
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0", workers=5)   # 4 held streams + 1
    try:
        gate, made = threading.Event(), []
        gate_generate(s.lm, gate, made)
        clients, streams = _streams(s, 4, made)
        out = {}
        admin = s.client()
        t = threading.Thread(target=lambda: out.update(
            r=admin.reload("lm") if op == "reload" else admin.unload("lm")))
        t.start()
        if op == "reload":                           # new requests go to the new model
            until(lambda: s.svc.table.get("lm") is not s.lm, "swapped")
            with s.client() as c:
                assert isinstance(c.generate([1, 2], max_new_tokens=3), list)
        else:
            until(lambda: "lm" not in s.svc.table.names(), "taken out of service")
            with s.client() as c, pytest.raises(RemoteError) as e:
                c.generate([1], max_new_tokens=3)
            assert e.value.code == "unknown_model"
        assert not s.lm.closed                       # the old one is held by the streams
        gate.set()
        for st in streams:
            assert list(st) == [2, 3, 4, 5, 6]       # every stream finished, none closed
        t.join(WAIT)
        assert out["r"]["drained"] == 4 and out["r"]["retired"] == 0
        assert s.lm.closed
        for c in [*clients, admin]:
            c.close()
    finally:
        s.close()


def test_streams_past_the_drain_timeout_end_reloaded(tiny, lm_pack):
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0",
               limits=ServiceLimits(drain_timeout_s=0.3))
    try:
        gate, made = threading.Event(), []
        gate_generate(s.lm, gate, made)
        clients, streams = _streams(s, 2, made)
        with s.client() as admin:
            t = threading.Thread(target=admin.reload, args=("lm",))
            t.start()
            until(lambda: s.svc.table.get("lm") is not s.lm, "swapped")
            time.sleep(0.5)                          # past the drain timeout
            gate.set()                               # the streams take their next step
            t.join(WAIT)
        for st in streams:
            with pytest.raises(RemoteError) as e:
                list(st)
            assert e.value.code == "reloaded" and "send it again" in str(e.value)
        assert s.lm.closed
        for c in clients:
            c.close()
    finally:
        s.close()


# --- endpoints and paths -------------------------------------------------------------------------
def test_one_service_per_endpoint(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rt = edgert.Runtime(config())
    try:
        first = Service(rt).start()                  # the default ipc endpoint
        with pytest.raises(ConfigError, match="another service listens there"):
            Service(rt)
        tcp = Service(rt, "tcp://127.0.0.1:0").start()
        with pytest.raises(ConfigError, match="address already in use") as e:
            Service(rt, tcp.endpoint)
        assert len(str(e.value).splitlines()) == 1
        with pytest.raises(ConfigError, match="loopback only"):
            Service(rt, "tcp://0.0.0.0:0")
        from edgert.control.client import Client
        with Client(first.endpoint, timeout=WAIT) as c:
            assert c.health()["status"] == "ok"      # the first still answers
        first.close()
        tcp.close()
    finally:
        rt.close()


def test_load_takes_packs_only_from_the_pack_dirs(tiny, lm_pack, tmp_path):
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0", pack_dirs=[])
    try:
        with s.client() as c:
            with pytest.raises(RemoteError) as e:
                c.load(tiny.pack, name="again")
            assert e.value.code == "forbidden" and "--pack-dir" in str(e.value)
            with pytest.raises(RemoteError) as e:
                c.reload("tasks", path="/etc/passwd")
            assert e.value.code == "forbidden" and "root:" not in str(e.value)
            d = c.reload("tasks")                    # its own pack: always allowed
            assert d["drained"] == 0
            assert_matches(c.infer({"image": tiny.x}, task="lane")["logits"], tiny.ref["lane"])
    finally:
        s.close()


# --- memory at rest ----------------------------------------------------------------------------
def test_the_heap_is_trimmed_once_the_service_is_idle_not_while_it_works(tiny, lm_pack,
                                                                          monkeypatch):
    from edgert.control import service as service_mod
    trims = []
    monkeypatch.setattr(service_mod, "give_back_heap", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(service_mod, "TRIM_IDLE_S", 0.1)
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0")
    try:
        gate, made = threading.Event(), []
        gate_generate(s.lm, gate, made)
        sock = dealer(s.endpoint)
        sock.send_multipart(P.encode_request(1, "generate", {"prompt": [1], "max_new_tokens": 3}))
        assert replies(sock, 1)[0].ok                 # the first piece: the job is at work
        time.sleep(0.4)
        assert trims == []                             # never while a job runs
        gate.set()
        until(lambda: len(trims) == 1, "one trim after the work ended")
        replies(sock, 1, keep=lambda r: not r.beat and not r.more)   # the stream's end
        time.sleep(0.4)
        assert len(trims) == 1                         # once per idle spell, not per poll
        assert s.svc.stats_of_service()["heap_trims"] == 1
        sock.close()
    finally:
        s.close()


def test_the_heap_arena_cap_leaves_an_operators_setting_alone(monkeypatch):
    from edgert import heap
    if heap._MALLOPT is None:
        pytest.skip("not glibc: no mallopt")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert heap.cap_heap_arenas(2) is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert heap.cap_heap_arenas(8) is True             # glibc's own default per core is 8
