"""Real parts for the fleet tests: a redis-server on a free loopback port, a fleet server
on a thread or as an `edgert server` process."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 5.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


@pytest.fixture
def redis_url(tmp_path):
    """A redis-server of our own on loopback, stopped after the test."""
    if not os.path.exists(REDIS):
        pytest.fail(f"{REDIS} missing: tools/setup.sh installs Debian's redis-server")
    port = free_port()
    p = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(tmp_path),
                          "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    r = redis.Redis(port=port)
    try:
        assert wait_for(lambda: _pings(r)), "redis-server did not start"
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        r.close()
        p.terminate()
        p.wait(5)


def _pings(r) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


class ServerThread:
    """A FleetServer serving on a thread of this process."""

    def __init__(self, store, heartbeat_s: float = 0.2, bind: str = "tcp://127.0.0.1:0"):
        from edgert.server.service import FleetServer
        self.srv = FleetServer(store, bind, heartbeat_s=heartbeat_s)
        self.endpoint = self.srv.endpoint
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.srv.stop()
        self.thread.join(5)


def server_process(store: str, port: int, heartbeat: float = 0.2) -> subprocess.Popen:
    """`edgert server` as a process; returns once it printed ``ready on``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "edgert", "server", "--bind",
                          f"tcp://127.0.0.1:{port}", "--store", store, "--heartbeat",
                          str(heartbeat)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
    line = p.stdout.readline()
    if "ready on" not in line:
        p.kill()
        raise AssertionError(f"edgert server did not start: {line}{p.stdout.read()}")
    return p
