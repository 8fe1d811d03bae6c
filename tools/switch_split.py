"""Where a task switch's time goes (the demo task pack, `edgert bench fleet`'s device config):
a switch served from memory against one reading every changed block from storage, and how
much of each is keeping the displaced blocks in spare slots. Medians of 30.

    PYTHONPATH=. .venv/bin/python tools/switch_split.py
"""
from __future__ import annotations

import time

import numpy as np

import edgert
from edgert.bench import fleet as F

PACK = "models/out/tasks.edgepack"


def main() -> None:
    rt = edgert.Runtime(F.device_config(PACK), server="")
    m = rt.load(PACK, name="tasks", task="detect", prepack="off")
    sw, keep_s = m.switcher, []
    keep = sw._keep

    def timed_keep(diff):
        t0 = time.perf_counter()
        n = keep(diff)
        keep_s.append(time.perf_counter() - t0)
        return n
    sw._keep = timed_keep
    mem, sto, kmem, ksto, read = [], [], [], [], []
    for _ in range(30):
        a = m.active
        b = "lane" if a == "detect" else "detect"
        m.prewarm([b])                    # every changed block of b in spare slots
        r = m.switch(b)
        if r.from_storage == 0:
            mem.append(r.seconds)
            kmem.append(keep_s[-1])
        sw.cache.clear()
        r = m.switch(a)                   # nothing in spare slots: every block read
        sto.append(r.seconds)
        ksto.append(keep_s[-1])
        read.append(r.bytes_read)
        sw.cache.clear()

    def ms(x):
        return f"{1e3 * np.median(x):.2f} ms"
    print(f"from memory: {ms(mem)} (keeping displaced blocks {ms(kmem)}), n={len(mem)}")
    print(f"from storage: {ms(sto)} (keeping displaced blocks {ms(ksto)}), "
          f"{np.median(read) / 1e6:.1f} MB read, reads {m.storage.stats()['mode']}")
    rt.close()


if __name__ == "__main__":
    main()
