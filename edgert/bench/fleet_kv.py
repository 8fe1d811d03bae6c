"""`edgert bench fleet`, part two: KV sharing between two devices, server throughput.

KV sharing (through the dir: store and through Redis): device A prefills a fresh
1024-token prompt and its chunks reach the server; device B (a runtime of its own, warmed
up) then prefills the same prompt: time to first token against device C, a runtime with no
server, recomputing it (B and C alternate; a new prompt each repeat). B's first-token logits
are compared with C's. Model: the demo MoE pack (`tools/demo.sh` builds it); both devices
use the config's chunk size with no host or disk tier.

Throughput: 32 simulated devices (one DEALER socket each, in this process, 4 requests in
flight each) register, then send a mix of switch reports, heartbeats and KV look-ups of 4
chunk names to `edgert server` processes: one on a dir: store, one on Redis, two on one
Redis (devices split between them). ops/s = replies received / seconds. The load generator
(requests encoded before the clock starts, replies decoded and counted) shares the
machine's cores with the servers; CPU per op of the servers and of Redis is printed too.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zmq

from ..config import KvCache, resolve
from ..stats import summary

DEVICES = 32
WINDOW = 4
RING = 48                # pre-encoded requests per simulated device (the op mix repeats every 12)
PROMPT = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server of our own on a free loopback port."""

    def __init__(self, tmp: str):
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = _free_port()
        self.p = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", tmp,
                                   "--maxmemory", "512mb", "--maxmemory-policy",
                                   "volatile-lru"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis
        r = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                r.ping()
                break
            except redis.RedisError:
                time.sleep(0.02)
        r.close()

    def cpu_s(self) -> float:
        """CPU seconds the redis-server process has used."""
        return _cpu_s(self.p.pid)

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(5)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def redis_available() -> bool:
    return bool(shutil.which("redis-server")) or os.path.exists("/usr/bin/redis-server")


# --- KV sharing ---------------------------------------------------------------------------
def bench_kv(args) -> dict:
    if not Path(args.moe_pack).exists():
        msg = f"no MoE pack at {args.moe_pack} (tools/demo.sh builds it); KV part skipped"
        print(msg)
        return {"skipped": msg}
    from ..server.backends import open_store
    from ..server.service import FleetServer
    out = {}
    repeats = 2 if args.quick else 5
    stores = ["dir"] + (["redis"] if redis_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in stores:
            red = Redis(tmp) if kind == "redis" else None
            store = open_store(red.url if red else f"dir:{tmp}/store")
            srv = FleetServer(store, "tcp://127.0.0.1:0")
            th = threading.Thread(target=srv.run, daemon=True)
            th.start()
            try:
                out[kind] = _kv_pairs(args, srv.endpoint, repeats, store)
            finally:
                srv.stop()
                th.join(5)
                store.close()
                if red:
                    red.stop()
    for kind, r in out.items():
        print(f"KV sharing via {kind}: TTFT shared {r['shared_ms']['p50']:.1f} ms, recompute "
              f"{r['recompute_ms']['p50']:.1f} ms, speedup {r['speedup']:.1f}x "
              f"(logits identical: {r['identical']})")
    return {"by_store": out,
            "kv_shared_ttft_speedup": {k: r["speedup"] for k, r in out.items()}}


def _kv_pairs(args, endpoint: str, repeats: int, store) -> dict:
    import edgert
    base = resolve(None)
    cfg = replace(base, kv_cache=KvCache(True, base.kv_cache.chunk_tokens, 0, 0, ""))
    a = edgert.Runtime(cfg, server=endpoint, device_id="kv-a")
    b = edgert.Runtime(cfg, server=endpoint, device_id="kv-b")
    c = edgert.Runtime(cfg, server="")
    try:
        lms = [rt.load(args.moe_pack, expert_budget=1.0) for rt in (a, b, c)]
        vocab = lms[0].cfg.vocab_size
        rng = np.random.default_rng(args.seed)
        for lm in lms:                                  # torch's one-time costs
            _ttft(lm, rng.integers(0, vocab, 16).tolist())
        for rt in (a, b):
            _until(lambda: rt.stats()["server"]["connected"], 10)
        shared, recompute, same = [], [], True
        chunks = PROMPT // cfg.kv_cache.chunk_tokens
        for i in range(repeats):
            ids = rng.integers(0, vocab, PROMPT).tolist()
            before = len(store.keys("kv:"))
            _ttft(lms[0], ids)                          # device A computes and publishes
            lms[0].kv.drain()
            _until(lambda: len(store.keys("kv:")) >= before + chunks, 30)
            order = ((1, shared), (2, recompute)) if i % 2 == 0 else \
                ((2, recompute), (1, shared))
            logits = {}
            for k, into in order:
                t, logits[k] = _ttft(lms[k], ids)
                into.append(1e3 * t)
            same &= bool(np.array_equal(logits[1], logits[2]))
        hit = lms[1].stats()["kv"]["prefix"]["tiers"]["server"]
    finally:
        for rt in (a, b, c):
            rt.close()
    s, r = summary(shared), summary(recompute)
    return {"shared_ms": s, "recompute_ms": r, "shared_ms_raw": shared,
            "recompute_ms_raw": recompute, "speedup": r["p50"] / s["p50"],
            "identical": same, "server_tier": hit}


def _ttft(lm, ids) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    with lm.sequence() as s:
        logits = s.feed(ids)
        int(np.argmax(logits))
        return time.perf_counter() - t0, np.array(logits)


def _until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


# --- throughput ---------------------------------------------------------------------------
def _server(store: str, port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "edgert", "server", "--bind",
                          f"tcp://127.0.0.1:{port}", "--store", store, "--heartbeat", "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = p.stdout.readline()
    if "ready on" not in line:
        p.kill()
        raise RuntimeError(f"edgert server did not start: {line}")
    return p


def _stop(p: subprocess.Popen) -> None:
    """A clean stop (the server writes its state back: on a dir: store an fsync per key,
    seconds on a busy disk), killed only if it hangs."""
    p.terminate()
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def bench_ops(args) -> dict:
    from ..control.protocol import decode_reply, encode_request
    seconds = 2.0 if args.quick else 5.0
    setups = [("dir", 1)] + ([("redis", 1), ("redis", 2)] if redis_available() else [])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n in setups:
            red = Redis(tmp) if kind == "redis" else None
            ports = [_free_port() for _ in range(n)]
            procs = [_server(red.url if red else f"dir:{tmp}/ops", p) for p in ports]
            try:
                cpu0 = [_cpu_s(p.pid) for p in procs], red.cpu_s() if red else 0.0
                r = _load(ports, seconds, encode_request, decode_reply)
                cpu1 = [_cpu_s(p.pid) for p in procs], red.cpu_s() if red else 0.0
                # NOTE: CPU per op holds on a shared machine where ops/s does not
                r["server_cpu_us_per_op"] = 1e6 * (sum(cpu1[0]) - sum(cpu0[0])) / max(1, r["ops"])
                r["redis_cpu_us_per_op"] = 1e6 * (cpu1[1] - cpu0[1]) / max(1, r["ops"])
                out[f"{kind}x{n}"] = r
            finally:
                for p in procs:
                    _stop(p)
                if red:
                    red.stop()
    for k, r in out.items():
        print(f"server ops/s, {DEVICES} devices, {k}: {r['ops_per_s']:.0f} "
              f"({r['errors']} errors; CPU per op: servers {r['server_cpu_us_per_op']:.0f} us, "
              f"Redis {r['redis_cpu_us_per_op']:.0f} us; load average "
              f"{os.getloadavg()[0]:.1f})")
    return {"by_setup": out, "server_ops_per_s": {k: r["ops_per_s"] for k, r in out.items()}}


def _load(ports: list[int], seconds: float, encode_request, decode_reply) -> dict:
    ctx = zmq.Context.instance()
    socks = []
    for i in range(DEVICES):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{ports[i % len(ports)]}")
        socks.append(s)
    names = [f"{j:032x}" for j in range(4)]
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    try:
        for i, s in enumerate(socks):
            s.send_multipart(encode_request(0, "register", {"device": f"sim-{i}", "packs": []}))
        for s in socks:
            assert s.poll(10000), "no reply to register"
            s.recv_multipart()
        rid, ok, errors = 1, 0, 0

        def request(i: int, k: int) -> list:
            dev = f"sim-{i}"
            if k % 4 == 0:
                return encode_request(k, "switch", {"device": dev, "model": "m" * 8,
                                                    "task": ("a", "b", "c")[k % 3],
                                                    "t": 1.7e9 + k, "current": None})
            if k % 4 == 1:
                return encode_request(k, "beat", {"device": dev})
            return encode_request(k, "kv_lookup", {"device": dev, "model": "ab" * 16,
                                                   "names": names})
        # NOTE: requests are encoded before the clock starts (a ring of RING per device,
        # ids reused): encoding them in the loop made this one Python process, not the
        # server, the bottleneck (profiled: the server idle half the time). Devices encode
        # their own requests on their own CPUs.
        rings = [[request(i, 1 + i * RING + k) for k in range(RING)] for i in range(DEVICES)]
        index = {s: i for i, s in enumerate(socks)}
        for i, s in enumerate(socks):
            for _ in range(WINDOW):
                s.send_multipart(rings[i][rid % RING])
                rid += 1
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            for s, _ in poller.poll(100):
                ring = rings[index[s]]
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if decode_reply(frames).ok:
                        ok += 1
                    else:
                        errors += 1
                    s.send_multipart(ring[rid % RING])
                    rid += 1
        dt = time.perf_counter() - t0
    finally:
        for s in socks:
            s.close(0)
    return {"ops_per_s": ok / dt, "ops": ok, "errors": errors, "seconds": dt,
            "servers": len(ports)}
