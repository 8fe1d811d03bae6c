"""`edgert bench update`: signed differential pack updates of the demo task pack.

  one task      lane retrained (edgert/recipes/retrain.py): a new version of one task
  whole model   every tensor of every task changed (noise on all weights): most blocks differ
For each: ``update_bytes`` (what `edgert update` downloads: signed envelope + blocks) against
``changed_bytes`` (the stored blocks of the new version the old one lacks), the time of the
update (median of repeats, each on a fresh copy of the device's pack), and the bytes the
publisher appended. The server is an `edgert server --packs DIR --signing-key FILE` process
with an embedded store on loopback.

Serving during an update: a device runtime serves the pack (switches between two tasks
with an inference after each, arena = one task + 1 MiB, so each switch reads its blocks
from storage) while the same process runs updates of the one-task version in a thread,
back to back; windows with and without updates alternate. Reported: switch and inference
p50/p99 both ways and the p99 ratios (target 1.2x).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..stats import summary
from ..update.auto import DUTY, background_priority
from .output import write_json

ROUNDS_WINDOW_S = 2.0          # seconds of one serving window (idle or during updates)


def _models(path: str) -> dict[str, str]:
    from ..recipes.tasks import build
    if not os.path.exists(os.path.join(path, "base.onnx")):
        print(f"building the demo task models into {path} (recipe)")
        return build(path, "demo")
    spec = json.load(open(os.path.join(path, "models.json")))["spec"]
    return {t: os.path.join(path, f"{t}.onnx") for t in ["base", *spec["tasks"]]}


def _whole_retrain(files: dict[str, str], out: str) -> dict[str, str]:
    """Every task's every float tensor nudged: a retrain of the whole model."""
    import onnx
    from onnx import numpy_helper
    rng = np.random.default_rng(7)
    got = {}
    for t, path in files.items():
        m = onnx.load(path)
        for init in m.graph.initializer:
            a = numpy_helper.to_array(init)
            if a.dtype.kind == "f":
                a = (a + rng.standard_normal(a.shape).astype(a.dtype) * 1e-3).astype(a.dtype)
                init.CopyFrom(numpy_helper.from_array(a, init.name))
        got[t] = os.path.join(out, f"{t}-whole.onnx")
        onnx.save(m, got[t])
    return got


class _Server:
    def __init__(self, work: Path, packs: Path, key: str, nice: int):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.p = subprocess.Popen(
            [sys.executable, "-m", "edgert", "server", "--bind", self.endpoint, "--store",
             f"dir:{work / 'store'}", "--packs", str(packs), "--signing-key", key],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=lambda: os.nice(nice) if nice else None)
        line = self.p.stdout.readline()
        if "ready on" not in line:
            self.p.kill()
            raise RuntimeError(f"edgert server did not start: {line}")

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(10)


def _update_once(dev_v1: Path, work: Path, endpoint: str, pub, i: int,
                 duty: float = 1.0) -> dict:
    from ..update.fetch import PackSource, update
    dev = work / f"dev-{i}.edgepack"
    shutil.copy(dev_v1, dev)
    src = PackSource(endpoint)
    try:
        rep = update(str(dev), src, pub, duty=duty)
    finally:
        src.close()
    os.remove(dev)
    return rep.as_dict()


def _updates(label, dev_v1, work, endpoint, pub, repeats: int) -> dict:
    reps = [_update_once(dev_v1, work, endpoint, pub, i) for i in range(repeats)]
    r = reps[0]
    row = {"update_bytes": r["bytes_downloaded"], "changed_bytes": r["changed_bytes"],
           "envelope_bytes": r["envelope_bytes"], "blocks": r["blocks_downloaded"],
           "ratio": r["bytes_downloaded"] / max(1, r["changed_bytes"]),
           "seconds": summary([x["seconds"] for x in reps]),
           "seconds_all": [x["seconds"] for x in reps]}
    print(f"  {label:<12} update_bytes {row['update_bytes'] / 2**20:8.2f} MiB   changed "
          f"{row['changed_bytes'] / 2**20:8.2f} MiB   ratio {row['ratio']:.3f} (target <= "
          f"1.05 for one task)   time p50 {row['seconds']['p50'] * 1e3:.0f} ms")
    return row


def _serving(dev_v1: Path, work: Path, endpoint: str, pub, windows: int) -> dict:
    import edgert
    from ..config import DeviceConfig
    from ..pack import PackReader
    with PackReader(dev_v1) as r:
        dense = sum(s.nbytes for s in r.task(r.tasks[0]).values())
    cfg = DeviceConfig.from_dict({
        "name": "bench-update", "threads": 1, "storage": {"read_mode": "direct"},
        "memory": {"total": dense + (1 << 20) + (128 << 20), "engine": 128 << 20,
                   "experts": 0, "kv": 0}})
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112), dtype=np.float32)
    rt = edgert.Runtime(cfg)
    sw = {"idle": [], "update": []}
    inf = {"idle": [], "update": []}
    n_updates = 0
    try:
        m = rt.load(dev_v1, name="tasks", task="detect", prepack="off")
        tasks = ["sign", "detect"]
        for _ in range(3):                             # warm ORT and the page cache
            for t in tasks:
                m.switch(t)
                m.run({"image": x})
        for w in range(2 * windows):
            kind = "idle" if w % 2 == 0 else "update"
            busy = threading.Event()
            stop = threading.Event()
            count = [0]

            def updates():
                background_priority()              # as the runtime's updater thread does
                while not stop.is_set():
                    busy.set()
                    _update_once(dev_v1, work, endpoint, pub, 1000 + count[0], duty=DUTY)
                    count[0] += 1
            th = threading.Thread(target=updates) if kind == "update" else None
            if th is not None:
                th.start()
                busy.wait(10)
            end = time.monotonic() + ROUNDS_WINDOW_S
            i = 0
            while time.monotonic() < end:
                t0 = time.perf_counter()
                m.switch(tasks[i % 2])
                t1 = time.perf_counter()
                m.run({"image": x})
                t2 = time.perf_counter()
                sw[kind].append(t1 - t0)
                inf[kind].append(t2 - t1)
                i += 1
            stop.set()
            if th is not None:
                th.join()
                n_updates += count[0]
    finally:
        rt.close()
    out = {"updates_during": n_updates}
    for k in ("idle", "update"):
        out[k] = {"switch": summary(sw[k]), "infer": summary(inf[k])}
    out["switch_p99_ratio"] = out["update"]["switch"]["p99"] / out["idle"]["switch"]["p99"]
    out["infer_p99_ratio"] = out["update"]["infer"]["p99"] / out["idle"]["infer"]["p99"]
    for k in ("switch", "infer"):
        print(f"  {k:<7} p50/p99 ms  idle {out['idle'][k]['p50'] * 1e3:7.2f} / "
              f"{out['idle'][k]['p99'] * 1e3:7.2f}   during updates "
              f"{out['update'][k]['p50'] * 1e3:7.2f} / {out['update'][k]['p99'] * 1e3:7.2f}"
              f"   p99 ratio {out[f'{k}_p99_ratio']:.2f} (target <= 1.2)")
    print(f"  ({n_updates} updates ran during the update windows; {len(sw['idle'])} + "
          f"{len(sw['update'])} switches)")
    return out


def main(args) -> int:
    from ..update.append import append_onnx
    from ..pack.onnx_import import pack_onnx
    from ..recipes.retrain import retrain
    from ..update import keys
    files = _models(args.models)
    repeats, windows = (3, 2) if args.quick else (7, 10)
    with tempfile.TemporaryDirectory(prefix="edgert-bench-update-") as tmp:
        work = Path(tmp)
        (work / "srv").mkdir()
        srv_pack = work / "srv" / "tasks.edgepack"
        tasks = {t: p for t, p in files.items() if t != "base"}
        print(f"packing the demo tasks ({', '.join(tasks)}) as version 0")
        pack_onnx(files["base"], tasks, srv_pack)
        dev_v1 = work / "dev-v1.edgepack"
        shutil.copy(srv_pack, dev_v1)
        priv, pub_path = keys.generate(work / "keys")
        pub = keys.load_public(pub_path)
        lane = retrain(str(work), "lane", "demo")
        t0 = time.perf_counter()
        appended = append_onnx(srv_pack, {"lane": lane})
        append_s = time.perf_counter() - t0
        srv = _Server(work, work / "srv", priv, args.server_nice)
        result = {"pack_bytes": dev_v1.stat().st_size, "quick": args.quick,
                  "server_nice": args.server_nice, "loadavg_before": os.getloadavg(),
                  "append_one_task": {**appended, "seconds": append_s}}
        try:
            print(f"one task retrained (lane), appended in {append_s:.2f} s "
                  f"({appended['bytes_added'] / 2**20:.2f} MiB):")
            result["one_task"] = _updates("one task", dev_v1, work, srv.endpoint, pub,
                                          repeats)
            print("serving while updates of one task run (same process):")
            result["serving"] = _serving(dev_v1, work, srv.endpoint, pub, windows)
            dev_v2 = work / "dev-v2.edgepack"
            shutil.copy(srv_pack, dev_v2)          # the device now at version 1
            whole = _whole_retrain(tasks, tmp)
            t0 = time.perf_counter()
            result["append_whole"] = {**append_onnx(srv_pack, whole),
                                      "seconds": time.perf_counter() - t0}
            from ..update.fetch import PackSource
            with PackSource(srv.endpoint) as src:
                publish_s = src.wait_published(2, 600)
            result["append_whole"]["server_publish_s"] = publish_s
            print(f"whole model: appended in {result['append_whole']['seconds']:.1f} s, the "
                  f"server published it {publish_s:.1f} s later")
            print("whole model retrained (every tensor of every task):")
            result["whole_model"] = _updates("whole model", dev_v2, work, srv.endpoint, pub,
                                             max(1, repeats // 2))
        finally:
            srv.stop()
    t = result["one_task"]["ratio"]
    s = result["serving"]
    print(f"targets: one-task bytes ratio {t:.3f} {'met' if t <= 1.05 else 'MISSED'} (<= 1.05);"
          f" switch p99 {s['switch_p99_ratio']:.2f}x, infer p99 {s['infer_p99_ratio']:.2f}x "
          f"{'met' if max(s['switch_p99_ratio'], s['infer_p99_ratio']) <= 1.2 else 'MISSED'}"
          " (<= 1.2x of idle; a shared 2-core machine is noisy)")
    result["loadavg_after"] = os.getloadavg()
    print(f"load average before {result['loadavg_before'][0]:.1f}, after "
          f"{result['loadavg_after'][0]:.1f} (other processes make every figure noisier)")
    write_json(result, args.json)
    return 0
