"""`edgert bench control`: what the device service costs over calling the runtime in-process.

Setup: `edgert serve` on the demo packs in a child process (ipc endpoint in a private temp
directory), and the same packs loaded in this process with the same config.

Round trips per second, 1 and 8 client processes, each as fast as it can for a fixed time:
  service, edgert.Client   `health` through the client users get (Lazy Pirate, typed replies)
  service, raw DEALER      `health` from a bare pyzmq socket (the service's share alone)
  echo ROUTER, raw DEALER  a Python ROUTER that sends each message back undecoded: the floor
                           of Python + pyzmq round trips on this machine (no service can be
                           faster than this with the same sockets and interpreter)
Overhead against the in-process API, alternated pair by pair (the one going first rotates):
  switch     m.switch(t)                 vs client.switch(t), one fixed task sequence
  infer      m.run({"image": x})         vs client.infer(...), the demo ViT input [1,3,112,112]
  generate   lm.generate(ids, stream)    vs client.generate(ids, stream): time to the first
             token and tokens per second after it, greedy (outputs compared)
Targets: health >= 10,000 round trips/s with 8 clients; switch and infer add <= 1 ms at the
median; streamed generate within 5% of in-process tokens per second.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import resolve
from ..errors import EdgertError
from ..stats import summary
from .output import pyplot, save, write_json

WAIT = 120
MOE_PACKS = ("models/out/moe.edgepack", "models/out/moe/model.edgepack",
             "models/out/moe-demo.edgepack")
PROMPT = "import os\nimport sys\n\ndef main(argv):\n    "

# A load generator process: connects, warms up, then on each "go SECONDS" line runs round
# trips for that long and prints how many it made. Modes: client | raw.
WORKER = r"""
import sys, time
import msgpack, zmq
mode, endpoint = sys.argv[1], sys.argv[2]
if mode == "client":
    from edgert.control.client import Client
    c = Client(endpoint, timeout=30)
    once = c.health
else:
    s = zmq.Context().socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    ids = iter(range(1, 1 << 62))
    def once():
        s.send(msgpack.packb({"v": 1, "id": next(ids), "op": "health", "args": {}}))
        s.recv_multipart()
for _ in range(200):
    once()
print("ready", flush=True)
for line in sys.stdin:
    secs = float(line.split()[1])
    n, t0 = 0, time.perf_counter()
    end = t0 + secs
    while time.perf_counter() < end:
        once()
        n += 1
    print(n, time.perf_counter() - t0, flush=True)
"""

ECHO = r"""
import sys, zmq
s = zmq.Context().socket(zmq.ROUTER)
s.linger = 0
s.bind(sys.argv[1])
print("ready on", s.last_endpoint.decode(), flush=True)
while True:
    s.send_multipart(s.recv_multipart(copy=False), copy=False)
"""


def with_threads(cfg, threads: int, where: str) -> str:
    """A copy of ``cfg``'s YAML with ``threads`` changed, written under ``where``."""
    import yaml
    doc = yaml.safe_load(Path(cfg.source).read_text())
    doc["threads"] = threads
    doc["name"] = f"{doc.get('name', cfg.name)}-{threads}t"
    out = Path(where) / "config.yaml"
    out.write_text(yaml.safe_dump(doc))
    return str(out)


# --- child processes ------------------------------------------------------------------------------
class Child:
    """A child process that prints a first line when ready."""

    def __init__(self, cmd: list[str], ready: str):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        line = self.readline()
        if ready not in line:
            self.close()
            raise EdgertError(f"{' '.join(cmd[:4])}...: expected {ready!r}, got {line!r}")
        self.first = line

    def readline(self, timeout: float = WAIT) -> str:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise EdgertError(f"a benchmark child process went silent for {timeout:.0f} s")
        return self.proc.stdout.readline()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _python() -> list[str]:
    return [sys.executable]


def round_trips(workers: list[Child], seconds: float) -> float:
    """Round trips per second of ``workers`` running together for ``seconds``."""
    for w in workers:
        w.proc.stdin.write(f"go {seconds}\n")
        w.proc.stdin.flush()
    total = 0.0
    for w in workers:
        n, elapsed = w.readline().split()
        total += int(n) / float(elapsed)
    return total


# --- timing helpers -------------------------------------------------------------------------------
def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def stream_times(start) -> tuple[float, float, list]:
    """(ms to the first piece, pieces per second after it, the pieces) of the stream
    ``start()`` returns."""
    t0 = time.perf_counter()
    stamps, out = [], []
    for p in start():
        stamps.append(time.perf_counter())
        out.append(p)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return 1e3 * (stamps[0] - t0), rate, out


def _moe_pack(arg: str | None) -> str:
    if arg:
        return arg
    for p in MOE_PACKS:
        if os.path.exists(p):
            return p
    raise EdgertError("no demo MoE pack (models/out/moe.edgepack or moe-demo.edgepack); run "
                      "tools/demo.sh first, or pass --moe PACK")


# --- the benchmark --------------------------------------------------------------------------------
def main(args) -> int:
    from ..control.client import Client
    from ..runtime import Runtime
    tmp = tempfile.TemporaryDirectory(prefix="edgert-bench-")
    config = args.config
    if args.threads:
        config = with_threads(resolve(args.config), args.threads, tmp.name)
    cfg = resolve(config)
    if not os.path.exists(args.tasks):
        raise EdgertError(f"no task pack at {args.tasks}; run tools/demo.sh first, or pass "
                          "--tasks PACK")
    moe = _moe_pack(args.moe)
    q = args.quick
    seconds, repeats = (1.0, 1) if q else (3.0, 3)
    n_switch, n_infer, n_gen, gen_tokens = (20, 20, 2, 32) if q else (60, 60, 6, 96)
    print(f"edgert bench control{' --quick' if q else ''}: config {cfg.name} ({cfg.threads} "
          f"compute threads), tasks {args.tasks}, moe {moe}, {os.cpu_count()} CPUs")
    endpoint = f"ipc://{tmp.name}/svc.sock"
    children: list[Child] = []
    try:
        svc = Child(_python() + ["-m", "edgert", "serve", "--pack", f"tasks={args.tasks}",
                                 "--pack", f"lm={moe}", "--bind", endpoint]
                    + (["--config", config] if config else []), "ready on")
        children.append(svc)
        echo = Child(_python() + ["-c", ECHO, f"ipc://{tmp.name}/echo.sock"], "ready on")
        children.append(echo)
        echo_ep = echo.first.split("ready on ")[1].strip()

        # -- health round trips --------------------------------------------------------------
        pools = {}
        for name, mode, ep in (("service, edgert.Client", "client", endpoint),
                               ("service, raw DEALER", "raw", endpoint),
                               ("echo ROUTER, raw DEALER", "raw", echo_ep)):
            pools[name] = [Child(_python() + ["-c", WORKER, mode, ep], "ready")
                           for _ in range(8)]
            children += pools[name]
        rts = {f"{name} x{k}": [] for name in pools for k in (1, 8)}
        order = list(pools)
        for r in range(repeats):
            for k in (1, 8):
                for name in order[r % len(order):] + order[:r % len(order)]:
                    rts[f"{name} x{k}"].append(round_trips(pools[name][:k], seconds))
        for name in pools:
            for w in pools[name]:
                w.close()
        print("\nround trips per second (median of repeats, min..max)")
        for key, v in rts.items():
            print(f"  {key:<28} {np.median(v):>10,.0f}   {min(v):,.0f}..{max(v):,.0f}")

        # -- the in-process contenders -------------------------------------------------------
        rt = Runtime(cfg)
        m = rt.load(args.tasks, name="tasks")
        lm = rt.load(moe, name="lm")
        c = Client(endpoint, timeout=WAIT)
        shape = [d if isinstance(d, int) else 1 for d in m.engine.inputs["image"][1]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        tasks = m.tasks
        seq = [tasks[(i * 3 + 1) % len(tasks)] if i % 2 else tasks[0] for i in range(n_switch)]
        for t in tasks + [tasks[0]]:                     # warm both: every block seen once
            m.switch(t)
            c.switch(t)
        sw = {"in-process": [], "service": []}
        for i, t in enumerate(seq):
            pair = [("in-process", lambda: m.switch(t)), ("service", lambda: c.switch(t))]
            for name, fn in (pair if i % 2 == 0 else pair[::-1]):
                sw[name].append(timed(fn))
        # warm both sides until each runs on its pre-packed session (or says why not)
        for _ in range(4):
            m.run({"image": x})
            c.infer({"image": x})
        m.wait_prepacked(WAIT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            eng = c.stats("tasks")["engine"]
            if eng["prepacked"] or eng["prepack_skipped"]:
                break
            time.sleep(0.1)
        sessions = {"in-process": m.stats()["engine"]["prepacked"],
                    "service": c.stats("tasks")["engine"]["prepacked"]}
        inf = {"in-process": [], "service": []}
        for i in range(n_infer):
            pair = [("in-process", lambda: m.run({"image": x})),
                    ("service", lambda: c.infer({"image": x}))]
            for name, fn in (pair if i % 2 == 0 else pair[::-1]):
                inf[name].append(timed(fn))
        same = np.array_equal(m.run({"image": x})["logits"], c.infer({"image": x})["logits"])

        gen = {"in-process": {"ttft_ms": [], "tok_s": []}, "service": {"ttft_ms": [], "tok_s": []}}
        exact = True
        tok = lm.tokenizer
        for i in range(n_gen + 1):                        # round 0 warms up, not counted
            ids = tok.encode(f"# {i}\n" + PROMPT) if tok else [1 + i, 2, 3, 4]
            pair = [("in-process", lambda: lm.generate(ids, max_new_tokens=gen_tokens,
                                                       stream=True)),
                    ("service", lambda: c.generate(ids, max_new_tokens=gen_tokens,
                                                   stream=True))]
            outs = []
            for name, start in (pair if i % 2 == 0 else pair[::-1]):
                ttft, rate, out = stream_times(start)
                outs.append(out)
                if i:
                    gen[name]["ttft_ms"].append(ttft)
                    gen[name]["tok_s"].append(rate)
            exact &= outs[0] == outs[1]
        served = {"switch_ms": c.stats("tasks")["switch_ms"], "run_ms": c.stats("tasks")["run_ms"]}
        c.close()
        rt.close()
    finally:
        for ch in reversed(children):
            ch.close()
        tmp.cleanup()

    result = {"config": cfg.name, "threads": cfg.threads, "quick": q, "seconds": seconds, "repeats": repeats,
              "round_trips_per_s": rts, "switch_ms": {k: summary(v) for k, v in sw.items()},
              "infer_ms": {k: summary(v) for k, v in inf.items()}, "prepacked": sessions,
              "infer_outputs_equal": bool(same), "generate_tokens": gen_tokens,
              "generate": {k: {kk: summary(vv) for kk, vv in v.items()} for k, v in gen.items()},
              "generate_outputs_equal": bool(exact), "inside_the_service": served,
              "raw": {"switch_ms": sw, "infer_ms": inf, "generate": gen}}
    report(result)
    write_json(result, args.json)
    if not q:
        plot(result, args.plot)
    return 0


def report(r: dict) -> None:
    def p50(d):
        return d["p50"]

    print(f"\nswitch and infer (ms; median, p10..p90; {r['switch_ms']['service']['n']} and "
          f"{r['infer_ms']['service']['n']} pairs, alternated)")
    for what in ("switch_ms", "infer_ms"):
        a, b = r[what]["in-process"], r[what]["service"]
        print(f"  {what[:-3]:<8} in-process {p50(a):7.3f} ({a['p10']:.3f}..{a['p90']:.3f})   "
              f"service {p50(b):7.3f} ({b['p10']:.3f}..{b['p90']:.3f})   overhead "
              f"{p50(b) - p50(a):+.3f} ms   [target <= 1 ms]")
    print(f"  pre-packed sessions: {r['prepacked']}; outputs equal: {r['infer_outputs_equal']}")
    g = r["generate"]
    a, b = g["in-process"], g["service"]
    print(f"\ngenerate, {r['generate_tokens']} tokens, greedy ({a['tok_s']['n']} pairs)")
    print(f"  time to first token  in-process {p50(a['ttft_ms']):7.1f} ms   service "
          f"{p50(b['ttft_ms']):7.1f} ms   overhead {p50(b['ttft_ms']) - p50(a['ttft_ms']):+.1f} ms")
    ratio = p50(b["tok_s"]) / p50(a["tok_s"])
    print(f"  tokens/s             in-process {p50(a['tok_s']):7.1f}      service "
          f"{p50(b['tok_s']):7.1f}      service/in-process {ratio:.3f}   [target >= 0.95]")
    print(f"  outputs equal: {r['generate_outputs_equal']}")
    h = r["round_trips_per_s"]["service, edgert.Client x8"]
    print(f"\nhealth with 8 clients: {np.median(h):,.0f} round trips/s   [target >= 10,000]")


def plot(r: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    rts = r["round_trips_per_s"]
    names = list(rts)
    axes[0].barh(names, [np.median(rts[n]) for n in names], color="#4a7ab5")
    axes[0].axvline(10_000, color="k", ls="--", lw=0.8)
    axes[0].set_xlabel("round trips / s (median)")
    axes[0].tick_params(axis="y", labelsize=7)
    for ax, what in ((axes[1], "switch_ms"), (axes[2], "infer_ms")):
        data = [r["raw"][what]["in-process"], r["raw"][what]["service"]]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks([1, 2], ["in-process", "service"])
        ax.set_ylabel(f"{what[:-3]} (ms)")
    fig.suptitle(f"edgert bench control ({r['config']}): generate service/in-process tokens/s "
                 f"{r['generate']['service']['tok_s']['p50'] / r['generate']['in-process']['tok_s']['p50']:.3f}",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save(fig, path)
