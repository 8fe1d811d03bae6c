"""Every client call is bounded: `edgert.Client` and `edgert client` return or raise within
timeout x (retries + 1) plus a second, whatever the service or the handshake does: a refused
key, a wrong server key, CURVE on one side only, nothing listening, a service killed
mid-stream. Real services on loopback; a client that blocks shows up as a thread or a
process still running at the bound."""
from __future__ import annotations

import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
import zmq

import edgert
from edgert.config import DeviceConfig
from edgert.control.auth import generate
from edgert.control.client import Client, ServiceUnavailable
from edgert.control.service import Service
from task_packs import tiny  # noqa: F401  (tiny is a fixture)

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
SLACK_S = 1.0       # the bound's "plus a second"
WAIT = 60           # seconds: only a broken client or service takes this long


def bound(timeout: float, retries: int) -> float:
    return timeout * (retries + 1) + SLACK_S


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """server, bob (allowed), mallory (not allowed)."""
    d = tmp_path_factory.mktemp("keys")
    own = d / "own"
    out = {who: generate(own, who) for who in ("server", "bob", "mallory")}
    (d / "allow").mkdir()
    (d / "allow" / "bob.key").write_bytes(out["bob"][0].read_bytes())
    return out | {"allow": d / "allow"}


@pytest.fixture(scope="module")
def curve_service(tiny, keys):
    rt = edgert.Runtime(DeviceConfig.from_dict({
        "name": "test-bounds", "threads": 1,
        "memory": {"total": 24 * MiB, "engine": 8 * MiB, "experts": 0, "kv": 0}}))
    m = rt.load(tiny.pack, name="tasks", prepack="off")
    svc = Service(rt, "tcp://127.0.0.1:0", models={"tasks": m},
                  curve_secret=keys["server"][1], allow_dir=keys["allow"]).start()
    yield svc
    svc.close()
    rt.close()


def free_tcp_endpoint() -> str:
    """A loopback port nobody listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def timed_in_threads(n: int, call) -> list:
    """Run ``call()`` in ``n`` threads at once; (seconds, exception or result) of each that
    ended. A thread still blocked after WAIT is missing from the list."""
    out, go = [], threading.Barrier(n)

    def one():
        go.wait()
        t0 = time.monotonic()
        try:
            res = call()
        except Exception as e:      # noqa: BLE001  (the test looks at what was raised)
            res = e
        out.append((time.monotonic() - t0, res))

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + WAIT
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return out


def assert_all_unavailable_within(results: list, n: int, limit: float, *words: str):
    assert len(results) == n, f"{n - len(results)} of {n} calls still blocked after {WAIT} s"
    for took, res in results:
        assert isinstance(res, ServiceUnavailable), res
        assert took <= limit, f"raised after {took:.2f} s; the bound is {limit:.2f} s"
        for w in words:
            assert w in str(res), str(res)


# --- refused and wrong keys ---------------------------------------------------------------------
def test_refused_key_raises_at_once_in_twenty_clients(curve_service, keys):
    """Each client's own socket: libzmq drops the queue of a refused connection, and a
    blocking send on it used to wait forever."""
    timeout, retries = 2.0, 1
    curve = (keys["server"][0], keys["mallory"][1])

    def health():
        with Client(curve_service.endpoint, timeout=timeout, retries=retries, curve=curve) as c:
            return c.health()

    res = timed_in_threads(20, health)
    # refused during the handshake: well before one timeout, let alone the bound
    assert_all_unavailable_within(res, 20, timeout, "refused this client's key",
                                  curve_service.endpoint)
    with Client(curve_service.endpoint, timeout=WAIT,
                curve=(keys["server"][0], keys["bob"][1])) as bob:
        assert bob.health()["status"] == "ok"      # the service goes on


def test_a_shared_client_with_a_refused_key_raises_on_every_call(curve_service, keys):
    """One client, many threads, and calls again after the first refusal: each raises."""
    timeout, retries = 2.0, 1
    c = Client(curve_service.endpoint, timeout=timeout, retries=retries,
               curve=(keys["server"][0], keys["mallory"][1]))
    res = timed_in_threads(8, c.health)
    # NOTE: on failure the client stays open: close() would wait on a thread stuck in it
    assert_all_unavailable_within(res, 8, bound(timeout, retries), curve_service.endpoint)
    try:
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="refused this client's key"):
            c.stats()
        assert time.monotonic() - t0 <= timeout
    finally:
        c.close()


@pytest.mark.parametrize("who", ["wrong server key", "no CURVE"])
def test_a_failed_handshake_raises_early_naming_it(curve_service, keys, who):
    """libzmq reports the failed handshake; the client says so instead of waiting out every
    try as if the service were silent."""
    timeout, retries = 2.0, 1
    curve = (keys["bob"][0], keys["bob"][1]) if who == "wrong server key" else None

    def health():
        with Client(curve_service.endpoint, timeout=timeout, retries=retries, curve=curve) as c:
            return c.health()

    res = timed_in_threads(20, health)
    assert_all_unavailable_within(res, 20, timeout, "handshake", curve_service.endpoint)


# --- `edgert client` from the shell -------------------------------------------------------------
# `edgert client`, timing main() inside the process: start-up and imports on a busy machine are
# no part of the client's bound (the wall clock gets a generous bound of its own)
TIMED_CLI = """
import sys, time
from edgert.cli import build_parser, main
build_parser()                  # imports every command's module: then main() is the client
t0 = time.monotonic()
rc = main(sys.argv[1:])
print(f"main took {time.monotonic() - t0:.3f} s", flush=True)
sys.exit(rc)
"""


def test_cli_with_a_refused_key_exits_within_the_bound_with_one_line(curve_service, keys):
    timeout, retries = 2.0, 1
    argv = [sys.executable, "-c", TIMED_CLI, "client", curve_service.endpoint,
            "--timeout", str(timeout), "--retries", str(retries),
            "--curve", str(keys["server"][0]), str(keys["mallory"][1]), "health"]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(8)]
    end, done = time.monotonic() + WAIT, []
    try:
        for p in procs:
            try:
                done.append((p, *p.communicate(timeout=max(0.0, end - time.monotonic()))))
            except subprocess.TimeoutExpired:
                if p.poll() is not None:         # ended while an earlier one was waited on
                    done.append((p, *p.communicate()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert len(done) == len(procs), f"{len(procs) - len(done)} of {len(procs)} still running " \
                                    f"after {WAIT} s"
    for p, out, err in done:
        assert p.returncode != 0
        assert err.count("\n") == 1 and "ServiceUnavailable" in err, err
        assert "refused this client's key" in err and curve_service.endpoint in err
        took = float(out.split("main took ")[1].split()[0])
        assert took <= bound(timeout, retries), out


# --- nothing listening --------------------------------------------------------------------------
@pytest.fixture(params=["tcp", "ipc"])
def nowhere(request):
    if request.param == "tcp":
        yield free_tcp_endpoint()
        return
    d = tempfile.mkdtemp(prefix="edgert-t")      # ipc paths are limited to 107 bytes
    yield f"ipc://{d}/none.sock"
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("op", ["health", "generate", "load"])
def test_nothing_listening_is_bounded_backoff_included(nowhere, op):
    """Many short tries: the backoff between them (0.1 s doubling to 2 s) counts against the
    bound rather than adding to it."""
    timeout, retries = 0.2, 6
    with Client(nowhere, timeout=timeout, retries=retries) as c:
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable, match=nowhere.replace(".", r"\.")):
            if op == "health":
                c.health()
            elif op == "generate":
                next(iter(c.generate("x", stream=True)))
            else:
                c.load("nowhere.edgepack")            # never resent: one timeout
        took = time.monotonic() - t0
    assert took <= (timeout + SLACK_S if op == "load" else bound(timeout, retries)), took


# --- a service killed mid-stream ----------------------------------------------------------------
# `edgert serve` with generation slowed to 20 pieces/s, so a kill surely lands mid-stream
SLOW_SERVE = """
import sys, time
from edgert.kinds.moe import MoeLM
def generate(self, prompt, max_new_tokens=64, **kw):
    def pieces():
        for i in range(max_new_tokens):
            time.sleep(0.05)
            yield i
    return pieces()
MoeLM.generate = generate
from edgert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    pytest.importorskip("transformers")
    from edgert.pack.hf_import import pack_hf
    from moe_models import mixtral_config, save
    d = tmp_path_factory.mktemp("lm")
    pack_hf(save(mixtral_config(vocab_size=256), d / "ckpt"), d / "lm.edgepack", progress=False)
    cfg = d / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "test-bounds-lm", "threads": 1, "storage": {"read_mode": "buffered"},
        "memory": {"total": "80 MiB", "engine": "8 MiB", "experts": "4 MiB", "kv": "4 MiB"}}))
    return d / "lm.edgepack", cfg


@pytest.fixture
def slow_serve(lm_files):
    """`edgert serve` in a child process; yields (process, endpoint)."""
    pack, cfg = lm_files
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "serve", "--pack", f"lm={pack}",
                             "--config", str(cfg), "--bind", "tcp://127.0.0.1:0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r, _, _ = select.select([proc.stdout], [], [], WAIT)
        line = proc.stdout.readline() if r else ""
        assert "ready on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield proc, line.split("ready on ")[1].split()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()


def test_next_raises_within_the_bound_when_the_service_dies_mid_stream(slow_serve):
    proc, endpoint = slow_serve
    timeout, retries = 1.0, 3
    with Client(endpoint, timeout=timeout, retries=retries) as c:
        stream = c.generate([1, 2, 3], max_new_tokens=1000, stream=True)
        assert next(stream) == 0
        proc.kill()
        proc.wait(WAIT)
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="went silent mid-stream"):
            for _ in stream:        # pieces already on their way come first, then silence
                pass
        # a started stream is never resent: one timeout of silence ends it
        assert time.monotonic() - t0 <= timeout + SLACK_S


def test_a_slow_reader_is_not_taken_for_a_silent_service(slow_serve):
    """Pieces that arrived while the reader was busy count as the service speaking: each
    next() looks at what came before deciding that the service went silent."""
    _, endpoint = slow_serve
    timeout = 1.0
    with Client(endpoint, timeout=timeout, retries=0) as c:
        stream = c.generate([1, 2, 3], max_new_tokens=6, stream=True)
        assert next(stream) == 0
        time.sleep(2 * timeout)      # the other five pieces come within 0.3 s of the first
        assert list(stream) == [1, 2, 3, 4, 5]
