"""tools/demo.sh step 8: a fleet server and two device runtimes on loopback.

    python tools/fleet_demo.py TASK_PACK MOE_PACK CONFIG WORKDIR

Device A's switches teach the server; device B gets a hint and prewarms it; a prefix A
computed is reused by B; a retrained lane task is published as a signed new version of the
task pack and a device's copy updated (only the blocks that differ) while a model serves
it; then the server is stopped and both devices serve on."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

import edgert
from edgert.config import KvCache, resolve


def until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not cond():
        time.sleep(0.02)
    return cond()


def prepare_update(task_pack: str, work: str) -> dict:
    """The server's pack directory (a copy of the task pack, version 0), a signing key, and
    a device's copy of the pack."""
    from edgert.update import keys
    d = os.path.join(work, "fleet-updates")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "packs"))
    shutil.copy(task_pack, os.path.join(d, "packs", "tasks.edgepack"))
    shutil.copy(task_pack, os.path.join(d, "device-tasks.edgepack"))
    priv, pub = keys.generate(os.path.join(d, "keys"))
    return {"dir": d, "packs": os.path.join(d, "packs"), "key": priv, "pub": pub,
            "device": os.path.join(d, "device-tasks.edgepack")}


def ship_update(ota: dict, ep: str, cfg) -> None:
    """Retrain lane, publish it as version 1, update the device's copy while a model serves
    it, then load the new version: lane equals ONNX Runtime on the retrained file."""
    import onnxruntime as ort

    from edgert.update.append import append_onnx
    from edgert.recipes.retrain import retrain
    from edgert.update import keys
    from edgert.update.fetch import PackSource, update
    lane = retrain(ota["dir"], "lane", "demo")
    append_onnx(os.path.join(ota["packs"], "tasks.edgepack"), {"lane": lane})
    x = np.random.default_rng(2).standard_normal((1, 3, 112, 112)).astype(np.float32)
    c = edgert.Runtime(cfg)
    try:
        old = c.load(ota["device"], name="tasks", task="lane", prepack="off")
        before = old.run({"image": x})["logits"]
        src = PackSource(ep)
        try:
            waited = src.wait_published(1, 60)   # the server watches its pack directory
            print(f"the server signed and published version 1 (the device waited {waited:.1f} s)")
            rep = update(ota["device"], src, keys.load_public(ota["pub"]))
        finally:
            src.close()
        print(f"update of the task pack, version {rep.version_from} -> {rep.version_to} "
              f"(lane retrained): {rep.bytes_downloaded / 1e6:.2f} MB downloaded for "
              f"{rep.changed_bytes / 1e6:.2f} MB of changed blocks (pack "
              f"{os.path.getsize(os.path.join(ota['packs'], 'tasks.edgepack')) / 1e6:.1f} MB), "
              f"signature checked, {rep.seconds:.2f} s")
        same = np.array_equal(old.run({"image": x})["logits"], before)
        new = c.load(ota["device"], name="tasks-v1", task="lane", prepack="off")
        want = ort.InferenceSession(lane, providers=["CPUExecutionProvider"]).run(
            None, {"image": x})[0]
        err = float(np.abs(new.run({"image": x})["logits"] - want).max())
        print(f"the loaded model served version 0 throughout: {same}; version 1 loaded: lane "
              f"max |diff| vs ONNX Runtime on the retrained file {err:.1e}")
    finally:
        c.close()


def main(task_pack: str, moe_pack: str, config: str, work: str) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = f"tcp://127.0.0.1:{port}"
    ota = prepare_update(task_pack, work)
    srv = subprocess.Popen([sys.executable, "-m", "edgert", "server", "--bind", ep,
                            "--store", f"dir:{work}/fleet-store", "--heartbeat", "0.5",
                            "--packs", ota["packs"], "--signing-key", ota["key"]],
                           stdout=subprocess.PIPE, text=True)
    print(srv.stdout.readline().strip())
    base = resolve(config)
    # no disk tier: what B reuses can only come from the server
    cfg = replace(base, kv_cache=KvCache(True, base.kv_cache.chunk_tokens, 0, 0, ""))
    a = edgert.Runtime(cfg, server=ep, device_id="car-a")
    b = edgert.Runtime(cfg, server=ep, device_id="car-b")
    try:
        ta = a.load(task_pack, name="tasks", task="detect", prepack="off")
        for _ in range(3):                        # A's day: detect is followed by lane
            ta.switch("lane")
            ta.switch("detect")
        until(lambda: a.stats()["server"]["switches_reported"] >= 7
              and a.fleet.seq >= 7)
        tb = b.load(task_pack, name="tasks", task="detect", prepack="off")
        until(lambda: b.stats()["server"]["prewarmed_bytes"] > 0)
        b.fleet.wait_prewarmed(10)
        hint = b.fleet.hints.get(b.fleet.fingerprint(tb), [])
        print("B's hint after detect:", ", ".join(f"{t} {p:.2f}" for t, p in hint[:3]))
        res = tb.switch("lane")
        st = b.stats()["server"]
        print(f"B switches to lane: {res.from_cache} blocks from prewarmed memory, "
              f"{res.from_storage} from storage; hints used {st['hints_used']}, prewarmed "
              f"{st['prewarmed_bytes'] / 1e6:.1f} MB, unused {st['unused_prewarm_bytes'] / 1e6:.1f} MB")

        la = a.load(moe_pack, name="lm", expert_budget=1.0)
        lb = b.load(moe_pack, name="lm", expert_budget=1.0)
        ids = np.random.default_rng(0).integers(0, la.cfg.vocab_size, 512).tolist()
        want = la.generate(ids, max_new_tokens=8)
        la.kv.drain()                             # A's chunks are queued for the server...
        until(lambda: a.stats()["server"]["published_chunks"] >= 2)
        time.sleep(0.5)                           # ...and travel in the background
        got = lb.generate(ids, max_new_tokens=8)
        tier = lb.stats()["kv"]["prefix"]["tiers"]["server"]
        print(f"B reuses A's 512-token prefix: {tier['hit_tokens']} tokens from the server, "
              f"{tier['bytes_read'] / 1e6:.2f} MB; same tokens as A: {got == want}")

        ship_update(ota, ep, base)

        srv.terminate()                           # the server goes away mid-step
        srv.wait(10)
        print("server stopped")
        x = np.random.default_rng(1).standard_normal((1, 3, 112, 112)).astype(np.float32)
        served = 0
        for t in ("sign", "parking", "lane", "detect"):
            for m in (ta, tb):
                m.run({"image": x}, task=t)
                served += 1
        for lm in (la, lb):
            lm.generate(ids[:64], max_new_tokens=8)
            served += 1
        print(f"both devices served {served} requests with the server gone, no errors")
        t0 = time.monotonic()           # the links notice on their own, by missed heartbeats
        while time.monotonic() - t0 < 15 and any(
                d.stats()["server"]["connected"] for d in (a, b)):
            time.sleep(0.1)
        print(f"{time.monotonic() - t0:.1f} s later the links report: connected A "
              f"{a.stats()['server']['connected']}, B {b.stats()['server']['connected']}")
    finally:
        a.close()
        b.close()
        if srv.poll() is None:
            srv.terminate()
            srv.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
