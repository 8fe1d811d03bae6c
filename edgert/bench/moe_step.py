"""`edgert bench moe-step`: the MoE decode step before issue 22, the fused eager step, and the
step compiled ahead of time (`compile: on`: kinds/moe_decode.py), side by side in one
process, at each expert budget; then a restarted process's time to its first tokens with
the compiled step's cache warm, against eager.

Each run prefills a 64-token prompt (untimed), then decodes `--tokens` greedy tokens; the
rows of one repeat alternate (the starting row rotates) so load on a shared machine hits
them alike. Printed: tokens/s (median over repeats, and each repeat), the compiled row's
compile time (its first call, apart from decode time: a warm-up run pays it), and
whether every row produced the same tokens as the "before" row (they must), and the fixed
cost per layer per token (issue 22's probe): the step's time minus its FLOPs at the
throughput of one large matrix-vector product measured in the same run, over the layers.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

from ..config import resolve
from .output import write_json

PROMPT = list(range(32, 96))
ROWS = ("before", "fused", "compiled")


def _load(rt, pack, budget, row):
    lm = rt.load(pack, expert_budget=budget, prefix_cache=False)
    lm.fast_decode = row != "before"
    return lm


def _decode(lm, tokens: int) -> tuple[float, list[int]]:
    with lm.sequence() as s:
        tok = int(s.feed(PROMPT).argmax())
        out, t0 = [], time.perf_counter()
        for _ in range(tokens):
            tok = int(s.feed([tok]).argmax())
            out.append(tok)
        return tokens / (time.perf_counter() - t0), out


def flops_per_token(lm) -> float:
    """Multiply-adds x 2 of one decode token's matrix products: every dense weight the step
    multiplies (q/k/v/o, routers and their hints, dense MLPs, shared experts, lm_head) and
    top-k experts per sparse layer; attention over the context is left out (small here)."""
    c = lm.cfg
    dense = sum(t.numel() for n, t in lm.w.items() if t.dim() == 2
                and n != "model.embed_tokens.weight" and not n.startswith("edgert.qkv."))
    ffn, hidden = lm.layout.ffn_hidden
    return 2.0 * (dense + len(c.moe_layers) * c.top_k * 3 * ffn * hidden)


def gemv_flops(threads: int, n: int = 4096, k: int = 2048, calls: int = 50) -> float:
    """FLOP/s of one large matrix-vector product (a decode step's kind of product, too big
    for per-call overhead to matter) with `threads` torch threads."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = torch.randn(1, k), torch.randn(n, k)
        for _ in range(5):
            torch.nn.functional.linear(x, w)
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.nn.functional.linear(x, w)
        return 2.0 * n * k * calls / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def fixed_cost_per_layer(tok_s: float, flops: float, flops_s: float, layers: int) -> float:
    """Seconds per layer per token that are not arithmetic: the step's time minus its
    FLOPs at the measured throughput, over the layers (the projection's layer overhead)."""
    return max(0.0, 1.0 / tok_s - flops / flops_s) / layers


# a fresh process: import, runtime, load (the compiled step's graphs from the cache), a
# 64-token prompt and two tokens (the second one decoded); seconds from its start
_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from dataclasses import replace
import edgert
from edgert.config import resolve
a = json.loads(sys.argv[1])
rt = edgert.Runtime(replace(resolve(a["config"]), compile=a["mode"]))
t1 = time.perf_counter()
lm = rt.load(a["pack"], expert_budget=a["budget"])
t2 = time.perf_counter()
lm.generate(list(range(32, 96)), max_new_tokens=2)
t3 = time.perf_counter()
print(json.dumps({"load_s": t2 - t1, "total_s": t3 - t0, "compile": lm.stats()["compile"]}))
"""


def first_tokens(config: str, pack: str, budget: float, mode: str) -> dict:
    """A restarted process's time to its first two tokens (`_CHILD`)."""
    arg = json.dumps({"config": config, "pack": pack, "budget": budget, "mode": mode})
    p = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True,
                       check=False, timeout=600,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if p.returncode:
        raise RuntimeError(f"first-token child failed: {(p.stderr.strip() or '?').splitlines()[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def restart(config: str, pack: str, budget: float, repeats: int) -> dict:
    """Eager against compiled with a warm cache (the warm-up above filled it), alternated."""
    runs = {"off": [], "on": []}
    for k in range(repeats):
        for mode in (("off", "on") if k % 2 == 0 else ("on", "off")):
            runs[mode].append(first_tokens(config, pack, budget, mode))
    med = {m: statistics.median(r["total_s"] for r in v) for m, v in runs.items()}
    print(f"  restarted process, warm compile cache ({round(100 * budget)}%): first tokens "
          f"eager {med['off']:.2f} s, compiled {med['on']:.2f} s = {med['on'] / med['off']:.2f}x "
          f"(graphs loaded in {statistics.median(r['compile']['compile_s'] for r in runs['on']) * 1e3:.0f} ms)")
    return {"runs": runs, "median_s": med, "ratio": med["on"] / med["off"]}


def main(args) -> int:
    import torch

    from .. import Runtime
    cfg = resolve(args.config)
    budgets = [float(b) for b in args.budgets.split(",")]
    args.tokens = args.tokens or (32 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)
    rows = ROWS[:2] if args.no_compile or args.quick else ROWS
    runtimes = {r: Runtime(replace(cfg, compile="on" if r == "compiled" else "off"))
                for r in rows}
    torch.set_num_threads(cfg.threads)
    result = {"config": cfg.name, "pack": args.pack, "tokens": args.tokens, "rows": {}}
    print(f"edgert bench moe-step: {args.pack}, {args.tokens} decode steps x {args.repeats} "
          f"repeats, config {cfg.name} ({cfg.threads} threads); shared machine: noisy")
    for b in budgets:
        models = {r: _load(runtimes[r], args.pack, b, r) for r in rows}
        compile_s = None
        for r, lm in models.items():                  # warm-up; the compiled row compiles here
            t0 = time.perf_counter()
            _decode(lm, 8)
            if r == "compiled":
                st = lm.stats()["compile"]
                compile_s = st["compile_s"]
                print(f"  {round(100 * b)}%: compiled row warm-up {time.perf_counter() - t0:.1f}"
                      f" s (compile {compile_s if compile_s is None else round(compile_s, 1)} s"
                      f"{'; FAILED: ' + st['failed'] if st['failed'] else ''})", flush=True)
        tps = {r: [] for r in rows}
        same = True
        for k in range(args.repeats):
            order = rows[k % len(rows):] + rows[:k % len(rows)]
            toks = {}
            for r in order:
                t, toks[r] = _decode(models[r], args.tokens)
                tps[r].append(t)
            same &= all(toks[r] == toks["before"] for r in rows)
        lm = models["before"]
        flops, layers = flops_per_token(lm), lm.cfg.num_layers
        for lm in models.values():
            lm.close()
        thr = gemv_flops(cfg.decode_threads)
        med = {r: statistics.median(v) for r, v in tps.items()}
        fixed = {r: fixed_cost_per_layer(med[r], flops, thr, layers) for r in rows}
        result["rows"][f"{round(100 * b)}%"] = {
            "tok_s": tps, "median": med, "compile_s": compile_s, "same_tokens": same,
            "flops_per_token": flops, "gemv_flops_s": thr, "fixed_s_per_layer": fixed}
        print(f"  budget {round(100 * b)}% of experts; same tokens in every row: {same}; "
              f"{flops / 1e6:.1f} MFLOP/token, products at {thr / 1e9:.1f} GFLOP/s")
        for r in rows:
            ratio = med[r] / med["before"]
            runs = ", ".join(f"{t:.0f}" for t in tps[r])
            print(f"    {r:9s} {med[r]:7.1f} tok/s  ({ratio:.2f}x before; runs {runs}); "
                  f"fixed cost {fixed[r] * 1e3:.3f} ms/layer/token")
    if "compiled" in rows:
        result["restart"] = restart(args.config or "cpu-dev", args.pack, budgets[-1],
                                    args.repeats)
    write_json(result, args.json)
    return 0
