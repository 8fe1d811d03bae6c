"""The hostile cases of `edgert bench soak` (soak.py has the table of what each measures):
the services it starts (`Served`), a raw protocol peer (`Peer`), and one function per case
that drives the real service from outside and returns its figures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import EdgertError
from .control import _python

WAIT = 120
MiB = 1 << 20
RSS_BATCH = 1.10                         # target: RSS after a batch within 10% of before
REFUSED_TIMEOUT, REFUSED_RETRIES = 1.0, 1
KV_BUDGET, KV_CHUNK, KV_PROMPT = 1 * MiB, 64, 448

# 20 clients with a refused key at once; one JSON line per client as soon as it ends.
REFUSED = r"""
import json, os, sys, threading, time
from edgert.control.client import Client
endpoint, server, secret, timeout, retries = sys.argv[1:6]
lock = threading.Lock()
def one():
    t0 = time.monotonic()
    try:
        with Client(endpoint, timeout=float(timeout), retries=int(retries), curve=(server, secret)) as c:
            c.health()
        end = "answered"
    except Exception as e:
        end = type(e).__name__
    with lock:
        print(json.dumps({"end": end, "s": time.monotonic() - t0}), flush=True)
threads = [threading.Thread(target=one, daemon=True) for _ in range(20)]
for t in threads: t.start()
deadline = time.monotonic() + 30
for t in threads: t.join(max(0.0, deadline - time.monotonic()))
os._exit(0)
"""



# --- processes ------------------------------------------------------------------------------------
class Served:
    """`edgert serve` in a child process: its output in files, its memory and CPU in /proc."""

    def __init__(self, args: list[str], work: Path, env: dict | None = None):
        work.mkdir(parents=True, exist_ok=True)
        self.out, self.err = work / "serve.out", work / "serve.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(_python() + ["-m", "edgert", "serve", *args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env={**os.environ, **(env or {})})
        self.endpoint = ""

    def ready(self) -> "Served":
        end = time.monotonic() + WAIT
        while "ready on" not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise EdgertError(f"edgert serve did not start: {self.err.read_text()[-600:]}")
            time.sleep(0.05)
        line = next(ln for ln in self.out.read_text().splitlines() if "ready on" in ln)
        self.endpoint = line.split("ready on ")[1].split()[0]
        return self

    def status(self) -> dict:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, _, v in (ln.partition(":") for ln in f)
                    if k in ("VmRSS", "VmHWM")}

    def rss(self) -> int:
        return self.status()["VmRSS"]

    def peak(self) -> int:
        return self.status()["VmHWM"]

    def reset_peak(self) -> None:
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self, sig=signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


class Peer:
    """A raw DEALER: requests encoded by protocol.py, replies sorted by id."""

    def __init__(self, endpoint: str, curve=None, monitor: bool = False):
        import zmq

        from ..control.auth import curve_client
        self.zmq = zmq
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvhwm = 0
        if curve is not None:
            curve_client(self.sock, *curve)
        self.events = self.sock.get_monitor_socket() if monitor else None
        self.sock.connect(endpoint)
        self.next_id, self.final, self.pieces = 1, {}, {}

    def send(self, op: str, args: dict, extra=()) -> int | None:
        from ..control.protocol import encode_request
        rid, self.next_id = self.next_id, self.next_id + 1
        try:
            self.sock.send_multipart(encode_request(rid, op, args) + list(extra),
                                     self.zmq.NOBLOCK, copy=False)
        except self.zmq.Again:
            return None                   # nowhere to queue it (a refused connection)
        return rid

    def pump(self, timeout: float) -> None:
        """Take the replies that arrive within ``timeout`` (beats skipped)."""
        from ..control.protocol import decode_reply
        if not self.sock.poll(int(1e3 * timeout)):
            return
        while True:
            try:
                rep = decode_reply(self.sock.recv_multipart(self.zmq.NOBLOCK))
            except self.zmq.Again:
                return
            if rep.more and not rep.beat:
                self.pieces[rep.id] = self.pieces.get(rep.id, 0) + len(rep.result)
            elif not rep.more:
                self.final[rep.id] = rep

    def wait(self, rids, timeout: float, piece: bool = False) -> bool:
        """Whether each of ``rids`` ended (or, with ``piece``, sent a piece) in time."""
        def done(r):
            return r in self.final or piece and self.pieces.get(r, 0) > 0
        end = time.monotonic() + timeout
        while not all(done(r) for r in rids):
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.1))
        return True

    def event(self, mask: int, timeout: float) -> bool:
        """Whether a socket event in ``mask`` (zmq.EVENT_*) came within ``timeout``
        (Peer(monitor=True))."""
        from zmq.utils.monitor import recv_monitor_message
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if self.events.poll(int(1e3 * left)) and \
                    recv_monitor_message(self.events)["event"] & mask:
                return True
        return False

    def close(self) -> None:
        if self.events is not None:
            self.sock.disable_monitor()
            self.events.close(linger=0)
        self.sock.close(linger=0)



def until(cond, timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(step)
    return True


def disconnect(svc: Served, c) -> dict:
    """100 sockets x 16 generate(1000), every request admitted or refused, then all close."""
    before = c.stats()["service"]
    peers = [Peer(svc.endpoint) for _ in range(100)]
    sent = [[p.send("generate", {"prompt": [1 + i, 2, 3], "max_new_tokens": 1000,
                                 "model": "lm"}) for i in range(16)] for p in peers]
    for p in peers:
        p.wait([p.send("health", {})], WAIT)
    refused: dict = {}
    for p, rids in zip(peers, sent):
        for rid in rids:
            if rid in p.final:
                refused[p.final[rid].code] = refused.get(p.final[rid].code, 0) + 1
    admitted = c.health()["jobs"]
    cpu0, t0 = svc.cpu_s(), time.monotonic()
    for p in peers:
        p.close()
    idle = until(lambda: c.health()["jobs"] == 0, WAIT)
    gone_s = time.monotonic() - t0
    cpu = svc.cpu_s() - cpu0
    after = c.stats()["service"]
    orphaned = after.get("orphaned", {})
    return {"requests": 1600, "admitted": admitted, "refused": refused, "idle": idle,
            "gone_s": gone_s, "process_cpu_s": cpu,
            "orphaned_jobs": orphaned.get("jobs", 0) - before.get("orphaned", {}).get("jobs", 0),
            "orphaned_cpu_s": orphaned.get("cpu_s", 0.0)
            - before.get("orphaned", {}).get("cpu_s", 0.0),
            "caps": _delta(before.get("caps", {}), after.get("caps", {}))}


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a.get(k, 0) for k in b if b[k] != a.get(k, 0)}


def frames(curve: Served, keys: Path, ok_keys: tuple, n_ok: int) -> dict:
    """One 2000 x 1 MiB message from each peer that is not allowed in; ``n_ok`` frames of
    about 1 MiB (under the frame limit `hello` states) from one that is."""
    server = str(keys / "server.key")
    limit = curve_limits(curve, ok_keys)["max_message"]
    curve.reset_peak()
    before = curve.rss()
    peers = [Peer(curve.endpoint, (server, str(keys / "refused.key_secret")), monitor=True),
             Peer(curve.endpoint, None, monitor=True),
             Peer(curve.endpoint, (str(keys / "refused.key"), str(keys / "ok.key_secret")),
                  monitor=True)]
    mib = np.zeros(MiB, np.uint8)
    for p in peers:
        p.send("health", {}, [mib] * 2000)
    z = peers[0].zmq
    failed = z.EVENT_HANDSHAKE_FAILED_NO_DETAIL | z.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
        z.EVENT_HANDSHAKE_FAILED_AUTH | z.EVENT_DISCONNECTED
    ended = sum(p.event(failed, 10) for p in peers)     # each handshake failed (or ended)
    for p in peers:
        p.pump(0.1)
    out = {"unauthenticated": {"peak_mib": (curve.peak() - before) / MiB, "handshakes_failed":
                               ended, "replies": sum(len(p.final) for p in peers)}}
    for p in peers:
        p.close()
    # NOTE: under the limit by more than CURVE's per-frame overhead, or libzmq drops the peer
    frame = np.zeros(min(MiB, limit - 4096), np.uint8)
    curve.reset_peak()
    before = curve.rss()
    ok = Peer(curve.endpoint, ok_keys)
    rid = ok.send("health", {}, [frame] * n_ok)
    ok.wait([rid], 30)
    rep = ok.final.get(rid)
    out["authenticated"] = {"frames": n_ok, "frame_bytes": frame.nbytes,
                            "peak_mib": (curve.peak() - before) / MiB,
                            "reply": "none" if rep is None else rep.code or "ok"}
    ok.close()
    return out


def curve_limits(curve: Served, ok_keys: tuple) -> dict:
    from ..control.client import Client
    with Client(curve.endpoint, timeout=WAIT, curve=ok_keys) as c:
        return c.hello()["limits"]


def batch(svc: Served, c) -> dict:
    """4096 images, and the largest batch the frame limit lets through."""
    hello = c.hello()
    tasks = next(m for m in hello["models"] if m["name"] == "tasks")
    (name, spec), = tasks["inputs"].items()
    shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
    item = int(np.dtype(spec["dtype"]).itemsize * np.prod(shape))
    limit = hello["limits"]["max_message"]
    out = {}
    for n in sorted({min(4096, limit // item), 4096}):
        x = np.zeros([n, *shape[1:]], spec["dtype"])
        before = svc.rss()
        svc.reset_peak()
        p = Peer(svc.endpoint, monitor=True)
        rid = p.send("infer", {"inputs": {name: x}, "model": "tasks"})
        if n * item > limit:              # libzmq drops the peer as it reads the frame header
            dropped = p.event(p.zmq.EVENT_DISCONNECTED, WAIT)
            end = "dropped (frame past the limit)" if dropped else "not dropped"
        else:
            rep = p.final.get(rid) if p.wait([rid], WAIT) else None
            end = "no reply" if rep is None else "ran" if rep.ok else f"refused: {rep.code}"
        p.close()
        until(lambda: svc.rss() <= RSS_BATCH * before, 5, 0.1)
        out[str(n)] = {"mib": n * item / MiB, "end": end, "rss_before": before,
                       "rss_after": svc.rss(), "peak": svc.peak()}
        del x
    return out


def drains(svc: Served, c) -> dict:
    """4 streams on lm while it is reloaded, 4 on lm2 while it is unloaded."""
    out = {}
    for op, model in (("reload", "lm"), ("unload", "lm2")):
        peers = [Peer(svc.endpoint) for _ in range(4)]
        rids = [p.send("generate", {"prompt": [1 + i, 2, 3], "max_new_tokens": 300,
                                    "model": model}) for i, p in enumerate(peers)]
        for p, r in zip(peers, rids):
            p.wait([r], WAIT, piece=True)             # every stream under way
        t0 = time.monotonic()
        try:
            getattr(c, op)(model)
            reply = "ok"
        except EdgertError as e:
            reply = str(e)
        swap_s = time.monotonic() - t0
        ends: dict = {}
        for p, r in zip(peers, rids):
            p.wait([r], WAIT)
            rep = p.final.get(r)
            end = "no reply" if rep is None else "finished" if rep.ok else rep.code
            ends[end] = ends.get(end, 0) + 1
            p.close()
        out[op] = {"reply": reply, "seconds": swap_s, "streams": ends}
    return out


def refused(curve: Served, keys: Path) -> dict:
    bound = REFUSED_TIMEOUT * (REFUSED_RETRIES + 1) + 1.0
    try:
        run = subprocess.run(_python() + ["-c", REFUSED, curve.endpoint, str(keys / "server.key"),
                                          str(keys / "refused.key_secret"),
                                          str(REFUSED_TIMEOUT), str(REFUSED_RETRIES)],
                             capture_output=True, text=True, timeout=WAIT)
        ends = [json.loads(ln) for ln in run.stdout.splitlines()]
    except subprocess.TimeoutExpired:
        ends = []
    within = sum(e["end"] == "ServiceUnavailable" and e["s"] <= bound for e in ends)
    return {"clients": 20, "within_bound": within, "returned": len(ends), "bound_s": bound,
            "max_s": max((e["s"] for e in ends), default=None),
            "ends": sorted({e["end"] for e in ends})}


class KvDir:
    """``n`` services on one kv_cache.dir of KV_BUDGET bytes (started at once, measured
    later: their start overlaps other cases)."""

    def __init__(self, n: int, moe: str, cfg, work: Path):
        import yaml
        doc = yaml.safe_load(Path(cfg.source).read_text())
        doc["memory"] = {**doc["memory"], "prefault": False}      # n arenas: no need to touch
        self.kv = work / "kv"
        doc["kv_cache"] = {**doc.get("kv_cache", {}), "chunk_tokens": KV_CHUNK,
                           "disk": KV_BUDGET, "dir": str(self.kv), "host": 0}
        work.mkdir(parents=True)
        (work / "kv.yaml").write_text(yaml.safe_dump(doc))
        self.procs = [Served(["--pack", f"lm={moe}", "--config", str(work / "kv.yaml"),
                              "--bind", f"ipc://{work}/{k}.sock"], work / str(k))
                      for k in range(n)]

    def measure(self, prompts: int) -> dict:
        """Each service prefills ``prompts`` distinct prompts at once; the directory's size
        sampled every 5 ms, and after every service stopped (which flushes its writes)."""
        from ..control.client import Client
        peak, stop, errors = [0], threading.Event(), []

        def sample():
            while not stop.wait(0.005):
                peak[0] = max(peak[0], _dir_bytes(self.kv))

        def drive(s: Served, k: int):
            try:
                with Client(s.endpoint, timeout=WAIT) as cl:
                    for i in range(prompts):
                        ids = np.random.default_rng(10_000 * k + i).integers(0, 256, KV_PROMPT)
                        cl.generate(ids.tolist(), max_new_tokens=1, model="lm")
            except EdgertError as e:
                errors.append(str(e))

        for s in self.procs:
            s.ready()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=drive, args=(s, k)) for k, s in enumerate(self.procs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        exits = [s.close() for s in self.procs]
        stop.set()
        sampler.join()
        final = _dir_bytes(self.kv)
        return {"processes": len(self.procs), "budget": KV_BUDGET, "final": final,
                "peak": max(peak[0], final), "exits": exits, "errors": errors}

    def close(self) -> None:
        for s in self.procs:
            s.close(signal.SIGKILL)


def _dir_bytes(d: Path) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def second_serve(svc: Served, moe: str, config: list, env: dict) -> dict:
    from ..control.client import Client
    second = Served(["--pack", f"lm={moe}", *config], Path(svc.out).parent / "second", env)
    started = until(lambda: "ready on" in second.out.read_text() or second.proc.poll() is not None,
                    WAIT) and "ready on" in second.out.read_text()
    rc = second.close()
    err = [ln for ln in second.err.read_text().splitlines() if ln.strip()]
    with Client(svc.endpoint, timeout=5, retries=0) as fresh:
        try:
            first = fresh.health()["status"] == "ok"
        except EdgertError:
            first = False
    return {"refused": not started and rc not in (0, None), "exit": rc,
            "message": err[-1] if err else "", "first_answers": first}
