"""The fault suite's harness (issue 17 item 9): real `edgert serve` processes driven from
outside over real ZeroMQ sockets, as a careless or hostile local process would.

    Serve      one `edgert serve` child: started from a config YAML written to its work
               directory, ready once it printed its endpoint and answered `health`; its
               RSS, peak RSS and CPU seconds read from /proc; SIGTERM, kill -9, restart
    Peer       a raw DEALER socket that sends what protocol.py encodes (plus whatever frames
               a test adds) and sorts the replies by request id: stream pieces, finals

Bounds are the issue's own behaviour ("no job left within 2 s", "within timeout x
(retries + 1) + 1 s"); everything else waits up to WAIT, which only a broken service takes.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml
import zmq
from zmq.utils.monitor import recv_monitor_message

from edgert.control.auth import curve_client
from edgert.control.client import Client
from edgert.control.protocol import decode_reply, encode_request

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60                  # seconds: only a broken service takes this long
MiB = 1 << 20
TICKS = os.sysconf("SC_CLK_TCK")
LM_POSITIONS = 16384       # the test LM's context: long generations and a 16k-token prompt

# The config every service here starts from: arena for two tiny task sets and two tiny LMs.
BASE_CONFIG = {"name": "faults", "threads": 1, "storage": {"read_mode": "buffered"},
               "memory": {"total": "96 MiB", "engine": "16 MiB", "experts": "8 MiB",
                          "kv": "8 MiB"}}


def write_config(path: Path, **sections) -> Path:
    """BASE_CONFIG with top-level ``sections`` replaced, as YAML at ``path``."""
    path.write_text(yaml.safe_dump({**BASE_CONFIG, **sections}))
    return path


def short_dir(prefix: str) -> Path:
    """A private directory with a short path (an ipc path has at most 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def until(cond, timeout: float, step: float = 0.02) -> bool:
    """Whether ``cond()`` came true within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


# --- /proc ----------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since start or the last reset_peak) in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (proc(5), clear_refs: 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS     # utime, stime (fields 14, 15)


# --- a service process ----------------------------------------------------------------------------
class ServeFailed(Exception):
    pass


class Serve:
    """`edgert serve` in a child process. ``packs``: name -> pack path; ``bind`` None means
    the default endpoint (put XDG_RUNTIME_DIR in ``env``); ``args``: more flags.
    ``curve``: the client keys callers use, (server public file, client secret file);
    ``admin_curve``: those of the harness's own calls (default: ``curve``).
    ``launch_only``: return before it is ready (call ready())."""

    def __init__(self, workdir: Path, packs: dict, config: Path, *, bind: str | None = None,
                 args=(), env: dict | None = None, curve: tuple | None = None,
                 admin_curve: tuple | None = None, launch_only: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cmd = [sys.executable, "-m", "edgert", "serve"]
        for name, path in packs.items():
            self.cmd += ["--pack", f"{name}={path}"]
        self.cmd += ["--config", str(config), *(["--bind", bind] if bind else []), *args]
        self.env = {**os.environ, **(env or {})}
        self.packs, self.curve = dict(packs), curve
        self.admin_curve = admin_curve or curve
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self.admin: Client | None = None
        if launch_only:
            self.launch()
        else:
            self.start()

    # --- life -------------------------------------------------------------------------------
    def start(self) -> "Serve":
        """Start the process; return once it answered `health`. ServeFailed has its stderr."""
        return self.launch().ready()

    def launch(self) -> "Serve":
        """Start the process and return at once (ready() waits for it: several start
        together)."""
        self.starts += 1
        self.out = self.workdir / f"serve-{self.starts}.out"
        self.err = self.workdir / f"serve-{self.starts}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=self.env)
        return self

    def ready(self) -> "Serve":
        if not until(lambda: "ready on" in self.out.read_text() or self.proc.poll() is not None,
                     WAIT, 0.05) or "ready on" not in self.out.read_text():
            self.kill()
            raise ServeFailed(f"edgert serve did not start (exit {self.proc.returncode}): "
                              f"{self.stderr().strip()[-2000:]}")
        line = next(ln for ln in self.out.read_text().splitlines() if "ready on" in ln)
        self.endpoint = line.split("ready on ")[1].split()[0]
        self.admin = self.client(curve=self.admin_curve, retries=1)
        assert self.admin.health()["status"] == "ok"
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        return self.err.read_text()

    def stdout(self) -> str:
        return self.out.read_text()

    def terminate(self, timeout: float = WAIT) -> int:
        """SIGTERM; the exit status (the process is killed if it outlives ``timeout``)."""
        self._drop_admin()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """kill -9: no goodbye, nothing flushed."""
        self._drop_admin()
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(WAIT)

    def restart(self) -> "Serve":
        self.kill()
        return self.start()

    def _drop_admin(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None

    # --- talking to it ----------------------------------------------------------------------
    def client(self, **kw) -> Client:
        kw.setdefault("timeout", WAIT)
        kw.setdefault("curve", self.curve)
        return Client(self.endpoint, **kw)

    def peer(self, curve: tuple | None = ..., monitor: bool = False) -> "Peer":
        return Peer(self.endpoint, self.curve if curve is ... else curve, monitor)

    def health(self) -> dict:
        return self.admin.health()

    def service_stats(self) -> dict:
        """`stats` without a model: the service's own counters."""
        return self.admin.stats()["service"]

    def limits(self) -> dict:
        return self.admin.hello()["limits"]

    def jobs(self) -> int:
        return self.health()["jobs"]

    def wait_jobs(self, n: int, timeout: float) -> bool:
        """Whether the service holds exactly ``n`` jobs within ``timeout`` seconds."""
        return until(lambda: self.jobs() == n, timeout)

    def usable(self, models: int) -> bool:
        """Alive, serving ``models`` models, and idle (or idle within 10 s)."""
        if not self.alive() or self.admin is None:
            return False
        probe = self.client(timeout=5, retries=0, curve=self.admin_curve)
        try:
            h = probe.health()
            return h["models"] == models and (h["jobs"] == 0 or until(
                lambda: probe.health()["jobs"] == 0, 10, 0.1))
        except Exception:                  # noqa: BLE001  (any failure: start a fresh one)
            return False
        finally:
            probe.close()

    # --- what it costs ----------------------------------------------------------------------
    def rss(self) -> int:
        return proc_status(self.pid)["VmRSS"]

    def peak(self) -> int:
        return proc_status(self.pid)["VmHWM"]

    def reset_peak(self) -> None:
        reset_peak(self.pid)

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)


# --- a raw peer -----------------------------------------------------------------------------------
CTX = zmq.Context.instance()


class Peer:
    """A DEALER socket speaking protocol v1 by hand: requests encoded by protocol.py, extra
    frames appended where a test misbehaves, replies sorted by id (beats skipped)."""

    def __init__(self, endpoint: str, curve: tuple | None = None, monitor: bool = False):
        s = CTX.socket(zmq.DEALER)
        s.linger = 0
        s.rcvhwm = 0
        if curve is not None:
            curve_client(s, *curve)
        # NOTE: before connecting, so no event of the first handshake is missed
        self.events = s.get_monitor_socket() if monitor else None
        s.connect(endpoint)
        self.sock = s
        self._ids = itertools.count(1)
        self.pieces: dict[int, list] = defaultdict(list)    # id -> pieces received so far
        self.final: dict[int, object] = {}                  # id -> its last reply (Reply)
        self.first_at: dict[int, float] = {}                # id -> when its first piece came
        self.final_at: dict[int, float] = {}

    def send(self, op: str, args: dict | None = None, extra=()) -> int:
        """Send a request (and ``extra`` raw frames after it); its id."""
        rid = self.try_send(op, args, extra, WAIT)
        assert rid is not None, f"{op}: could not send for {WAIT} s"
        return rid

    def try_send(self, op: str, args: dict | None = None, extra=(),
                 timeout: float = 1.0) -> int | None:
        """Its id, or None when libzmq would not queue it within ``timeout`` (a DEALER
        whose connection was refused has nowhere to queue a message)."""
        rid = next(self._ids)
        frames = encode_request(rid, op, args or {}) + list(extra)
        end = time.monotonic() + timeout
        while True:                       # never block for good on a peer that is refused
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return rid
            except zmq.Again:
                if time.monotonic() >= end:
                    return None
                time.sleep(0.01)

    def pump(self, timeout: float) -> bool:
        """Take every reply that arrives within ``timeout``; whether any came."""
        if not self.sock.poll(int(timeout * 1000)):
            return False
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            rep = decode_reply(frames)
            now = time.monotonic()
            if rep.beat:
                continue
            if rep.more:
                self.first_at.setdefault(rep.id, now)
                self.pieces[rep.id].extend(rep.result if isinstance(rep.result, list)
                                           else [rep.result])
            else:
                self.final[rep.id] = rep
                self.final_at[rep.id] = now

    def wait(self, rids, timeout: float = WAIT) -> bool:
        """Whether every request in ``rids`` had its final reply within ``timeout``."""
        rids = list(rids)
        end = time.monotonic() + timeout
        while not all(r in self.final for r in rids):
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.1))
        return True

    def wait_piece(self, rid: int, timeout: float = WAIT) -> bool:
        end = time.monotonic() + timeout
        while not self.pieces[rid] and rid not in self.final:
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.1))
        return bool(self.pieces[rid])

    def call(self, op: str, args: dict | None = None, timeout: float = WAIT):
        """Send and wait for the final reply (asserted to come)."""
        rid = self.send(op, args)
        assert self.wait([rid], timeout), f"{op}: no reply within {timeout} s"
        return self.final[rid]

    def wait_event(self, mask: int, timeout: float = WAIT) -> int:
        """The first socket event in ``mask`` (zmq.EVENT_*) within ``timeout``; 0 if none
        came. Needs Peer(monitor=True)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if self.events.poll(int(left * 1000)):
                ev = recv_monitor_message(self.events)["event"]
                if ev & mask:
                    return ev
        return 0

    def close(self) -> None:
        if self.events is not None:
            self.sock.disable_monitor()
            self.events.close(linger=0)
            self.events = None
        if not self.sock.closed:
            self.sock.close(linger=0)


def generate_args(n: int, model: str = "lm", seed: int = 0, **kw) -> dict:
    """A generate request of ``n`` new tokens on a short prompt of token ids."""
    return {"prompt": [1 + seed % 200, 2, 3], "max_new_tokens": n, "model": model, **kw}


def busy_ok(rep) -> bool:
    """A `busy` refusal carrying a positive retry hint."""
    return (not rep.ok and rep.code == "busy"
            and isinstance(getattr(rep, "retry_after_s", None), float)
            and rep.retry_after_s > 0)


def caps_delta(before: dict, after: dict) -> dict:
    """Refusals per cap between two `stats()["service"]` readings (caps that fired only)."""
    b, a = before.get("caps", {}), after.get("caps", {})
    return {k: a[k] - b.get(k, 0) for k in a if a[k] != b.get(k, 0)}


