"""The device service over real sockets on loopback (ipc and tcp): every op end to end
against the in-process API, many clients at once, malformed traffic, a slow stream beside
fast requests, cancel, the per-client cap, unload / reload. No test depends on timing:
slow work is held by events, and timeouts are generous."""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time

import msgpack
import numpy as np
import pytest
from pathlib import Path
import zmq

pytest.importorskip("transformers")

import edgert
from edgert.config import DeviceConfig
from edgert.control import protocol as P
from edgert.control.client import Client, RemoteError
from edgert.control.service import Service
from edgert.pack.hf_import import pack_hf
from moe_models import mixtral_config, save
from task_packs import assert_matches, tiny  # noqa: F401  (tiny is a fixture)

MiB = 1 << 20
WAIT = 60           # seconds: only a broken service takes this long


def config() -> DeviceConfig:
    return DeviceConfig.from_dict({
        "name": "test-control", "threads": 1, "storage": {"read_mode": "buffered"},
        "memory": {"total": 72 * MiB, "engine": 8 * MiB, "experts": 0, "kv": 0}})


@pytest.fixture(scope="module")
def lm_pack(tmp_path_factory):
    """A tiny Mixtral with a byte vocabulary (so text prompts work)."""
    d = save(mixtral_config(vocab_size=256), tmp_path_factory.mktemp("moe") / "ckpt")
    pack = d.parent / "lm.edgepack"
    pack_hf(d, pack, progress=False)
    return pack


@pytest.fixture
def short_dir():
    d = tempfile.mkdtemp(prefix="edgert-t")      # ipc paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Served:
    def __init__(self, tiny, lm_pack, endpoint, **kw):
        self.rt = edgert.Runtime(config())
        self.m = self.rt.load(tiny.pack, name="tasks", prepack="off")
        self.lm = self.rt.load(lm_pack, name="lm", expert_budget=1.0)
        kw.setdefault("pack_dirs", [Path(tiny.pack).parent, Path(lm_pack).parent])
        self.svc = Service(self.rt, endpoint, models={"tasks": self.m, "lm": self.lm},
                           **kw).start()
        self.endpoint = self.svc.endpoint

    def client(self, **kw) -> Client:
        kw.setdefault("timeout", WAIT)
        return Client(self.endpoint, **kw)

    def close(self):
        self.svc.close()
        self.rt.close()

    def idle(self) -> bool:
        """Whether the service holds no job, lane or client state (checked on its loop's
        state after it answered: a health reply comes after every earlier request)."""
        s = self.svc
        return not (s._jobs or s._lanes or s._inflight or s._by_request or s._queued_bytes)


@pytest.fixture(params=["ipc", "tcp"])
def served(request, tiny, lm_pack, short_dir):
    ep = f"ipc://{short_dir}/s.sock" if request.param == "ipc" else "tcp://127.0.0.1:0"
    s = Served(tiny, lm_pack, ep)
    yield s
    s.close()


@pytest.fixture
def served_tcp(tiny, lm_pack):
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0")
    yield s
    s.close()


def gate_generate(lm, gate: threading.Event, made: list):
    """Make lm.generate (as the service calls it) yield one piece, then wait for ``gate``
    before each further piece: a generation that is slow for as long as a test needs."""
    def generate(prompt, max_new_tokens=64, **kw):
        def pieces():
            for i in range(max_new_tokens):
                if i:
                    assert gate.wait(WAIT)
                made.append(i)
                yield i + 1
        return pieces()
    lm.generate = generate


# --- every op ----------------------------------------------------------------------------------
def test_every_op_end_to_end_equals_the_in_process_api(served, tiny):
    m, lm = served.m, served.lm
    with served.client() as c:
        assert c.health()["status"] == "ok"
        h = c.hello()
        assert h["protocol"] == P.PROTOCOL and h["version"] == edgert.__version__
        models = {d["name"]: d for d in h["models"]}
        assert models["tasks"]["kind"] == "tasks" and models["lm"]["kind"] == "moe"
        assert models["tasks"]["tasks"] == m.tasks
        assert models["tasks"]["inputs"] == {"image": {"dtype": "float32",
                                                       "shape": ["N", 3, 32, 32]}}
        assert models["tasks"]["outputs"] == m.engine.outputs

        sw = c.switch("lane")
        assert sw["task"] == "lane" and m.active == "lane" and sw["blocks_moved"] > 0
        out = c.infer({"image": tiny.x})
        assert_matches(out["logits"], tiny.ref["lane"])
        for t in tiny.names:                  # infer with a task: switch + run, atomic
            out = c.infer({"image": tiny.x}, task=t, model="tasks")
            assert_matches(out["logits"], tiny.ref[t])
            np.testing.assert_array_equal(out["logits"], m.run({"image": tiny.x}, task=t)
                                          ["logits"])
        pw = c.prewarm(["sign", "detect"])
        assert pw == m.prewarm(["sign", "detect"]) | {"bytes_read": pw["bytes_read"]}

        ids = [5, 17, 42, 99]
        assert c.generate(ids, max_new_tokens=8) == lm.generate(ids, max_new_tokens=8)
        assert c.generate("import os\n", max_new_tokens=8, model="lm") == \
            lm.generate("import os\n", max_new_tokens=8)
        pieces = list(c.generate("def f", max_new_tokens=6, stream=True))
        assert "".join(pieces) == lm.generate("def f", max_new_tokens=6)
        sampled = c.generate(ids, max_new_tokens=6, temperature=0.8, seed=3, top_p=0.9)
        assert sampled == lm.generate(ids, max_new_tokens=6, temperature=0.8, seed=3,
                                      top_p=0.9)

        st = c.stats()
        assert st["service"]["requests"] >= 10 and st["models"] == {"tasks": "tasks",
                                                                     "lm": "lm"}
        arena = st["runtime"]["arena"]
        assert arena["in_use_bytes"] == sum(x["bytes"] for x in arena["holders"].values())
        assert c.stats("tasks")["name"] == "tasks" and c.stats("lm")["kind"] == "moe"

        # errors come back typed, with the request's code
        with pytest.raises(edgert.UnknownTask):
            c.infer({"image": tiny.x}, task="nope")
        with pytest.raises(edgert.InputMismatch):
            c.infer({"image": tiny.x.astype(np.float64)})
        with pytest.raises(edgert.InputMismatch):
            c.infer({"picture": tiny.x})
        with pytest.raises(RemoteError) as e:
            c.switch("lane", model="nope")
        assert e.value.code == "unknown_model" and "tasks" in str(e.value)
        with pytest.raises(RemoteError) as e:
            c.generate([1], model="tasks")
        assert e.value.code == "bad_request"
        with pytest.raises(ValueError):                     # out of range, refused before work
            c.generate([1], max_new_tokens=0)
        with pytest.raises(ValueError):
            c.generate([300])                                # ids past the vocabulary
        assert m.active in tiny.names and c.health()["status"] == "ok"

        # unload returns memory (shown by stats); load brings the model back
        before = c.stats()["runtime"]["arena"]["in_use_bytes"]
        un = c.unload("tasks")
        after = c.stats()["runtime"]
        assert un["freed_bytes"] > 0 and after["arena"]["in_use_bytes"] == before - \
            un["freed_bytes"]
        assert [x["name"] for x in after["models"]] == ["lm"]
        with pytest.raises(RemoteError) as e:
            c.infer({"image": tiny.x})
        assert e.value.code == "unknown_model"
        d = c.load(tiny.pack, name="tasks", prepack="off")
        assert d["kind"] == "tasks" and d["tasks"] == tiny.names
        assert_matches(c.infer({"image": tiny.x}, task="sign")["logits"], tiny.ref["sign"])
        with pytest.raises(RemoteError) as e:
            c.load(tiny.pack, name="tasks")
        assert e.value.code == "bad_request"              # the name is taken
        with pytest.raises(RemoteError) as e:
            c.load(tiny.pack, name="t2", provider="x")
        assert e.value.code == "bad_request"              # an option that cannot travel
        assert c.health()["status"] == "ok"
    assert served.idle()


def test_unknown_ops_wrong_versions_and_bad_envelopes_over_the_wire(served):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(served.endpoint)

    def ask(frames):
        s.send_multipart(frames)
        assert s.poll(WAIT * 1000)
        return P.decode_reply(s.recv_multipart())

    r = ask(P.encode_request(1, "frobnicate", {}))
    assert (r.id, r.ok, r.code) == (1, False, "unknown_op") and "health" in r.message
    r = ask([msgpack.packb({"v": 9, "id": 2, "op": "health", "args": {}})])
    assert (r.id, r.code) == (2, "version")
    r = ask([b"\xff\x00garbage"])
    assert (r.id, r.code) == (None, "bad_request")
    r = ask(P.encode_request(3, "health", {"extra": 1}))
    assert (r.id, r.code) == (3, "bad_request")
    r = ask(P.encode_request(4, "cancel", {"id": 12345}))
    assert r.ok and r.result == {"cancelled": False}
    s.close()


# --- many clients ------------------------------------------------------------------------------
def test_16_clients_200_mixed_commands_every_reply_matched(served_tcp, tiny):
    lm_ref = served_tcp.lm.generate([7, 8, 9], max_new_tokens=2)
    failures: list = []
    counts = [0] * 16

    def client(k: int):
        rng = random.Random(k)
        try:
            with served_tcp.client() as c:
                for _ in range(200):
                    r = rng.random()
                    if r < 0.4:
                        assert c.health()["status"] == "ok"
                    elif r < 0.75:
                        t = rng.choice(tiny.names)
                        assert_matches(c.infer({"image": tiny.x}, task=t)["logits"],
                                       tiny.ref[t])
                    elif r < 0.85:
                        t = rng.choice(tiny.names)
                        assert c.switch(t)["task"] == t
                    elif r < 0.93:
                        assert c.stats()["service"]["requests"] > 0
                    else:
                        assert c.generate([7, 8, 9], max_new_tokens=2) == lm_ref
                    counts[k] += 1
        except BaseException as e:       # noqa: BLE001  (reported below, with its thread)
            failures.append((k, e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert counts == [200] * 16
    with served_tcp.client() as c:
        assert c.stats()["service"]["replies_dropped"] == 0
        c.health()
    assert served_tcp.idle()


# --- malformed traffic -------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malformed(rng: random.Random, x: np.ndarray) -> list:
    """One malformed request, of many kinds; each deserves exactly one error reply."""
    k = rng.randrange(12)
    rid = rng.randrange(1 << 40)
    arr = {"__nd__": 0, "dtype": "float32", "shape": list(x.shape)}
    if k == 0:
        return [rng.randbytes(rng.randrange(1, 200)) for _ in range(rng.randrange(1, 4))]
    if k == 1:
        return [msgpack.packb({"v": rng.choice([0, 2, "1", None]), "id": rid, "op": "health",
                               "args": {}})]
    if k == 2:
        return P.encode_request(rid, rng.choice(["", "Health", "rm -rf", "x" * 300, "load2"]),
                                {})
    if k == 3:     # huge declared sizes
        shape = rng.choice([[1 << 40], [1 << 20, 1 << 20, 1 << 20], [2, 3, 1 << 62]])
        return [msgpack.packb({"v": 1, "id": rid, "op": "infer", "args": {"inputs": {
            "image": {"__nd__": 0, "dtype": "float32", "shape": shape}}}}), b"\0" * 64]
    if k == 4:     # truncated arrays
        return [msgpack.packb({"v": 1, "id": rid, "op": "infer",
                               "args": {"inputs": {"image": arr}}}),
                x.tobytes()[:rng.randrange(x.nbytes)]]
    if k == 5:     # wrong types for every field of real ops
        op, args = rng.choice([
            ("infer", {"inputs": 5}), ("infer", {"inputs": {"image": [1, 2]}}),
            ("infer", {"inputs": {}, "task": 3}), ("switch", {"task": ["lane"]}),
            ("switch", {}), ("switch", {"task": "lane", "model": 7}),
            ("generate", {"prompt": []}), ("generate", {"prompt": [1], "max_new_tokens": -1}),
            ("generate", {"prompt": [1], "max_new_tokens": 10 ** 9}),
            ("generate", {"prompt": [1], "temperature": float("nan")}),
            ("generate", {"prompt": [True]}), ("prewarm", {"tasks": "lane"}),
            ("cancel", {"id": "x"}), ("stats", {"model": b"tasks"}),
            ("load", {"path": "/x", "options": {"provider": 1}}),
            ("unload", {"name": ""}), ("reload", {"name": None})])
        return P.encode_request(rid, op, args)
    if k == 6:     # real ops, unknown names
        return P.encode_request(rid, "switch", {"task": rng.choice(["nope", "LANE", "lane "])})
    if k == 7:     # inputs that do not fit the graph
        bad = rng.choice([x.astype(np.float16), x[:, :2], x.reshape(2, 3, 1024),
                          np.zeros((2, 3, 32, 32), np.int64)])
        return P.encode_request(rid, "infer", {"inputs": {"image": bad}})
    if k == 8:     # frames not named, or named twice
        return [*P.encode_request(rid, "health", {}), b"extra"]
    if k == 9:
        return [msgpack.packb({"v": 1, "id": rid, "op": "infer", "args": {
            "inputs": {"image": arr, "b": arr}}}), x.tobytes()]
    if k == 10:    # ext types, bad UTF-8, deep nesting
        return [rng.choice([msgpack.packb({"v": 1, "id": rid, "op": "x",
                                           "args": {"a": msgpack.ExtType(1, b"z")}}),
                            b"\x84\xa1v\x01\xa2id\x01\xa2op\xa2\xff\xfe\xa4args\x80",
                            msgpack.packb({"v": 1, "id": rid, "op": "x",
                                           "args": {"a": [[[[[[[[[[[1]]]]]]]]]]]}})])]
    return [P.encode_request(rid, "health", {})[0][:rng.randrange(1, 20)]]


def test_fuzz_thousands_of_malformed_messages_then_health(tiny, lm_pack, short_dir):
    s = Served(tiny, lm_pack, f"ipc://{short_dir}/f.sock", max_message=1 * MiB)
    try:
        ctx = zmq.Context.instance()
        rng = random.Random(0)
        x = tiny.x
        socks = [ctx.socket(zmq.DEALER) for _ in range(4)]
        for sk in socks:
            sk.linger = 0
            sk.connect(s.endpoint)
        rss0 = None
        sent = got = 0
        for round_ in range(30):
            for i in range(100):                       # 100 in flight, then read the replies
                socks[i % 4].send_multipart(_malformed(rng, x))
                sent += 1
            for i in range(100):
                sk = socks[i % 4]
                assert sk.poll(WAIT * 1000), f"no reply to message {sent - 100 + i}"
                rep = P.decode_reply(sk.recv_multipart())
                assert not rep.ok and rep.code in P.CODES
                got += 1
            if round_ == 4:
                rss0 = _rss()                          # after warm-up of allocator pools
            # peers that send and vanish without reading their replies
            gone = ctx.socket(zmq.DEALER)
            gone.linger = 0
            gone.connect(s.endpoint)
            for _ in range(5):
                gone.send_multipart(_malformed(rng, x))
            gone.close()
        # a frame over ZMQ_MAXMSGSIZE: libzmq drops that peer; nothing else changes
        big = ctx.socket(zmq.DEALER)
        big.linger = 0
        big.connect(s.endpoint)
        big.send_multipart([b"\0" * (2 * MiB)])
        assert not big.poll(300)
        big.close()
        assert got == sent == 3000
        with s.client() as c:
            assert c.health()["status"] == "ok"
            assert_matches(c.infer({"image": x}, task="lane")["logits"], tiny.ref["lane"])
            st = c.stats()["service"]
        assert sum(st["errors"].values()) >= 3000
        assert s.idle()
        assert _rss() - rss0 < 64 * MiB
        for sk in socks:
            sk.close()
    finally:
        s.close()


# --- streams: slow beside fast, cancel, the per-client cap -------------------------------------
def test_a_slow_generate_never_delays_health_stats_or_another_clients_infer(served_tcp, tiny):
    gate, made = threading.Event(), []
    gate_generate(served_tcp.lm, gate, made)
    with served_tcp.client() as a, served_tcp.client() as b:
        stream = a.generate([1, 2], max_new_tokens=5, stream=True)
        assert next(stream) == 1                     # the stream is running, and held
        for _ in range(20):
            assert b.health()["status"] == "ok"
            assert a.health()["jobs"] >= 1           # same client, other ops: not queued
        assert b.stats()["service"]["jobs"] >= 1
        assert_matches(b.infer({"image": tiny.x}, task="sign")["logits"], tiny.ref["sign"])
        assert_matches(a.infer({"image": tiny.x}, task="lane")["logits"], tiny.ref["lane"])
        assert made == [0]                           # all of that while the stream waited
        gate.set()
        assert list(stream) == [2, 3, 4, 5]
    assert served_tcp.idle()


def test_closing_a_stream_cancels_it_and_the_cap_answers_busy(tiny, lm_pack):
    s = Served(tiny, lm_pack, "tcp://127.0.0.1:0", max_inflight_per_client=2)
    try:
        gate, made = threading.Event(), []
        gate_generate(s.lm, gate, made)
        with s.client() as c:
            first = c.generate([1], max_new_tokens=1000, stream=True)
            assert next(first) == 1
            second = c.generate([1], max_new_tokens=3, stream=True)   # queued behind first
            with pytest.raises(RemoteError) as e:
                next(c.generate([1], max_new_tokens=3, stream=True))
            assert e.value.code == "busy"
            assert c.health()["status"] == "ok"         # loop ops are not capped
            first.close()                                # sends cancel
            assert c.health()["status"] == "ok"         # after the cancel, on one socket
            gate.set()
            assert list(second) == [1, 2, 3]
            assert c.health()["jobs"] == 0
        assert len(made) < 1000 and s.idle()
    finally:
        s.close()


def test_a_stream_closed_before_it_is_read_is_cancelled(served_tcp):
    gate, made = threading.Event(), []
    gate_generate(served_tcp.lm, gate, made)
    with served_tcp.client() as c:
        stream = c.generate([1], max_new_tokens=1000, stream=True)     # sent at once
        stream.close()                                                  # never read: cancel
        assert c.health()["status"] == "ok"           # the cancel arrived before this
        gate.set()
        while c.health()["jobs"]:                     # until the cancelled job ends
            time.sleep(0.01)
        assert len(made) < 1000
        with c.generate([1], max_new_tokens=3, stream=True) as again:   # the client goes on
            assert list(again) == [1, 2, 3]
    assert served_tcp.idle()


def test_cancel_of_a_queued_request_answers_at_once_and_ids_at_work_are_unique(served_tcp):
    gate, made = threading.Event(), []
    gate_generate(served_tcp.lm, gate, made)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(served_tcp.endpoint)
    s.send_multipart(P.encode_request(1, "generate", {"prompt": [1], "max_new_tokens": 50}))
    s.send_multipart(P.encode_request(2, "generate", {"prompt": [1], "max_new_tokens": 50}))
    replies = []

    def until(pred):
        while not pred():
            assert s.poll(WAIT * 1000)
            rep = P.decode_reply(s.recv_multipart())
            if not rep.beat:
                replies.append(rep)

    until(lambda: any(r.id == 1 for r in replies))           # 1 runs, 2 waits in its lane
    s.send_multipart(P.encode_request(1, "generate", {"prompt": [1], "max_new_tokens": 50}))
    until(lambda: any(r.id == 1 and r.code == "bad_request" for r in replies))
    s.send_multipart(P.encode_request(3, "cancel", {"id": 2}))
    until(lambda: any(r.id == 3 for r in replies))
    r2 = [r for r in replies if r.id == 2]
    assert len(r2) == 1 and r2[0].code == "cancelled" and not r2[0].more
    assert next(r for r in replies if r.id == 3).result == {"cancelled": True}
    s.send_multipart(P.encode_request(4, "cancel", {"id": 1}))
    until(lambda: any(r.id == 4 for r in replies))            # the flag is set: release
    gate.set()
    until(lambda: any(r.id == 1 and r.code == "cancelled" for r in replies))
    assert len(made) < 50
    s.close()


# --- reload ------------------------------------------------------------------------------------
def test_reload_failing_leaves_the_old_model_serving_and_succeeding_swaps(served_tcp, tiny,
                                                                          tmp_path):
    bad = tmp_path / "bad.edgepack"
    bad.write_bytes(tiny.pack.read_bytes()[:8192])        # a truncated pack
    outside = tmp_path.parent / "outside.edgepack"
    outside.write_bytes(b"SECRET!!" + bytes(8192))
    link = tmp_path / "link.edgepack"
    link.symlink_to(outside)                              # inside by name, outside in fact
    served_tcp.svc.table.pack_dirs.append(tmp_path.resolve())
    with served_tcp.client() as c:
        c.switch("sign")
        mem0 = c.stats()["runtime"]["arena"]["in_use_bytes"]
        for path, code in ((bad, "pack_corrupt"), (tmp_path / "missing.edgepack", "forbidden"),
                           (tmp_path, "forbidden"), (outside, "forbidden"),
                           (link, "forbidden")):
            with pytest.raises(RemoteError) as e:
                c.reload("tasks", path=path)
            assert e.value.code == code, e.value
            assert "SECRET" not in str(e.value) and "\\x00" not in str(e.value)
            assert_matches(c.infer({"image": tiny.x})["logits"], tiny.ref["sign"])
            assert c.stats()["runtime"]["arena"]["in_use_bytes"] == mem0
        with pytest.raises(RemoteError) as e:
            c.reload("nope")
        assert e.value.code == "unknown_model"

        copy = tiny.copy_pack(tmp_path)
        d = c.reload("tasks", path=copy)
        assert d["path"] == str(copy) and d["tasks"] == tiny.names
        hello = {m["name"]: m for m in c.hello()["models"]}
        assert hello["tasks"]["path"] == str(copy)
        for t in tiny.names:
            assert_matches(c.infer({"image": tiny.x}, task=t)["logits"], tiny.ref[t])
        st = c.stats()["runtime"]
        assert sorted(m["name"] for m in st["models"]) == sorted(["lm", d["label"]])
        assert served_tcp.m.closed                       # the old model gave its memory back
        d = c.reload("tasks")                            # the same pack again
        assert_matches(c.infer({"image": tiny.x}, task="lane")["logits"], tiny.ref["lane"])
