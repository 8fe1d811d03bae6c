"""Where a decode step's time goes for the low-bit contenders of `edgert bench moe`: exact
LRU, int4 LRU and mixed precision at the same bytes (moe_lowbit.py's contenders).

    PYTHONPATH=$PWD python tools/profile_mixed_decode.py MODEL_DIR [--budget 0.25]
        [--tokens 128] [--rounds 3] [--only exact,int4,mixed]

MODEL_DIR: a checkpoint `edgert bench moe` has packed (model.edgepack, model.mixed.edgepack).
Each contender decodes the same held-out bytes teacher-forced (as the benchmark does), the
contenders alternated over `rounds`; the step is split by wrapping the functions the
engine calls: the expert products (`swiglu` in kinds/moe.py, `expert_terms` of the exact
decode step), the band rule
(`precision_band`), the caches' route / acquire / release, and the rest of the step
(attention, routers, the engine's indexing). Wrapping adds a few microseconds per call to
every contender alike. Medians over rounds; timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import edgert
from edgert.bench import moe_lowbit as L
from edgert.config import resolve
from edgert.kinds import moe as K

PROMPT = 64


class Clock:
    """Seconds and calls per wrapped name, accumulated while `on`."""

    def __init__(self):
        self.s, self.n, self.on = defaultdict(float), defaultdict(int), False

    def wrap(self, name, fn):
        def timed(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.s[name] += time.perf_counter() - t
                self.n[name] += 1
        return timed


def load(rt, name: str, model: Path, budget: float):
    pack = str(model / "model.edgepack")
    mixed = str(model / "model.mixed.edgepack")
    if name == "exact":
        lm = rt.load(pack, expert_budget=budget, policy="lru", prefix_cache=False)
        return lm, [lm.provider]
    spec = {"kind": "mixed" if name == "mixed" else "lowbit", "scheme": "int4",
            "budget": budget, "pack": mixed}
    lm, prov = L.load(rt, spec)
    return lm, [prov.exact, prov.low] if name == "mixed" else [prov]


def run(rt, name, model, budget, ids, clock) -> dict:
    lm, caches = load(rt, name, model, budget)
    lm._expert_terms = clock.wrap("products", lm._expert_terms)  # exact decode: fused terms
    for c in caches:                      # instance attributes shadow the class's methods
        for m in ("route", "acquire", "release"):
            setattr(c, m, clock.wrap(m, getattr(c, m)))
    seq = lm.sequence()
    try:
        seq.feed(ids[:PROMPT])
        clock.s.clear()
        clock.n.clear()
        clock.on, t0 = True, time.perf_counter()
        for t in range(PROMPT, len(ids) - 1):
            seq.feed([ids[t]])
        total = time.perf_counter() - t0
        clock.on = False
        st = lm.provider.stats()
    finally:
        seq.close()
        lm.close()
    n = len(ids) - 1 - PROMPT
    out = {k: 1e3 * v / n for k, v in clock.s.items()}
    out["step"] = 1e3 * total / n
    out["calls"] = {k: v / n for k, v in clock.n.items()}
    out["hit"] = st.get("total", st).get("exact_hit_rate")
    out["int4_share"] = st.get("low_precision_share")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default="cpu-dev")
    ap.add_argument("--only", default="exact,int4,mixed")
    a = ap.parse_args()
    cfg = resolve(a.config)
    torch.set_num_threads(cfg.threads)
    rt = edgert.Runtime(cfg)
    clock = Clock()
    K.swiglu = clock.wrap("products", K.swiglu)                  # the other expert paths
    K.precision_band = clock.wrap("precision_band", K.precision_band)
    text = (a.model / "heldout.txt").read_bytes()
    ids = list(text[:PROMPT + a.tokens + 1])
    names = a.only.split(",")
    runs = {n: [] for n in names}
    run(rt, names[0], a.model, a.budget, ids, clock)             # warm up
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            runs[n].append(run(rt, n, a.model, a.budget, ids, clock))
    keys = ("products", "precision_band", "route", "acquire", "release")
    print(f"{a.model}, budget {a.budget:.0%} of the full-precision experts' bytes, "
          f"{a.tokens} steps x {a.rounds} rounds; ms per decode step (median of rounds)")
    print(f"{'contender':9s} {'step':>7s} {'tok/s':>7s} " + " ".join(f"{k:>14s}" for k in keys)
          + f" {'rest':>7s} {'hit':>6s} {'int4':>5s}  calls/step")
    for n, rs in runs.items():
        med = {k: float(np.median([r.get(k, 0.0) for r in rs])) for k in ("step",) + keys}
        rest = med["step"] - sum(med[k] for k in keys)
        calls = rs[-1]["calls"]
        share = rs[-1]["int4_share"]
        print(f"{n:9s} {med['step']:7.2f} {1e3 / med['step']:7.1f} "
              + " ".join(f"{med[k]:14.3f}" for k in keys)
              + f" {rest:7.2f} {rs[-1]['hit'] or 0:6.3f} "
              + (f"{share:5.2f}" if share is not None else "    -")
              + "  " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(calls.items())))
    rt.close()


if __name__ == "__main__":
    main()
