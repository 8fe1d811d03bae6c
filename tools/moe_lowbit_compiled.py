"""Low-bit experts at 25% of the exact experts' bytes, eager against the compiled decode step.

    PYTHONPATH=$PWD python tools/moe_lowbit_compiled.py [PACK_DIR]

PACK_DIR holds the packs `edgert bench moe --model DIR` writes next to the checkpoint
(model.edgepack, model.int8.edgepack, model.mixed.edgepack). One process; every pack loaded
with `compile: off` and `on`; 3 alternated rounds of 64 greedy tokens; medians.
"""
import time, sys, statistics
from dataclasses import replace
import edgert
from edgert.config import resolve
cfg = resolve("cpu-dev")
D = (sys.argv[1] if len(sys.argv) > 1 else "models/out/moe-fine").rstrip("/") + "/"
rows = [("exact", D + "model.edgepack", "exact"), ("int8", D + "model.int8.edgepack", "int8"),
        ("int4", D + "model.mixed.edgepack", "int4"), ("mixed", D + "model.mixed.edgepack", "mixed")]
prompt = list(b"The robot arm moved to the left and then ")
out = {}
for mode in ("off", "on"):
    rt = edgert.Runtime(replace(cfg, compile=mode))
    for name, pack, prec in rows:
        lm = rt.load(pack, expert_budget=0.25, precision=prec, prefix_cache=False)
        lm.generate(prompt, max_new_tokens=8)
        out[(mode, name)] = lm
res = {k: [] for k in out}
for r in range(3):
    for k, lm in out.items():
        t0 = time.perf_counter(); lm.generate(prompt, max_new_tokens=64); res[k].append(64 / (time.perf_counter() - t0))
base = {m: statistics.median(res[(m, "exact")]) for m in ("off", "on")}
for (m, n), v in res.items():
    med = statistics.median(v)
    print(f"compile {m:3s} {n:6s} {med:7.1f} tok/s  {med / base[m]:.2f}x exact LRU at 25% (same compile)  compiled: {out[(m, n)].stats()['compile']}")
