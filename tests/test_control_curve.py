"""CurveZMQ on the device service: allowed keys get in, unknown keys and plain-text clients
receive nothing, admin-only ops are limited to the admin keys."""
from __future__ import annotations

import os
import stat

import pytest
import zmq

import edgert
from edgert.config import DeviceConfig
from edgert.control.auth import generate, public_keys
from edgert.control.client import Client, RemoteError, ServiceUnavailable
from edgert.control.service import Service
from edgert.errors import ConfigError
from task_packs import assert_matches, tiny  # noqa: F401  (tiny is a fixture)

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
MiB = 1 << 20


@pytest.fixture
def keys(tmp_path):
    """server, alice (allowed, admin), bob (allowed), mallory (unknown)."""
    allow, admin, own = tmp_path / "allow", tmp_path / "admin", tmp_path / "own"
    server = generate(own, "server")
    alice = generate(own, "alice")
    bob = generate(own, "bob")
    mallory = generate(own, "mallory")
    allow.mkdir()
    admin.mkdir()
    (allow / "bob.key").write_bytes(bob[0].read_bytes())
    (admin / "alice.key").write_bytes(alice[0].read_bytes())   # admins are allowed too
    return {"server": server, "alice": alice, "bob": bob, "mallory": mallory,
            "allow": allow, "admin": admin}


@pytest.fixture
def curve_service(tiny, keys):
    rt = edgert.Runtime(DeviceConfig.from_dict({
        "name": "test-curve", "threads": 1,
        "memory": {"total": 24 * MiB, "engine": 8 * MiB, "experts": 0, "kv": 0}}))
    m = rt.load(tiny.pack, name="tasks", prepack="off")
    svc = Service(rt, "tcp://127.0.0.1:0", models={"tasks": m},
                  curve_secret=keys["server"][1], allow_dir=keys["allow"],
                  admin_dir=keys["admin"]).start()
    yield svc
    svc.close()
    rt.close()


def client(svc, keys, who, **kw) -> Client:
    kw.setdefault("timeout", 30)
    return Client(svc.endpoint, curve=(keys["server"][0], keys[who][1]), **kw)


def test_key_files(keys):
    pub, sec = keys["alice"]
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert "secret-key" in sec.read_text() and "secret-key" not in pub.read_text()
    with pytest.raises(ConfigError):
        generate(pub.parent, "alice")                   # never overwrites
    with pytest.raises(ConfigError):
        public_keys(keys["allow"].parent / "nowhere")
    assert len(public_keys(keys["allow"])) == 1


def test_allowed_keys_get_in_and_admin_ops_are_for_admins(curve_service, keys, tiny):
    with client(curve_service, keys, "bob") as bob, client(curve_service, keys, "alice") as al:
        assert bob.health()["status"] == "ok"
        assert_matches(bob.infer({"image": tiny.x}, task="lane")["logits"], tiny.ref["lane"])
        for op, args in (("unload", ("tasks",)), ("load", (tiny.pack,)),
                         ("reload", ("tasks",)), ("shutdown", ())):
            with pytest.raises(RemoteError) as e:
                getattr(bob, op)(*args)
            assert e.value.code == "forbidden"
        assert bob.health()["status"] == "ok"           # refused, and nothing changed
        assert al.reload("tasks")["tasks"] == tiny.names
        assert al.stats()["service"]["curve"] is True
        assert al.shutdown() == {"stopping": True}
    assert curve_service.wait(30)


@pytest.mark.parametrize("who", ["mallory", "plain", "wrong server key"])
def test_unknown_keys_and_plain_text_clients_receive_nothing(curve_service, keys, who):
    if who == "plain":
        c = Client(curve_service.endpoint, timeout=0.5, retries=0)
    elif who == "wrong server key":
        c = Client(curve_service.endpoint, timeout=0.5, retries=0,
                   curve=(keys["bob"][0], keys["bob"][1]))
    else:
        c = client(curve_service, keys, who, timeout=0.5, retries=0)
    with c, pytest.raises(ServiceUnavailable):
        c.health()
    with client(curve_service, keys, "bob") as bob:      # and the service goes on
        assert bob.health()["status"] == "ok"
        assert bob.stats()["service"]["requests"] == 2


def test_a_frame_of_exactly_the_limit_gets_in_over_curve(tiny, keys):
    """libzmq checks ZMQ_MAXMSGSIZE on the encrypted frame, a few bytes longer than the
    plain one: a frame of max_message bytes must still be taken."""
    rt = edgert.Runtime(DeviceConfig.from_dict({
        "name": "test-curve-limit", "threads": 1,
        "memory": {"total": 24 * MiB, "engine": 8 * MiB, "experts": 0, "kv": 0}}))
    m = rt.load(tiny.pack, name="tasks", prepack="off")
    x = tiny.x
    svc = Service(rt, "tcp://127.0.0.1:0", models={"tasks": m}, max_message=x.nbytes,
                  curve_secret=keys["server"][1], allow_dir=keys["allow"]).start()
    try:
        assert svc.limits()["max_message"] == x.nbytes
        with client(svc, keys, "bob", timeout=10) as bob:
            assert_matches(bob.infer({"image": x}, task="lane")["logits"], tiny.ref["lane"])
    finally:
        svc.close()
        rt.close()
