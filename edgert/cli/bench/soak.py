"""`edgert bench soak`: the device service under load, then under the faults and hostile
callers of issue 17, from outside, as other processes on the device would drive it.

Setup: `edgert serve` on the demo packs (tasks, lm, and lm2: the same MoE pack under a second
name) on its default ipc endpoint, in a private XDG_RUNTIME_DIR; a second service with CURVE
on (lm only, TCP loopback) for the cases that need authentication.

  soak        N client processes x M mixed requests (health, stats, switch, infer, generate
              16 tokens), five rounds: errors, p50/p99 per op, service RSS before/after/peak;
              rounds 2-5 against the first
  disconnect  100 sockets x 16 generate(1000), then every socket closes: time until the
              service holds no job, CPU seconds spent on work whose caller had gone (the
              service's own account, and the process's CPU over the same window), caps fired
  frames      one 2000 x 1 MiB message from each of a refused key, a plain-text socket and a
              wrong server key (CURVE service): its peak RSS; 256 x 1 MiB from an allowed key
  batch       4096 images, and the largest batch under the frame limit `hello` states: how
              each ended, RSS after against before
  reload      4 streams on lm, reload lm; 4 on lm2, unload lm2: how each stream ended
  refused     20 clients with a refused key (timeout 1 s, 1 retry): ServiceUnavailable within
              timeout x (retries + 1) + 1 s
  kv dir      2 and 4 services on one kv_cache.dir: its peak size against its budget
  endpoint    a second `edgert serve` on the default endpoint: refused? the first answers?

Targets (issue 17) are printed beside each figure, met or missed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ...config import resolve
from ...errors import EdgertError
from ...stats import summary
from .control import TASKS_PACK, Child, _moe_pack, _python
from .output import pyplot, save, write_json

WAIT = 120
MiB = 1 << 20
OPS = ("health", "stats", "switch", "infer", "generate")
WEIGHTS = (0.25, 0.10, 0.20, 0.30, 0.15)
GONE_S, ORPHAN_CPU_S = 2.0, 2.0          # targets: no job left within 2 s, <= 2 CPU-s on them
UNAUTH_PEAK = 64 * MiB                   # target: +<= 64 MiB for a peer not allowed in
RSS_BATCH, RSS_ROUNDS, KV_SLACK = 1.10, 1.05, 1.05
REFUSED_TIMEOUT, REFUSED_RETRIES = 1.0, 1
KV_BUDGET, KV_CHUNK, KV_PROMPT = 1 * MiB, 64, 448

# A load generator: on each "go N SEED" line, N mixed requests; one JSON line of latencies
# (ms per op) and error codes back.
WORKER = r"""
import json, random, sys, time
import numpy as np
from edgert.control.client import Client, RemoteError, ServiceUnavailable
ops, weights = json.loads(sys.argv[2]), json.loads(sys.argv[3])
c = Client(sys.argv[1], timeout=30, retries=1)
tasks = next(m for m in c.hello()["models"] if m["name"] == "tasks")
(name, spec), = tasks["inputs"].items()
x = np.zeros([d if isinstance(d, int) else 1 for d in spec["shape"]], spec["dtype"])
print("ready", flush=True)
for line in sys.stdin:
    _, n, seed = line.split()
    rng = random.Random(int(seed))
    ms, errors = {op: [] for op in ops}, {}
    for _ in range(int(n)):
        op = rng.choices(ops, weights)[0]
        t0 = time.perf_counter()
        try:
            if op == "health": c.health()
            elif op == "stats": c.stats()
            elif op == "switch": c.switch(rng.choice(tasks["tasks"]), model="tasks")
            elif op == "infer": c.infer({name: x}, task=rng.choice(tasks["tasks"]), model="tasks")
            else: c.generate([rng.randrange(256) for _ in range(8)], max_new_tokens=16, model="lm")
        except RemoteError as e:
            errors[e.code] = errors.get(e.code, 0) + 1
        except ServiceUnavailable:
            errors["unavailable"] = errors.get("unavailable", 0) + 1
        ms[op].append(1e3 * (time.perf_counter() - t0))
    print(json.dumps({"ms": ms, "errors": errors}), flush=True)
"""

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


def register(sub) -> None:
    p = sub.add_parser("soak", help="the device service under load, faults and hostile callers")
    p.add_argument("--quick", action="store_true", help="4 clients x 50 requests; under a minute")
    p.add_argument("--json", metavar="OUT", help="write raw figures here")
    p.add_argument("--config", help="device config (default: cpu-dev)")
    p.add_argument("--tasks", default=TASKS_PACK, metavar="PACK")
    p.add_argument("--moe", metavar="PACK", help="MoE pack (default: the demo's)")
    p.add_argument("--clients", type=int, metavar="N", help="soak clients (default 8; quick 4)")
    p.add_argument("--requests", type=int, metavar="M",
                   help="requests per client per round (default 500; quick 50)")
    p.add_argument("--plot", default="docs/img/bench-soak.png")
    p.set_defaults(func=main)


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

        from ...control.auth import curve_client
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
        from ...control.protocol import encode_request
        rid, self.next_id = self.next_id, self.next_id + 1
        try:
            self.sock.send_multipart(encode_request(rid, op, args) + list(extra),
                                     self.zmq.NOBLOCK, copy=False)
        except self.zmq.Again:
            return None                   # nowhere to queue it (a refused connection)
        return rid

    def pump(self, timeout: float) -> None:
        """Take the replies that arrive within ``timeout`` (beats skipped)."""
        from ...control.protocol import decode_reply
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


# --- the benchmark --------------------------------------------------------------------------------
def main(args) -> int:
    from ...control.auth import generate as make_keys
    from ...control.client import Client
    q = args.quick
    n_clients = args.clients or (4 if q else 8)
    n_requests = args.requests or (50 if q else 500)
    cfg = resolve(args.config)
    if not os.path.exists(args.tasks):
        raise EdgertError(f"no task pack at {args.tasks}; run tools/demo.sh first, or pass "
                          "--tasks PACK")
    moe = _moe_pack(args.moe)
    print(f"edgert bench soak{' --quick' if q else ''}: config {cfg.name}, tasks {args.tasks}, "
          f"moe {moe}, {n_clients} clients x {n_requests} requests x 5 rounds, "
          f"{os.cpu_count()} CPUs")
    t_start = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="edgert-soak-")
    root = Path(tmp.name)
    run_dir = root / "run"
    run_dir.mkdir(mode=0o700)
    keys = root / "keys"
    for who in ("server", "ok", "refused"):
        make_keys(keys, who)
    (keys / "allow").mkdir()
    (keys / "allow" / "ok.key").write_bytes((keys / "ok.key").read_bytes())
    config = ["--config", args.config] if args.config else []
    main_env = {"XDG_RUNTIME_DIR": str(run_dir)}
    svc = Served(["--pack", f"tasks={args.tasks}", "--pack", f"lm={moe}", "--pack",
                  f"lm2={moe}", *config], root / "main", main_env)
    curve = Served(["--pack", f"lm={moe}", *config, "--bind", "tcp://127.0.0.1:0",
                    "--curve-secret", str(keys / "server.key_secret"),
                    "--allow-dir", str(keys / "allow")], root / "curve")
    workers: list[Child] = []
    kv_sets: list[KvDir] = []
    r: dict = {"config": cfg.name, "quick": q, "clients": n_clients, "requests": n_requests}
    try:
        svc.ready()
        curve.ready()
        ok_keys = (str(keys / "server.key"), str(keys / "ok.key_secret"))
        c = Client(svc.endpoint, timeout=WAIT)
        workers = [Child(_python() + ["-c", WORKER, svc.endpoint, json.dumps(OPS),
                                      json.dumps(WEIGHTS)], "ready") for _ in range(n_clients)]
        phases = r["phase_s"] = {"start": time.monotonic() - t_start}

        def phase(name, fn, *a):
            t0 = time.monotonic()
            r[name] = fn(*a)
            phases[name] = time.monotonic() - t0

        phase("rounds", lambda: [soak_round(svc, c, workers, n_requests, k) for k in range(5)])
        for w in workers:
            w.close()
        workers = []
        kv_sets = [KvDir(n, moe, cfg, root / f"kv{n}") for n in (2, 4)]
        phase("disconnect", disconnect, svc, c)
        phase("frames", frames, curve, keys, ok_keys, 256 if q else 2000)
        phase("batch", batch, svc, c)
        phase("reload", drains, svc, c)
        phase("refused", refused, curve, keys)
        phase("kv_dir", lambda: {str(len(k.procs)): k.measure(8 if q else 24)
                                 for k in kv_sets})
        phase("endpoint", second_serve, svc, moe, config, main_env)
        r["service"] = c.stats()["service"]
        c.close()
        t0 = time.monotonic()
        r["sigterm"] = {"exit": svc.close(), "s": time.monotonic() - t0}
    finally:
        for w in workers:
            w.close()
        for k in kv_sets:
            k.close()
        svc.close()
        curve.close()
        tmp.cleanup()
    report(r)
    write_json(r, args.json)
    if not q:
        plot(r, args.plot)
    return 0


def soak_round(svc: Served, c, workers: list[Child], n: int, k: int) -> dict:
    svc.reset_peak()
    before = svc.rss()
    for i, w in enumerate(workers):
        w.proc.stdin.write(f"go {n} {1000 * k + i}\n")
        w.proc.stdin.flush()
    t0 = time.perf_counter()
    got = [json.loads(w.readline()) for w in workers]
    seconds = time.perf_counter() - t0
    ms = {op: [v for g in got for v in g["ms"][op]] for op in OPS}
    errors: dict = {}
    for g in got:
        for code, m in g["errors"].items():
            errors[code] = errors.get(code, 0) + m
    idle = until(lambda: c.health()["jobs"] == 0, WAIT)
    return {"seconds": seconds, "ms": {op: summary(v) for op, v in ms.items()}, "raw_ms": ms,
            "errors": errors, "rss_before": before, "rss_after": svc.rss(), "peak": svc.peak(),
            "idle_after": idle}


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
    from ...control.client import Client
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
        from ...control.client import Client
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
    from ...control.client import Client
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


# --- the table ------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(r: dict) -> None:
    rounds = r["rounds"]
    first = rounds[0]
    errors = sum(sum(x["errors"].values()) for x in rounds)
    secs = ", ".join(f"{x['seconds']:.1f}" for x in rounds)
    codes: dict = {}
    for x in rounds:
        for code, n in x["errors"].items():
            codes[code] = codes.get(code, 0) + n
    print(f"\nsoak: {r['clients']} clients x {r['requests']} mixed requests, 5 rounds "
          f"({secs} s)")
    print(f"  errors {errors} {codes}   [target 0: {verdict(errors == 0)}]")
    print("  op         n     p50 ms   p99 ms   (all rounds, per-round medians)")
    for op in OPS:
        n = sum(x["ms"][op].get("n", 0) for x in rounds)
        p50 = np.median([x["ms"][op]["p50"] for x in rounds if x["ms"][op]])
        p99 = np.median([x["ms"][op]["p99"] for x in rounds if x["ms"][op]])
        print(f"  {op:<9} {n:>5} {p50:>9.2f} {p99:>8.2f}")
    base = first["rss_after"]
    worst = max(abs(x["rss_after"] - base) / base for x in rounds[1:])
    print(f"  service RSS MiB before/after/peak per round: " + ", ".join(
        f"{x['rss_before'] / MiB:.0f}/{x['rss_after'] / MiB:.0f}/{x['peak'] / MiB:.0f}"
        for x in rounds))
    signed = ", ".join(f"{100 * (x['rss_after'] - base) / base:+.1f}%" for x in rounds[1:])
    print(f"  rounds 2-5 RSS after vs round 1: {signed}   "
          f"[target within 5%: {verdict(worst <= RSS_ROUNDS - 1)}]")

    d = r["disconnect"]
    print(f"\n100 sockets x 16 generate(1000), then all disconnect: {d['admitted']} admitted, "
          f"refused {d['refused']}, caps fired {d['caps']}")
    print(f"  no job left after {d['gone_s']:.2f} s   [target <= {GONE_S:.0f} s: "
          f"{verdict(d['idle'] and d['gone_s'] <= GONE_S)}]")
    print(f"  CPU on work whose caller had gone: {d['orphaned_cpu_s']:.2f} s ({d['orphaned_jobs']} "
          f"jobs; the whole process {d['process_cpu_s']:.2f} CPU-s over that time)   "
          f"[target <= {ORPHAN_CPU_S:.0f} CPU-s: {verdict(d['orphaned_cpu_s'] <= ORPHAN_CPU_S)}]")

    f = r["frames"]
    u, a = f["unauthenticated"], f["authenticated"]
    print(f"\n2000 x 1 MiB from a refused key, a plain-text socket and a wrong server key: "
          f"service peak +{u['peak_mib']:.1f} MiB, {u['handshakes_failed']} of 3 handshakes "
          f"failed, {u['replies']} replies   "
          f"[target <= 64 MiB: {verdict(u['peak_mib'] <= UNAUTH_PEAK / MiB)}]")
    print(f"  {a['frames']} x {a['frame_bytes'] / MiB:.2f} MiB from an allowed key: peak "
          f"+{a['peak_mib']:.0f} MiB, reply {a['reply']}   [target: within the bound "
          "docs/protocol.md states; not checked here]")

    print("\nhuge task batch (RSS MiB before -> after, peak)")
    for n, b in r["batch"].items():
        ok = b["rss_after"] <= RSS_BATCH * b["rss_before"]
        print(f"  {n:>5} images ({b['mib']:.0f} MiB): {b['end']:<32} "
              f"{b['rss_before'] / MiB:.0f} -> {b['rss_after'] / MiB:.0f} "
              f"({b['peak'] / MiB:.0f})   [target refused or run, RSS within 10%: "
              f"{verdict(ok and 'internal' not in b['end'])}]")

    print("\nunder 4 streams")
    for op, x in r["reload"].items():
        bad = x["streams"].get("model_closed", 0) + x["streams"].get("no reply", 0)
        print(f"  {op:<7} {x['reply']:<4} after {x['seconds']:.2f} s; streams {x['streams']}   "
              f"[target 0 model_closed: {verdict(bad == 0 and x['reply'] == 'ok')}]")

    x = r["refused"]
    print(f"\n20 clients with a refused key: {x['within_bound']} raised ServiceUnavailable "
          f"within {x['bound_s']:.0f} s ({x['returned']} returned, slowest "
          f"{x['max_s'] if x['max_s'] is None else round(x['max_s'], 2)} s)   "
          f"[target 20: {verdict(x['within_bound'] == 20)}]")

    for n, k in r["kv_dir"].items():
        ratio = k["peak"] / k["budget"]
        print(f"{n} services on one kv_cache.dir: peak {k['peak'] / MiB:.2f} MiB of "
              f"{k['budget'] / MiB:.0f} MiB ({ratio:.2f}x), exits {k['exits']}   "
              f"[target <= 1.05x: {verdict(ratio <= KV_SLACK)}]")
    e = r["endpoint"]
    print(f"a second serve on the default endpoint: {'refused' if e['refused'] else 'STARTED'}"
          f" (exit {e['exit']}: {e['message']}); the first answers: {e['first_answers']}   "
          f"[target refused, first answers: {verdict(e['refused'] and e['first_answers'])}]")
    s = r["service"]
    print("seconds per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in r["phase_s"].items()))
    print(f"service totals: caps {s.get('caps')}, orphaned {s.get('orphaned')}, disconnects "
          f"{s.get('disconnects')}, errors {s.get('errors')}; SIGTERM: exit {r['sigterm']['exit']}"
          f" after {r['sigterm']['s']:.2f} s")


def plot(r: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    rounds = r["rounds"]
    ks = range(1, len(rounds) + 1)
    axes[0].plot(ks, [x["rss_after"] / MiB for x in rounds], "o-", label="after")
    axes[0].plot(ks, [x["peak"] / MiB for x in rounds], "s--", label="peak")
    axes[0].set_xticks(list(ks))
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("service RSS (MiB)")
    axes[0].legend()
    pos = np.arange(len(OPS))
    for j, what in enumerate(("p50", "p99")):
        axes[1].bar(pos + 0.4 * j, [np.median([x["ms"][op][what] for x in rounds]) for op in OPS],
                    0.4, label=what)
    axes[1].set_xticks(pos + 0.2, OPS)
    axes[1].set_ylabel("ms")
    axes[1].set_yscale("log")
    axes[1].legend()
    fig.suptitle(f"edgert bench soak ({r['config']}): {r['clients']} clients x "
                 f"{r['requests']} requests x 5 rounds", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save(fig, path)
