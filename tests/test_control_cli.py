"""`edgert serve` as its own process, `edgert client` and `edgert keys` from the shell: every
op, one line per mistake, the client reconnecting after the service is killed and started
again, SIGTERM with a stream in flight; where the service listens by default."""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("transformers")

import edgert
from edgert.cli import main
from edgert.control.client import Client, RemoteError
from edgert.control.endpoint import check_endpoint, default_endpoint
from edgert.errors import ConfigError
from edgert.kv.disk import SUFFIX
from edgert.pack.hf_import import pack_hf
from moe_models import mixtral_config, save
from task_packs import assert_matches, tiny  # noqa: F401  (tiny is a fixture)

WAIT = 60
ROOT = Path(__file__).resolve().parents[1]
# `edgert serve` with generation slowed to 20 pieces/s, so a signal surely lands mid-stream
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
def files(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("serve")
    ckpt = save(mixtral_config(vocab_size=256), d / "ckpt")
    pack_hf(ckpt, d / "lm.edgepack", progress=False)
    cfg = d / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "test-serve", "threads": 1, "storage": {"read_mode": "buffered"},
        "memory": {"total": "80 MiB", "engine": "8 MiB", "experts": "4 MiB", "kv": "4 MiB"}}))
    x = d / "x.npy"
    np.save(x, tiny.x)
    return {"lm": d / "lm.edgepack", "config": cfg, "x": x, "dir": d}


@pytest.fixture
def short_dir():
    d = tempfile.mkdtemp(prefix="edgert-t")      # ipc paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Serve:
    """`edgert serve` in a child process; ready once it printed its endpoint."""

    def __init__(self, args: list[str], script: str | None = None, env: dict | None = None):
        cmd = [sys.executable] + (["-c", script] if script else ["-m", "edgert"])
        self.proc = subprocess.Popen(cmd + ["serve", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=None if env is None else {**os.environ, **env})
        self.lines: list[str] = []
        line = self._readline()
        assert "ready on" in line, (line, self.proc.stderr.read() if self.proc.poll() else "")
        self.endpoint = line.split("ready on ")[1].split()[0]

    def _readline(self) -> str:
        r, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        assert r, "edgert serve printed nothing"
        line = self.proc.stdout.readline()
        self.lines.append(line)
        return line

    def wait(self) -> int:
        rc = self.proc.wait(WAIT)
        self.lines += self.proc.stdout.readlines()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self.proc.stdout.close()
        self.proc.stderr.close()


def serve_args(tiny, files, endpoint) -> list[str]:
    return ["--pack", f"tasks={tiny.pack}", "--pack", str(files["lm"]), "--config",
            str(files["config"]), "--bind", endpoint, "--pack-dir", str(tiny.pack.parent)]


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_serve_then_every_client_command_from_the_shell(tiny, files, short_dir, capsys,
                                                        tmp_path):
    s = Serve(serve_args(tiny, files, f"ipc://{short_dir}/s.sock"))
    ep = s.endpoint
    try:
        rc, out, _ = cli(capsys, "client", ep, "hello")
        assert rc == 0 and '"protocol": 1' in out and '"lm"' in out and '"detect"' in out
        assert cli(capsys, "client", ep, "health")[1].count('"ok"') == 1
        rc, out, _ = cli(capsys, "client", ep, "switch", "lane")
        assert rc == 0 and '"task": "lane"' in out
        npz = tmp_path / "out.npz"
        rc, out, _ = cli(capsys, "client", ep, "infer", "--input", f"image={files['x']}",
                         "--task", "sign", "--output", npz, "--repeat", "3")
        assert rc == 0 and "logits: float32[2, 16]" in out and "round trip" in out
        assert_matches(np.load(npz)["logits"], tiny.ref["sign"])
        rc, out, err = cli(capsys, "client", ep, "generate", "--prompt", "import os",
                           "--max-new-tokens", "6")
        with edgert.Runtime(files["config"]) as rt:
            want = rt.load(files["lm"]).generate("import os", max_new_tokens=6)
        assert rc == 0 and out == want + "\n" and "first piece after" in err
        rc, out, _ = cli(capsys, "client", ep, "prewarm", "detect", "parking")
        assert rc == 0 and '"wanted"' in out
        rc, out, _ = cli(capsys, "client", ep, "stats", "--model", "tasks")
        assert rc == 0 and '"run_ms"' in out
        rc, out, _ = cli(capsys, "client", ep, "unload", "tasks")
        assert rc == 0 and '"freed_bytes"' in out
        rc, out, _ = cli(capsys, "client", ep, "load", tiny.pack, "--name", "tasks",
                         "--option", "prepack=off")
        assert rc == 0 and '"kind": "tasks"' in out
        rc, out, _ = cli(capsys, "client", ep, "reload", "tasks")
        assert rc == 0 and '"label": "tasks' in out

        # one line per mistake, exit 2, no traceback
        for argv, words in (
                (["switch", "nope"], "unknown task 'nope'"),
                (["infer", "--input", "image"], "expected NAME=FILE.npy"),
                (["infer", "--input", f"image={tmp_path / 'none.npy'}"], "cannot read"),
                (["infer", "--input", f"picture={files['x']}"], "unknown input 'picture'"),
                (["generate", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
                (["load", tmp_path / "none.edgepack"],
                 "not a pack file inside the service's pack directories"),
                (["load", tiny.pack, "--option", "prepack"], "expected KEY=VALUE"),
                (["unload", "nope"], "no model 'nope'"),
                (["stats", "--model", "nope"], "no model 'nope'")):
            rc, out, err = cli(capsys, "client", ep, *argv)
            assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
            assert "Traceback" not in err
        rc, _, err = cli(capsys, "client", f"ipc://{short_dir}/none.sock", "--timeout", "0.2",
                         "--retries", "1", "health")
        assert rc == 2 and "ServiceUnavailable" in err and "after 2 tries" in err

        rc, out, _ = cli(capsys, "client", ep, "shutdown")
        assert rc == 0 and '"stopping": true' in out
        assert s.wait() == 0 and "edgert serve: stopped\n" in s.lines
    finally:
        s.kill()


def test_serve_mistakes_are_one_line(tiny, files, capsys, short_dir, tmp_path):
    pack = f"tasks={tiny.pack}"
    for argv, words in (
            (["--pack", tmp_path / "none.edgepack"], "cannot open pack"),
            (["--pack", pack, "--pack", pack], "the name 'tasks' is taken"),
            (["--pack", pack, "--bind", "udp://x"], "expected ipc://PATH"),
            (["--pack", pack, "--bind", "tcp://127.0.0.1"], "expected tcp://HOST:PORT"),
            (["--pack", pack, "--bind", f"ipc://{tmp_path / 'no' / 'dir.sock'}"],
             "no directory"),
            (["--pack", pack, "--curve-secret", tmp_path / "k"], "go together"),
            (["--pack", pack, "--admin-dir", tmp_path], "needs --curve-secret"),
            (["--pack", pack, "--curve-secret", tmp_path / "k", "--allow-dir", tmp_path],
             "holds no public key")):
        rc, _, err = cli(capsys, "serve", "--config", files["config"], *argv)
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    rc, out, _ = cli(capsys, "keys", "generate", tmp_path / "keys", "--name", "svc")
    assert rc == 0 and (tmp_path / "keys" / "svc.key_secret").exists()
    rc, _, err = cli(capsys, "keys", "generate", tmp_path / "keys", "--name", "svc")
    assert rc == 2 and "exists" in err


def test_client_reconnects_after_the_service_is_killed_and_restarted(tiny, files, short_dir):
    args = ["--pack", f"tasks={tiny.pack}", "--config", str(files["config"]),
            "--bind", f"ipc://{short_dir}/r.sock"]
    s = Serve(args)
    c = Client(s.endpoint, timeout=1.0, retries=60)
    try:
        assert c.health()["status"] == "ok"
        s.kill()                                          # SIGKILL: no goodbye
        result: dict = {}
        down = threading.Event()

        def ask():
            down.set()
            try:
                result["health"] = c.health()             # retries until the service is back
            except Exception as e:                        # noqa: BLE001  (asserted below)
                result["error"] = e

        t = threading.Thread(target=ask)
        t.start()
        assert down.wait(WAIT)
        s = Serve(args)                                   # the same endpoint
        t.join(WAIT)
        assert result.get("health", {}).get("status") == "ok", result
        assert_matches(c.infer({"image": tiny.x}, task="lane")["logits"], tiny.ref["lane"])
    finally:
        c.close()
        s.kill()


def test_sigterm_with_a_stream_in_flight_cancels_it_and_exits_0(tiny, files, short_dir):
    s = Serve(serve_args(tiny, files, f"ipc://{short_dir}/t.sock"), script=SLOW_SERVE)
    try:
        with Client(s.endpoint, timeout=WAIT) as c:
            stream = c.generate([1, 2], max_new_tokens=2000, stream=True)
            assert next(stream) == 0
            s.proc.send_signal(signal.SIGTERM)
            got = []
            with pytest.raises(RemoteError) as e:
                for piece in stream:
                    got.append(piece)
            assert e.value.code == "cancelled" and "shutting down" in str(e.value)
            assert len(got) < 1999
        assert s.wait() == 0 and "edgert serve: stopped\n" in s.lines
    finally:
        s.kill()


def test_sigterm_closes_the_models_so_the_kv_disk_tier_keeps_every_full_chunk(files,
                                                                             short_dir,
                                                                             tmp_path):
    cfg = tmp_path / "kv.yaml"
    doc = yaml.safe_load(files["config"].read_text())
    doc["kv_cache"] = {"chunk_tokens": 64, "disk": "16 MiB", "dir": str(tmp_path / "kv")}
    cfg.write_text(yaml.safe_dump(doc))
    s = Serve(["--pack", f"lm={files['lm']}", "--config", str(cfg),
               "--bind", f"ipc://{short_dir}/kv.sock"])
    try:
        with Client(s.endpoint, timeout=WAIT) as c:
            c.generate([(7 * i) % 256 for i in range(200)], max_new_tokens=2)
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait() == 0
        chunks = list((tmp_path / "kv").rglob(f"*{SUFFIX}"))
        assert len(chunks) == 3                 # 200 tokens: 3 full chunks of 64, on disk
    finally:
        s.kill()


# --- where the service listens --------------------------------------------------------------
def _datagrams(sock: socket.socket, until: str) -> list[str]:
    got = []
    while not any(until in m for m in got):
        got.append(sock.recv(4096).decode())     # the socket's timeout bounds the wait
    return got


def test_serve_tells_systemd_when_ready_and_when_stopping(tiny, files, short_dir):
    """Type=notify: READY=1 once the packs are loaded and the socket bound, STOPPING=1 on
    SIGTERM, over a real Unix datagram socket named by NOTIFY_SOCKET."""
    path = os.path.join(short_dir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(WAIT)
        s = Serve(serve_args(tiny, files, f"ipc://{short_dir}/s.sock"),
                  env={"NOTIFY_SOCKET": path})
        try:
            ready = _datagrams(sock, "READY=1")
            assert f"STATUS=ready on {s.endpoint}" in ready[-1]
            with Client(s.endpoint, timeout=10) as c:      # ready means it answers
                assert c.health()["status"] == "ok"
            s.proc.send_signal(signal.SIGTERM)
            stopping = _datagrams(sock, "STOPPING=1")
            assert "STATUS=stopping on SIGTERM" in stopping[-1]
            assert s.wait() == 0
        finally:
            s.kill()


def test_notify_is_a_no_op_outside_systemd_and_never_fatal(monkeypatch, short_dir):
    from edgert.control.notify import notify
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY="1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(short_dir, "nobody-listens"))
    assert notify(READY="1") is False                   # logged, not raised
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify(READY="1") is False
    name = f"edgert-test-{os.getpid()}"                 # abstract namespace: '@name'
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(READY="1", STATUS="two\nlines") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"


def test_default_endpoint_is_a_private_ipc_directory(monkeypatch, short_dir):
    monkeypatch.setenv("XDG_RUNTIME_DIR", short_dir)
    ep = default_endpoint()
    assert ep == f"ipc://{short_dir}/edgert/edgert.sock"
    assert os.stat(f"{short_dir}/edgert").st_mode & 0o777 == 0o700
    os.chmod(f"{short_dir}/edgert", 0o755)
    with pytest.raises(ConfigError, match="mode 0700"):
        default_endpoint()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_endpoint().startswith(f"ipc://{tempfile.gettempdir()}/edgert-{os.getuid()}/")


def test_endpoints_are_checked_before_binding(short_dir):
    for bad in ("", "tcp:/x", "udp://h:1", "tcp://:1", "tcp://h:port", f"ipc://{'x' * 120}",
                "ipc:///nonexistent/dir/s.sock"):
        with pytest.raises(ConfigError):
            check_endpoint(bad)
    for good in ("tcp://127.0.0.1:0", "tcp://127.0.0.1:*", "tcp://0.0.0.0:5555",
                 f"ipc://{short_dir}/s.sock", "inproc://x"):
        assert check_endpoint(good) == good
    import socket
    p = f"{short_dir}/busy.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(p)
    srv.listen()
    try:
        with pytest.raises(ConfigError, match="another service listens"):
            check_endpoint(f"ipc://{p}")
    finally:
        srv.close()
    assert check_endpoint(f"ipc://{p}")               # a file left behind does not count
    time.sleep(0)
