"""Profile MoE decode steps: where a token's time goes (Python calls, torch ops).

    PYTHONPATH=$PWD python tools/profile_moe_decode.py [PACK] [--budget 1.0] [--steps 128]

Prints tokens/s, Python function calls per token (cProfile) and the torch ops per token
(torch.profiler), top entries by self time. Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from dataclasses import replace

import torch

import edgert
from edgert.config import resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pack", nargs="?", default="/work/main/models/out/moe-demo.edgepack")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--config", default="cpu-dev")
    ap.add_argument("--before", action="store_true", help="the step before issue 22")
    ap.add_argument("--compile", action="store_true", help="config compile: on")
    ap.add_argument("--quiet", action="store_true", help="counts only, no tables")
    a = ap.parse_args()
    cfg = resolve(a.config)
    rt = edgert.Runtime(replace(cfg, compile="on" if a.compile else "off"))
    lm = rt.load(a.pack, expert_budget=a.budget)
    lm.fast_decode = not a.before
    with lm.sequence() as s:
        logits = s.feed(list(range(32, 96)))
        tok = int(logits.argmax())
        for _ in range(8):                                  # warm up
            tok = int(s.feed([tok]).argmax())
        t0 = time.perf_counter()
        for _ in range(a.steps):
            tok = int(s.feed([tok]).argmax())
        dt = time.perf_counter() - t0
        print(f"{a.steps / dt:.0f} tok/s ({dt / a.steps * 1e3:.2f} ms/token)")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.steps):
            tok = int(s.feed([tok]).argmax())
        prof.disable()
        st = pstats.Stats(prof)
        print(f"python calls per token: {st.total_calls / a.steps:.0f}")
        if not a.quiet:
            st.sort_stats("tottime").print_stats(12)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            for _ in range(a.steps):
                tok = int(s.feed([tok]).argmax())
        ev = p.key_averages()
        if not a.quiet:
            print(ev.table(sort_by="self_cpu_time_total", row_limit=18))
        if a.compile:
            print("compile:", lm.stats()["compile"])
        ops = sum(e.count for e in ev if e.key.startswith("aten::"))
        print(f"aten ops per token (all levels): {ops / a.steps:.0f}; linear per token: "
              f"{sum(e.count for e in ev if e.key == 'aten::linear') / a.steps:.0f}")
    rt.close()


if __name__ == "__main__":
    main()
