"""`edgert bench fleet`: the fleet server's prewarm prediction, KV sharing and throughput.

Workload (seeded, `workload()`): a small fleet of devices running the demo task pack
(models/out/tasks.edgepack, `tools/demo.sh` builds it) over simulated days, from Monday
00:00 UTC. The day has four 6-hour periods; in period p a device alternates between two
tasks (tasks[p], tasks[p+1], cyclically): the daily periodicity and the task-to-task
structure. Per-device differences: device d's day is shifted by d hours and it picks a
random task instead with probability 0.1 + 0.05 d. ``SWITCHES_PER_HOUR`` switches an hour.

Prediction: the first days are history (each device's switches reported to an in-process
server with a dir: store, as devices would have); the last day is replayed twice on fresh
device runtimes (one per device, arena = one task + a spare budget of two tasks' changed
blocks, O_DIRECT reads):
  alone      no server: spare slots keep the blocks switches displace (the device's own LRU)
  predicted  with the server: after each switch the device gets hints and prewarms spare
             slots; the replay waits for the prewarm to end (the idle time between switches)
A switch is *served from memory* when it read nothing from storage. Reported: that rate
both ways, switch p50/p99 both ways and their ratio, bytes prewarmed that no switch used.

KV sharing and server throughput: fleet_kv.py.
"""
from __future__ import annotations

import calendar
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..config import DeviceConfig
from ..stats import summary
from .output import pyplot, save, write_json

MONDAY = calendar.timegm((2024, 1, 1, 0, 0, 0))      # 2024-01-01 was a Monday
SWITCHES_PER_HOUR = 2
PREWARM_WAIT_S = 10.0


# --- the workload -------------------------------------------------------------------------
def workload(tasks: list[str], devices: int, days: int, seed: int) -> list[tuple]:
    """[(t, device, task)] in time order (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    n, out = len(tasks), []
    for d in range(devices):
        noise = 0.1 + 0.05 * d
        k = 0
        for hour in range(days * 24):
            p = ((hour + d) % 24) // 6
            pair = (tasks[p % n], tasks[(p + 1) % n])
            for _ in range(SWITCHES_PER_HOUR):
                t = MONDAY + hour * 3600 + float(rng.uniform(0, 3600))
                task = tasks[int(rng.integers(n))] if rng.random() < noise else pair[k % 2]
                k += 1
                out.append((t, d, task))
    out.sort()
    return out


def _switches(events: list[tuple]) -> list[tuple]:
    """Drop events that repeat a device's task (no switch)."""
    last, out = {}, []
    for t, d, task in events:
        if last.get(d) != task:
            out.append((t, d, task))
            last[d] = task
    return out


# --- prediction ---------------------------------------------------------------------------
def spare_budget(pack: str) -> tuple[int, int]:
    """(dense bytes of one task, two tasks' mean changed bytes against each other)."""
    from ..pack import PackReader
    with PackReader(pack) as r:
        blocks = {t: {b for s in r.task(t).values() for b in s.blocks} for t in r.tasks}
        dense = sum(s.nbytes for s in r.task(r.tasks[0]).values())
        diffs = [sum(r.blocks[b].length for b in blocks[a] - blocks[b_])
                 for a in r.tasks for b_ in r.tasks if a != b_]
    return dense, int(2 * np.mean(diffs))


def device_config(pack: str) -> DeviceConfig:
    dense, spare = spare_budget(pack)
    arena = dense + spare + (1 << 20)         # the run, the spare, slack
    return DeviceConfig.from_dict({
        "name": "bench-fleet", "threads": 1, "storage": {"read_mode": "direct"},
        "memory": {"total": arena + (128 << 20), "engine": 128 << 20, "experts": 0, "kv": 0}})


def replay(pack: str, switches: list[tuple], devices: int, server: str | None) -> dict:
    import edgert
    cfg = device_config(pack)
    rts, models = [], []
    for d in range(devices):
        rt = edgert.Runtime(cfg, server=server or "", device_id=f"bench-{d}")
        rts.append(rt)
        first = next(task for _, dd, task in switches if dd == d)
        models.append(rt.load(pack, name="tasks", task=first, prepack="off"))
    if server:                                # connected, and the snapshot's hints prewarmed
        for rt in rts:
            _wait(lambda: rt.stats()["server"]["connected"], 10)
            rt.fleet.wait_prewarmed(PREWARM_WAIT_S)
    times, from_mem, read, seen = [], [], [], set()
    for t, d, task in switches:
        m, rt = models[d], rts[d]
        if d not in seen:                     # the load made the first task active
            seen.add(d)
            continue
        if rt.fleet is not None:
            rt.fleet.clock = lambda t=t: t
            seq = rt.fleet.seq
        res = m.switch(task)
        times.append(1e3 * res.seconds)
        from_mem.append(res.from_storage == 0)
        read.append(res.bytes_read)
        if rt.fleet is not None:              # the idle time until the next switch
            _wait(lambda: rt.fleet.seq > seq, PREWARM_WAIT_S)
            rt.fleet.wait_prewarmed(PREWARM_WAIT_S)
    srv = [rt.stats()["server"] for rt in rts]
    storage = [m.storage.stats() for m in models]
    for rt in rts:
        rt.close()
    used = sum(s.get("used_prewarm_bytes", 0) for s in srv)
    return {"switches": len(times), "served_from_memory": float(np.mean(from_mem)),
            "switch_ms": summary(times), "switch_ms_raw": times,
            "prewarmed_bytes": sum(s["prewarmed_bytes"] for s in srv),
            "wrong_guess_bytes": sum(s["unused_prewarm_bytes"] for s in srv),
            "used_prewarm_bytes": used, "hints_used": sum(s["hints_used"] for s in srv),
            "bytes_read_per_switch": summary(read),
            "read_path": {"requested": cfg.storage.read_mode,
                          "used": sorted({st["mode"] for st in storage}),
                          "fallback": sorted({st["fallback_reason"] for st in storage} - {""})}}


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return False


def bench_predict(args, devices: int, days: int) -> dict:
    from ..pack import PackReader
    from ..server.backends import open_store
    from ..server.device import pack_fingerprint
    from ..server.service import FleetServer
    with PackReader(args.pack) as r:
        tasks, fp = list(r.tasks), pack_fingerprint(r)
    events = _switches(workload(tasks, devices, days, args.seed))
    last_day = MONDAY + (days - 1) * 86400
    history = [e for e in events if e[0] < last_day]
    measured = [e for e in events if e[0] >= last_day]
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"dir:{tmp}/store")
        srv = FleetServer(store, "tcp://127.0.0.1:0")
        thread = threading.Thread(target=srv.run, daemon=True)
        try:
            prev: dict[int, str] = {}
            for t, d, task in history:           # the fleet's history, as reported (before
                dev = f"bench-{d}"               # the loop runs: its ops are not thread-safe)
                srv.live[dev] = time.monotonic() + 1e9
                srv._switch({"device": dev, "model": fp, "task": task, "t": t,
                             "current": prev.get(d)})
                prev[d] = task
            srv.live.clear()
            thread.start()
            alone = replay(args.pack, measured, devices, None)
            pred = replay(args.pack, measured, devices, srv.endpoint)
        finally:
            srv.stop()
            if thread.is_alive():
                thread.join(5)
            else:
                srv._close()
            store.close()
    served_bytes = _served_bytes(args.pack, measured)
    return {"devices": devices, "days": days, "history_switches": len(history),
            "spare_budget_bytes": spare_budget(args.pack)[1],
            "alone": alone, "predicted": pred,
            "prewarm_hit_rate": {"with": pred["served_from_memory"],
                                 "without": alone["served_from_memory"]},
            "switch_p50_ms": {"with": pred["switch_ms"]["p50"],
                              "without": alone["switch_ms"]["p50"]},
            "switch_p99_ms": {"with": pred["switch_ms"]["p99"],
                              "without": alone["switch_ms"]["p99"]},
            "wrong_guess_bytes": pred["wrong_guess_bytes"],
            "switched_bytes": served_bytes}


def _served_bytes(pack: str, switches: list[tuple]) -> int:
    """Bytes the measured switches changed (what a perfect prewarm would have loaded)."""
    from ..pack import PackReader
    with PackReader(pack) as r:
        blocks = {t: {b for s in r.task(t).values() for b in s.blocks} for t in r.tasks}
        cur, total = {}, 0
        for _, d, task in switches:
            if d in cur:
                total += sum(r.blocks[b].length for b in blocks[task] - blocks[cur[d]])
            cur[d] = task
    return total


# --- main ---------------------------------------------------------------------------------
def main(args) -> int:
    from .fleet_kv import bench_kv, bench_ops
    out: dict = {"quick": args.quick, "machine": "shared; other processes were running"}
    if "predict" not in args.skip:
        devices, days = (2, 2) if args.quick else (4, 4)
        out["predict"] = p = bench_predict(args, devices, days)
        for k in ("prewarm_hit_rate", "switch_p50_ms", "switch_p99_ms", "wrong_guess_bytes"):
            out[k] = p[k]
        out["switch_read_path"] = p["alone"]["read_path"]
        a, b = p["switch_p99_ms"]["without"], p["switch_p99_ms"]["with"]
        print(f"prediction ({devices} devices, {p['predicted']['switches']} switches on the "
              f"last of {days} days):")
        print(f"  served from memory  with {p['prewarm_hit_rate']['with']:.0%}  without "
              f"{p['prewarm_hit_rate']['without']:.0%}")
        print(f"  switch p50 ms       with {p['switch_p50_ms']['with']:.2f}  without "
              f"{p['switch_p50_ms']['without']:.2f}")
        print(f"  switch p99 ms       with {b:.2f}  without {a:.2f}  ratio {a / max(b, 1e-9):.1f}x")
        print(f"  prewarmed, unused   {p['wrong_guess_bytes'] / 1e6:.1f} MB (switches changed "
              f"{p['switched_bytes'] / 1e6:.1f} MB)")
        rp, br = p["alone"]["read_path"], p["alone"]["bytes_read_per_switch"]
        print(f"  reads               {', '.join(rp['used'])} (the device config's "
              f"storage.read_mode: {rp['requested']}, as every config in device_configs/: "
              f"a read costs what the storage costs, no page cache between)"
              + (f"; fell back: {'; '.join(rp['fallback'])}" if rp["fallback"] else ""))
        print(f"  bytes read a switch without: p50 {br['p50'] / 1e6:.1f} MB, p99 "
              f"{br['p99'] / 1e6:.1f} MB")
    if "kv" not in args.skip:
        out["kv"] = k = bench_kv(args)
        out["kv_shared_ttft_speedup"] = k.get("kv_shared_ttft_speedup")
    if "ops" not in args.skip:
        out["ops"] = o = bench_ops(args)
        out["server_ops_per_s"] = o.get("server_ops_per_s")
    write_json(out, args.json)
    if not args.quick and "predict" in out:
        plot(out, args.plot)
    return 0


def plot(out: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    for key, label in (("alone", "alone (LRU of displaced blocks)"),
                       ("predicted", "with the server's hints")):
        xs = np.sort(out["predict"][key]["switch_ms_raw"])
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    ax.set_xlabel("switch time (ms)")
    ax.set_ylabel("fraction of switches")
    ax.set_title("task switches, replayed day")
    ax.legend(fontsize=8)
    ax = axes[1]
    kv = out.get("kv", {}).get("by_store", {})
    names = list(kv)
    if names:
        ax.bar([f"{n}: shared" for n in names], [kv[n]["shared_ms"]["p50"] for n in names])
        ax.bar([f"{n}: recompute" for n in names], [kv[n]["recompute_ms"]["p50"] for n in names])
        ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.set_ylabel("TTFT, 1024-token prefix (ms, median)")
        ax.set_title("device B: prefix from device A vs recompute")
    fig.tight_layout()
    save(fig, path)
