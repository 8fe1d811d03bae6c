"""`edgert bench kv`: time to first token with the prefix cache, from each tier, against
recomputing the prompt; tier hit rates of two workloads; decode time against context.

Model: the trained demo MoE (models/out/moe-demo, byte-level; `tools/demo.sh` builds it).
Prompts are bytes of its held-out text.

Prompts (one per contender and repeat, contenders alternated, the first rotating):
  full      a 1024-token prompt that is entirely cached
  plus32    the same 1024 tokens cached, then 32 new ones (new ones every time)
Contenders:
  recompute     prefix_cache=False: every token computed (the baseline)
  arena         the prompt's pages are idle in the arena
  host          the arena emptied: pages come from the host tier
  disk-cold     arena and host emptied, the chunk files dropped from the page cache
                (POSIX_FADV_DONTNEED): pages come from disk
  fresh-*       a new process (disk tier only; its files dropped from the page cache) loads
                the model, runs a 16-token warm-up (torch's one-time costs), then the prompt;
                fresh-recompute is the same process without the cache
TTFT: a sequence opened, the prompt fed, its first token picked (what generate does before
it yields). Prefill: `Sequence.feed` of the prompt (the model's prefill_s). Every contender's
first-token logits are compared with recompute's. The writer thread's work for the previous
request is drained before each measurement (on a 2-core machine it would compete for the
cores; it runs off the request's path, not off the machine).

Workloads (hit rates per tier, TTFT with and without the cache):
  chat       a 1024-token system prompt, then 6 turns of 32-128 tokens with 16-token
             replies; each turn's prompt is the whole conversation so far
  chat-2     two such chats (other system prompts) taking turns, with memory.kv capped at
             one conversation's pages: each turn's prefix has left the arena for the host tier
  document   a 1024-token document, then 6 questions of 32-64 tokens about it
TPOT against context: decode steps after contexts of 64 .. 2048 tokens, reading K/V with one
gather per layer (edgert) against concatenating page by page (the read path it replaced).
Physical limits, measured in the same run: cold read bandwidth of the chunk files (whole files,
one preadv each) and host copy bandwidth; "read at bw" = the prompt's page bytes / that
bandwidth, what reading alone costs at the measured rate.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import KvCache, resolve
from ..stats import summary
from .output import pyplot, save, write_json

PROMPT = 1024
NEW = 32
TURNS = (32, 64, 96, 128, 48, 80)
QUESTIONS = (32, 48, 64, 40, 56, 36)
REPLY = 16
TIGHT_PAGES = 112       # one conversation (<= 98 pages) fits, two do not
CONTEXTS = (64, 256, 512, 1024, 2048)
CONTENDERS = ("recompute", "arena", "host", "disk-cold", "fresh-recompute", "fresh-disk")


# --- setup ------------------------------------------------------------------------------------
def ensure_model(model: Path) -> None:
    if (model / "config.json").exists() and (model / "heldout.txt").exists():
        return
    cmd = [sys.executable, "-m", "edgert.recipes.moe", "--steps", "120", "--out", str(model)]
    print(f"no trained model at {model}: running {' '.join(cmd[1:])} (as tools/demo.sh does)",
          flush=True)
    subprocess.run(cmd, check=True)


def bench_config(args, kv_dir: str, host: bool = True):
    cfg = resolve(args.config)
    kv = cfg.kv_cache
    return replace(cfg, kv_cache=KvCache(True, kv.chunk_tokens,
                                         (kv.host or 256 << 20) if host else 0,
                                         kv.disk or 2 << 30, kv_dir))


def drop_page_cache(d: Path) -> None:
    for f in d.rglob("*.kvc"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def first_token(lm, ids, salt=None) -> tuple[float, float, np.ndarray]:
    """(TTFT, prefill seconds, the first token's logits)."""
    before = lm.counters["prefill_s"]
    t0 = time.perf_counter()
    with lm.sequence(salt) as s:
        logits = s.feed(ids)
        int(np.argmax(logits))                          # the first token
        ttft = time.perf_counter() - t0
    return ttft, lm.counters["prefill_s"] - before, logits


# --- the fresh process ------------------------------------------------------------------------
def _child(args) -> int:
    import edgert
    spec = json.loads(Path(args.child).read_text())
    cfg = resolve(spec["config"])
    cfg = replace(cfg, kv_cache=KvCache(**spec["kv_cache"]))
    t0 = time.perf_counter()
    rt = edgert.Runtime(cfg)
    lm = rt.load(spec["pack"], expert_budget=1.0, prefix_cache=spec["prefix"])
    load_s = time.perf_counter() - t0
    first_token(lm, spec["warmup"])
    ttft, prefill, logits = first_token(lm, spec["ids"])
    px = lm.stats()["kv"]["prefix"]
    out = {"ttft_s": ttft, "prefill_s": prefill, "load_s": load_s, "hit_tokens":
           px["tiers"]["disk"]["hit_tokens"], "logits": logits.tolist()}
    rt.close()
    print(json.dumps(out))
    return 0


def fresh(args, pack, kv_dir, ids, warmup, prefix: bool) -> dict:
    cfg = bench_config(args, kv_dir, host=False)
    spec = {"config": args.config, "kv_cache": cfg.kv_cache.__dict__, "pack": str(pack),
            "prefix": prefix, "ids": ids, "warmup": warmup}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        drop_page_cache(Path(kv_dir))
        out = subprocess.run([sys.executable, "-m", "edgert", "bench", "kv", "--child", f.name],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["logits"] = np.asarray(res["logits"], np.float32)
    return res


# --- the measurements ---------------------------------------------------------------------------
def prompts(rt_lm, off, args, pack, kv_dir, text, repeats) -> dict:
    """TTFT and prefill per contender and prompt kind, alternated."""
    lm = rt_lm
    base = list(text[:PROMPT])
    warmup = list(text[-64:-48])
    first_token(lm, base)                               # cache the prompt (and warm up)
    first_token(off, base)
    lm.kv.drain()
    raw = {kind: {c: [] for c in CONTENDERS} for kind in ("full", "plus32")}
    ref = {"full": first_token(off, base)[2]}
    fresh_n = 0
    for r in range(repeats):
        order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[:r % len(CONTENDERS)]
        for kind in ("full", "plus32"):
            for c in order:
                start = PROMPT + 64 * (len(CONTENDERS) * 2 * r + fresh_n)
                fresh_n += 1
                ids = base if kind == "full" else base + list(text[start:start + NEW])
                want = ref["full"] if kind == "full" else None
                lm.kv.drain()           # the last request's background writes are done
                if c in ("host", "disk-cold"):
                    lm.kv.clear(("arena",) if c == "host" else ("arena", "host"))
                    if c == "disk-cold":
                        drop_page_cache(Path(kv_dir))
                if c == "recompute":
                    ttft, prefill, logits = first_token(off, ids)
                    res = {"ttft_s": ttft, "prefill_s": prefill}
                elif c.startswith("fresh"):
                    lm.kv.drain()
                    res = fresh(args, pack, kv_dir, ids, warmup, prefix=c == "fresh-disk")
                    logits = res.pop("logits")
                else:
                    before = lm.stats()["kv"]["prefix"]["tiers"]
                    ttft, prefill, logits = first_token(lm, ids)
                    after = lm.stats()["kv"]["prefix"]["tiers"]
                    tier = "disk" if c == "disk-cold" else c
                    res = {"ttft_s": ttft, "prefill_s": prefill,
                           "hit_tokens": after[tier]["hit_tokens"] - before[tier]["hit_tokens"]}
                    if c != "arena":
                        first_token(lm, base)           # back in the arena for the next one
                if want is None:
                    want = first_token(off, ids)[2] if c != "recompute" else logits
                res["max_abs_logit_diff"] = float(np.abs(logits - want).max())
                res["same_token"] = bool(np.argmax(logits) == np.argmax(want))
                raw[kind][c].append(res)
        print(f"prompts: repeat {r + 1}/{repeats} done", flush=True)
    return raw


def greedy(lm, ids, n: int, salt=None) -> tuple[float, list[int]]:
    """(TTFT, n greedy tokens). Through Sequence.feed, as generate runs, without its check
    of max_position_embeddings: the demo model was trained on 1024 positions and these
    conversations run past them (RoPE computes any position; the figures are timings, and
    every reply is checked equal with and without the cache)."""
    t0 = time.perf_counter()
    out = []
    with lm.sequence(salt) as s:
        logits = s.feed(ids)
        for i in range(n):
            out.append(int(np.argmax(logits)))
            if i == 0:
                ttft = time.perf_counter() - t0
            if i < n - 1:
                logits = s.feed([out[-1]])
    return ttft, out


def workload(lm, off, text, kind: str, salt: str) -> dict:
    """Chats or a shared document: per turn TTFT with (lm) and without (off) the cache."""
    px0 = lm.stats()["kv"]["prefix"]
    chats = 2 if kind == "chat-2" else 1
    convs = [list(text[(1 + 2 * c) * PROMPT:(2 + 2 * c) * PROMPT]) for c in range(chats)]
    rows, pos = [], (1 + 2 * chats) * PROMPT
    lengths = [n for n in (TURNS if kind.startswith("chat") else QUESTIONS)
               for _ in range(chats)]
    prompt_tokens = 0
    for i, n in enumerate(lengths):
        conv = convs[i % chats]
        msg = list(text[pos:pos + n])
        pos += n
        ids = conv + msg
        order = [(lm, salt), (off, None)] if i % 2 == 0 else [(off, None), (lm, salt)]
        got = {}
        for m, s in order:
            m.kv.drain()
            key = "cache" if m is lm else "recompute"
            got[key], got["reply_" + key] = greedy(m, ids, REPLY, s)
        assert got["reply_cache"] == got["reply_recompute"], "cache changed the tokens"
        rows.append({"prompt": len(ids), "ttft_cache_s": got["cache"],
                     "ttft_recompute_s": got["recompute"]})
        prompt_tokens += len(ids)
        if kind.startswith("chat"):
            convs[i % chats] = ids + got["reply_cache"]
    px = lm.stats()["kv"]["prefix"]
    hits = {t: px["tiers"][t]["hit_tokens"] - px0["tiers"][t]["hit_tokens"]
            for t in ("arena", "host", "disk")}
    return {"turns": rows, "prompt_tokens": prompt_tokens, "hit_tokens": hits,
            "hit_rate": {t: h / prompt_tokens for t, h in hits.items()},
            "computed_tokens": px["computed_tokens"] - px0["computed_tokens"]}


def tpot(lm, text, contexts, steps: int, repeats: int) -> dict:
    """Median decode step at each context length: pages gathered in one index_select per
    layer (edgert) against a concatenation page by page."""
    paged = lm.kv.paged
    read = paged.read
    out = {"edgert": {}, "gather": {}}
    for r in range(repeats):
        for name in (("edgert", "gather") if r % 2 == 0 else ("gather", "edgert")):
            paged.read = read if name == "edgert" else paged.gather
            try:
                for ctx in contexts:
                    with lm.sequence(f"tpot-{r}-{name}") as s:
                        s.feed(list(text[:ctx]))
                        lm.kv.drain()           # the prefill's chunk writes are done
                        ts = []
                        for t in range(steps):
                            t0 = time.perf_counter()
                            s.feed([text[ctx + t]])
                            ts.append(time.perf_counter() - t0)
                    out[name].setdefault(ctx, []).append(float(np.median(ts)))
            finally:
                paged.read = read
    return out


def limits(lm, kv_dir: str) -> dict:
    """Cold read bandwidth of the chunk files, host copy bandwidth."""
    files = sorted(Path(kv_dir).rglob("*.kvc"))
    buf = np.ones(max((f.stat().st_size for f in files), default=0), np.uint8)  # touched
    disk_bps = 0.0
    for _ in range(3):                                  # the best of 3 cold passes
        drop_page_cache(Path(kv_dir))
        t0, n = time.perf_counter(), 0
        for f in files:                                 # whole files, as preadv reads them
            fd = os.open(f, os.O_RDONLY)
            try:
                n += os.preadv(fd, [buf[:os.fstat(fd).st_size]], 0)
            finally:
                os.close(fd)
        disk_bps = max(disk_bps, n / (time.perf_counter() - t0) if n else 0.0)
    a = np.ones(64 << 20, np.uint8)
    b = np.empty_like(a)
    t0 = time.perf_counter()
    for _ in range(4):
        b[:] = a
    host_bps = 4 * a.nbytes / (time.perf_counter() - t0)
    return {"disk_read_Bps": disk_bps, "disk_read_mode": "buffered, page cache dropped, best of 3",
            "host_copy_Bps": host_bps, "page_nbytes": lm.pages.nbytes,
            "page_bytes": lm.pages.page_bytes}


# --- the benchmark ---------------------------------------------------------------------------
def main(args) -> int:
    if args.child:
        return _child(args)
    import torch

    import edgert

    from .moe import ensure_pack
    model = Path(args.model)
    ensure_model(model)
    pack = ensure_pack(model)
    text = (model / "heldout.txt").read_bytes()
    quick = args.quick
    repeats = args.repeats or (1 if quick else 5)
    own_dir = args.dir is None
    kv_dir = args.dir or tempfile.mkdtemp(prefix="edgert-bench-kv-")
    cfg = bench_config(args, kv_dir)
    torch.set_num_threads(cfg.threads)
    try:
        rt = edgert.Runtime(cfg)
        lm = rt.load(pack, expert_budget=1.0, name="cached")
        off = rt.load(pack, expert_budget=1.0, prefix_cache=False, name="recompute")
        print(f"edgert bench kv{' --quick' if quick else ''}: {model} ({lm.cfg.num_layers} "
              f"layers, {lm.cfg.num_kv_heads} kv heads x {lm.cfg.head_dim}, "
              f"{cfg.dtype}); page {lm.pages.page_bytes // 1024} KiB per 16 tokens; "
              f"chunks of {cfg.kv_cache.chunk_tokens} tokens; {repeats} repeats; disk tier "
              f"in {kv_dir}", flush=True)
        raw = prompts(lm, off, args, pack, kv_dir, text, repeats)
        lim = limits(lm, kv_dir)
        work = {"chat": workload(lm, off, text, "chat", "chat"),
                "document": workload(lm, off, text, "document", "document")}
        tight = edgert.Runtime(replace(cfg, budget=replace(
            cfg.budget, kv=TIGHT_PAGES * lm.pages.page_bytes)))
        tlm = tight.load(pack, expert_budget=1.0, name="tight")
        toff = tight.load(pack, expert_budget=1.0, prefix_cache=False, name="tight-off")
        work["chat-2"] = workload(tlm, toff, text, "chat-2", "chat-2")
        tight.close()
        contexts = (64, 1024) if quick else CONTEXTS
        tp = tpot(lm, text, contexts, 32 if quick else 48, 1 if quick else 3)
        disk_st = lm.stats()["kv"]["prefix"]["tiers"]["disk"]
        per_token = {"arena": lm.pages.page_bytes / 16, "host": lm.pages.nbytes / 16,
                     "disk": disk_st["bytes_used"] / max(1, 16 * disk_st["pages"])}
        rt.close()
    finally:
        if own_dir:
            shutil.rmtree(kv_dir, ignore_errors=True)
    result = {"config": cfg.name, "quick": quick, "model": str(model), "repeats": repeats,
              "prompt_tokens": PROMPT, "new_tokens": NEW, "limits": lim,
              "bytes_per_cached_token": per_token,
              "table": {kind: {c: _aggregate(rs) for c, rs in by.items()}
                        for kind, by in raw.items()},
              "workloads": work, "tpot": tp, "raw": raw}
    _print(result)
    write_json(result, args.json)
    if not quick:
        _plot(result, args.plot)
    return 0


def _aggregate(runs: list[dict]) -> dict:
    tt = summary(1e3 * np.array([r["ttft_s"] for r in runs]))
    pf = summary(1e3 * np.array([r["prefill_s"] for r in runs]))
    return {"ttft_ms": tt["p50"], "ttft_min_ms": tt["min"], "ttft_max_ms": tt["max"],
            "prefill_ms": pf["p50"],
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in runs),
            "same_token": all(r["same_token"] for r in runs),
            "hit_tokens": runs[0].get("hit_tokens"),
            "load_s": float(np.median([r["load_s"] for r in runs])) if "load_s" in runs[0]
            else None}


def _print(res: dict) -> None:
    lim = res["limits"]
    nbytes = PROMPT // 16 * lim["page_nbytes"]
    floor = {"host": nbytes / lim["host_copy_Bps"], "disk-cold": nbytes / lim["disk_read_Bps"]
             if lim["disk_read_Bps"] else None}
    floor["fresh-disk"] = floor["disk-cold"]
    for kind, t in res["table"].items():
        title = (f"{PROMPT}-token prompt, entirely cached" if kind == "full" else
                 f"{PROMPT} cached tokens + {NEW} new")
        print(f"\n{title}:\n{'contender':16s} {'TTFT ms':>9s} {'(min-max)':>17s} "
              f"{'prefill ms':>10s} {'vs recompute':>12s} {'hit tok':>7s} {'max|dlogit|':>11s} "
              f"{'read at bw':>10s}")
        for c, a in t.items():
            base = t["fresh-recompute" if c.startswith("fresh") else "recompute"]["ttft_ms"]
            fl = floor.get(c)
            print(f"{c:16s} {a['ttft_ms']:9.2f} {a['ttft_min_ms']:8.2f}-{a['ttft_max_ms']:<8.2f} "
                  f"{a['prefill_ms']:10.2f} {base / a['ttft_ms']:11.1f}x "
                  f"{a['hit_tokens'] if a['hit_tokens'] is not None else '-':>7} "
                  f"{a['max_abs_logit_diff']:11.1e} "
                  f"{'-' if fl is None else f'{1e3 * fl:.2f} ms':>10s}")
    f, p = res["table"]["full"], res["table"]["plus32"]
    print("\ntargets: entirely cached: arena "
          f"{f['recompute']['ttft_ms'] / f['arena']['ttft_ms']:.1f}x, host "
          f"{f['recompute']['ttft_ms'] / f['host']['ttft_ms']:.1f}x (>= 10x); fresh process "
          f"from disk {f['fresh-recompute']['ttft_ms'] / f['fresh-disk']['ttft_ms']:.1f}x "
          f"(>= 5x; vs recompute in this process "
          f"{f['recompute']['ttft_ms'] / f['fresh-disk']['ttft_ms']:.1f}x); cached + {NEW}: "
          f"arena {p['recompute']['ttft_ms'] / p['arena']['ttft_ms']:.1f}x, host "
          f"{p['recompute']['ttft_ms'] / p['host']['ttft_ms']:.1f}x, disk "
          f"{p['recompute']['ttft_ms'] / p['disk-cold']['ttft_ms']:.1f}x (>= 5x)")
    same = all(a["same_token"] for t in res["table"].values() for a in t.values())
    worst = max(a["max_abs_logit_diff"] for t in res["table"].values() for a in t.values())
    print(f"exactness: same first token everywhere: {same}; max |logit - recompute| {worst:.1e}"
          " (<= 1e-4); workloads: every reply identical with and without the cache")
    bpt = res["bytes_per_cached_token"]
    print(f"bytes per cached token: arena {bpt['arena']:.0f}, host {bpt['host']:.0f}, disk "
          f"{bpt['disk']:.0f}; limits: cold chunk reads {lim['disk_read_Bps'] / 1e6:.0f} MB/s "
          f"({lim['disk_read_mode']}), host copies {lim['host_copy_Bps'] / 1e9:.1f} GB/s")
    print(f"\n{'workload':12s} {'prompt tok':>10s} {'hit rate arena/host/disk':>26s} "
          f"{'TTFT cache ms':>13s} {'recompute ms':>12s} {'ratio':>6s}")
    for name, w in res["workloads"].items():
        skip = 2 if name == "chat-2" else 1
        tc = float(np.median([r["ttft_cache_s"] for r in w["turns"][skip:]])) * 1e3
        tr = float(np.median([r["ttft_recompute_s"] for r in w["turns"][skip:]])) * 1e3
        hr = w["hit_rate"]
        print(f"{name:12s} {w['prompt_tokens']:10d} {hr['arena']:8.2f}/{hr['host']:.2f}/"
              f"{hr['disk']:.2f}       {tc:13.2f} {tr:12.2f} {tr / tc:5.1f}x")
    print("  (TTFT: median over the turns after each conversation's first)")
    tp = res["tpot"]
    ctx = sorted(tp["edgert"], key=int)
    row = lambda name: " ".join(f"{1e3 * np.median(tp[name][c]):7.2f}" for c in ctx)  # noqa
    print(f"\nTPOT ms at context {' '.join(f'{int(c):>7d}' for c in ctx)}")
    for name in ("edgert", "gather"):
        lo, hi = np.median(tp[name][ctx[0]]), np.median(tp[name][1024])
        print(f"{name:18s} {row(name)}   {hi / lo:.2f}x at 1024 vs {ctx[0]}"
              + (" (<= 1.3x)" if name == "edgert" else ""))


def _plot(res: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    kinds = list(res["table"])
    x = np.arange(len(CONTENDERS))
    for i, kind in enumerate(kinds):
        t = res["table"][kind]
        ax1.bar(x + 0.4 * i - 0.2, [t[c]["ttft_ms"] for c in CONTENDERS], 0.4,
                label="entirely cached" if kind == "full" else f"cached + {NEW} new")
    ax1.set_xticks(x, CONTENDERS, rotation=30, fontsize=8)
    ax1.set(yscale="log", ylabel="TTFT ms (median, log)",
            title=f"{PROMPT}-token prompt")
    ax1.legend(fontsize=8)
    tp = res["tpot"]
    for name in ("edgert", "gather"):
        ctx = sorted(tp[name], key=int)
        ax2.plot([int(c) for c in ctx], [1e3 * np.median(tp[name][c]) for c in ctx],
                 marker="o", label=name)
    ax2.set(xscale="log", xlabel="context tokens", ylabel="TPOT ms (median)",
            title="decode step against context")
    ax2.legend(fontsize=8)
    fig.suptitle(f"edgert bench kv ({res['config']})")
    fig.tight_layout()
    save(fig, path)
