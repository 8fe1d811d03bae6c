"""What a new user tripped on, each fixed: a typed error that says what to do, a useful
``repr``, a client that gives up on a missing service in seconds, and the protocol facts
docs/protocol.md states (checked against a real service on loopback)."""
from __future__ import annotations

import socket

import msgpack
import numpy as np
import pytest
import zmq

pytest.importorskip("transformers")

import edgert
from edgert.cli import main
from edgert.config import DeviceConfig
from edgert.control.client import RETRIES, TIMEOUT_S, Client, ServiceUnavailable
from edgert.control.service import Service
from edgert.errors import ConfigError, EdgertError, InputMismatch
from edgert.pack.hf_import import pack_hf
from moe_models import mixtral_config, save
from task_packs import tiny  # noqa: F401  (tiny is a fixture)

MiB = 1 << 20


def config() -> DeviceConfig:
    return DeviceConfig.from_dict({
        "name": "first-use", "threads": 1, "storage": {"read_mode": "buffered"},
        "memory": {"total": 72 * MiB, "engine": 8 * MiB, "experts": 0, "kv": 0}})


@pytest.fixture(scope="module")
def lm_pack(tmp_path_factory):
    """A tiny Mixtral with a byte vocabulary (text prompts work) and a short context."""
    d = save(mixtral_config(vocab_size=256, max_position_embeddings=128),
             tmp_path_factory.mktemp("moe") / "ckpt")
    pack = d.parent / "lm.edgepack"
    pack_hf(d, pack, progress=False)
    return pack


@pytest.mark.parametrize("budget", [2, 100, 4095])
def test_expert_budget_small_int_is_refused_with_a_hint(lm_pack, budget):
    with edgert.Runtime(config()) as rt:
        with pytest.raises(ConfigError, match=r"fraction of the experts.*0\.5.*byte count"):
            rt.load(lm_pack, expert_budget=budget)
        assert rt.models() == [] and rt.arena.stats()["in_use_bytes"] == 0


def test_a_bytes_prompt_is_a_typed_error(lm_pack):
    with edgert.Runtime(config()) as rt:
        lm = rt.load(lm_pack, expert_budget=1.0)
        for bad in (b"import os\n", bytearray(b"x"), ["a", "b"], np.array([1.5])):
            with pytest.raises(InputMismatch, match="pass text .* or token ids"):
                lm.generate(bad, max_new_tokens=1)
        with pytest.raises(InputMismatch, match="max_position_embeddings"):
            lm.generate([1, 2, 3], max_new_tokens=126)
        assert len(lm.generate([1, 2, 3], max_new_tokens=2)) == 2   # ids still work


def test_repr_says_config_memory_and_models(tiny, lm_pack):
    rt = edgert.Runtime(config())
    assert repr(rt) == "<edgert.Runtime config 'first-use': arena 64.0 MiB, 0.0 MiB in use; " \
                       "0 model(s)>"
    m = rt.load(tiny.pack, name="tasks", prepack="off")   # the runtime holds models weakly
    text = repr(rt)
    assert "1 model(s): tasks (tasks, " in text and " MiB in use" in text
    m.close()
    rt.close()
    assert repr(rt) == "<edgert.Runtime config 'first-use': closed>"


def _fails(capsys, argv, needle: str) -> None:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and needle in err, (rc, err)


def test_commands_name_the_right_command(capsys, tiny, lm_pack, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, tiny.x)
    _fails(capsys, ["generate", tiny.pack, "--prompt", "hi"],
           "is a task pack: run a task with `edgert run PACK")
    _fails(capsys, ["run", lm_pack, "--task", "a", "--input", f"image={x}"],
           "is an MoE pack: generate text with `edgert generate PACK")
    z = tmp_path / "x.npz"
    np.savez(z, image=tiny.x)
    _fails(capsys, ["run", tiny.pack, "--task", tiny.names[0], "--input", f"image={z}"],
           f"--input image: {z} is an .npz archive (arrays image); give one .npy file")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_client_without_service_gives_up_in_seconds():
    """The default bound, not a speed: timeout x (retries + 1), a few seconds."""
    assert TIMEOUT_S * (RETRIES + 1) <= 5
    with Client(f"tcp://127.0.0.1:{_free_port()}") as c:
        with pytest.raises(ServiceUnavailable, match="no reply .* after 2 tries"):
            c.hello()


@pytest.fixture
def served(tiny, lm_pack):
    rt = edgert.Runtime(config())
    m = rt.load(tiny.pack, name="tasks", prepack="off")
    svc = Service(rt, "tcp://127.0.0.1:0", models={"tasks": m}).start()
    yield svc
    svc.close()
    rt.close()


def test_protocol_doc_req_socket_and_args(served):
    ctx = zmq.Context.instance()
    hello = {"v": 1, "id": 1, "op": "hello", "args": {}}
    req = ctx.socket(zmq.REQ)
    dealer = ctx.socket(zmq.DEALER)
    try:
        for s in (req, dealer):
            s.linger = 0
            s.connect(served.endpoint)
        req.send(msgpack.packb(hello))                   # a valid envelope, from REQ
        assert req.poll(1000) == 0                       # docs: a REQ socket gets no reply
        dealer.send(msgpack.packb({"v": 1, "id": 2, "op": "hello"}))
        assert dealer.poll(10_000)
        rep = msgpack.unpackb(dealer.recv_multipart()[0])
        assert rep["error"]["code"] == "bad_request" and "'args'" in rep["error"]["message"]
        dealer.send(msgpack.packb(hello))
        assert dealer.poll(10_000)
        assert msgpack.unpackb(dealer.recv_multipart()[0])["ok"]
    finally:
        req.close()
        dealer.close()


def test_every_public_error_here_is_an_edgert_error():
    for cls in (ConfigError, InputMismatch, ServiceUnavailable):
        assert issubclass(cls, EdgertError)
