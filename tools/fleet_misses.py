"""Why switches miss memory in `edgert bench fleet`'s replay with the server: per switch,
the hint list the device held, the rank the task that came had in it, and the blocks read.

    PYTHONPATH=. .venv/bin/python tools/fleet_misses.py [DEVICES DAYS]    # default 4 4

Needs models/out/tasks.edgepack (tools/demo.sh builds it).
"""
from __future__ import annotations

import collections
import sys
import tempfile
import threading
import time

import edgert
from edgert.bench import fleet as F
from edgert.pack import PackReader
from edgert.server.device import pack_fingerprint
from edgert.server.service import FleetServer
from edgert.server.backends import open_store

PACK = "models/out/tasks.edgepack"


def main() -> None:
    devices, days = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4, 4)
    with PackReader(PACK) as r:
        tasks, fp = list(r.tasks), pack_fingerprint(r)
    events = F._switches(F.workload(tasks, devices, days, 0))
    last_day = F.MONDAY + (days - 1) * 86400
    store = open_store(f"dir:{tempfile.mkdtemp()}")
    srv = FleetServer(store, "tcp://127.0.0.1:0")
    prev: dict = {}
    for t, d, task in (e for e in events if e[0] < last_day):    # the history, reported
        srv.live[f"bench-{d}"] = time.monotonic() + 1e9
        srv._switch({"device": f"bench-{d}", "model": fp, "task": task, "t": t,
                     "current": prev.get(d)})
        prev[d] = task
    srv.live.clear()
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    measured = [e for e in events if e[0] >= last_day]
    rts, models = [], []
    for d in range(devices):
        rt = edgert.Runtime(F.device_config(PACK), server=srv.endpoint, device_id=f"bench-{d}")
        first = next(task for _, dd, task in measured if dd == d)
        rts.append(rt)
        models.append(rt.load(PACK, name="tasks", task=first, prepack="off"))
        F._wait(lambda rt=rt: rt.stats()["server"]["connected"], 10)
        rt.fleet.wait_prewarmed(10)
    seen, rows = set(), []
    for t, d, task in measured:
        m, rt = models[d], rts[d]
        if d not in seen:
            seen.add(d)
            continue
        hint = list(rt.fleet.hints.get(fp, []))
        names = [h[0] for h in hint]
        rank = names.index(task) if task in names else -1
        rt.fleet.clock = lambda t=t: t
        seq = rt.fleet.seq
        res = m.switch(task)
        rows.append((d, task, rank, hint[:3], res.from_storage, res.from_cache))
        F._wait(lambda rt=rt, seq=seq: rt.fleet.seq > seq, 10)
        rt.fleet.wait_prewarmed(10)
    miss = [r for r in rows if r[4] > 0]
    print(f"{len(rows)} switches, served from memory {1 - len(miss) / len(rows):.1%}")
    print("rank of the task that came, all:", dict(collections.Counter(r[2] for r in rows)))
    print("rank of the task that came, misses:", dict(collections.Counter(r[2] for r in miss)))
    for d, task, rank, hint, sto, cache in miss:
        print(f"device {d} -> {task}: rank {rank} in {[(a, round(b, 2)) for a, b in hint]}, "
              f"{sto} blocks read, {cache} from spare slots")
    for rt in rts:
        rt.close()
    srv.stop()
    th.join(5)


if __name__ == "__main__":
    main()
