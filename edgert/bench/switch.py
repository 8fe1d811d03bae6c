"""`edgert bench switch`: task-switch latency on the demo task models, against baselines.

Contenders, alternated over one fixed random switch sequence (no switch to self):
  (a) edgert differential switch, warm (blocks resident in spare slots after a prewarm)
      and cold (spare slots emptied; reads bypass the page cache with O_DIRECT, or the
      file's pages are dropped with POSIX_FADV_DONTNEED where O_DIRECT is refused)
  (b) a new ONNX Runtime session from the task's ONNX file (page cache warm, and cold)
  (c) every task's session kept resident: a switch is a lookup; N times the memory
  (d) monolithic reload of all of the task's blocks into the same arena (cold)
Sparse rows (switch_pruned.py): one model set packed dense, pruned independently and
pruned jointly (by activation and by norm importance), warm and cold, with each task's
recorded output error.
Physical limits are measured in the same run: copy bandwidth (warm) and O_DIRECT read
bandwidth (cold). Steady-state inference compares a default ORT session of the task with
edgert's bound-weights session and its pre-packed session, alternated.
"""
from __future__ import annotations

import gc
import mmap
import os
import time
from pathlib import Path

import numpy as np

from ..config import resolve
from ..stats import summary
from .contenders import Contender, EdgertSwitch
from .output import pyplot, save, write_json

SEED = 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _drop_file_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_limits(pack: str, repeats: int) -> dict:
    """Bandwidths of this machine, now, each measured the best way the hardware allows, so
    that no contender can beat a "limit": copy = the best of one big memcpy and parallel
    copies; read = O_DIRECT reads of the pack in 1 MiB requests (the switcher's largest
    extent) at queue depth 1 and at the switcher's READ_THREADS, the better of the two;
    blake3 on one core (the switcher verifies on one thread)."""
    from concurrent.futures import ThreadPoolExecutor

    import blake3

    from ..pack.reader import READ_THREADS
    size = min(os.path.getsize(pack) - 8192, 48 << 20) // (1 << 20) * (1 << 20)
    dst = np.frombuffer(mmap.mmap(-1, size), np.uint8)
    src = np.frombuffer(mmap.mmap(-1, size), np.uint8)
    src[:] = 1
    dst[:] = 0
    copy, read, hashing = [], [], []
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd, mode = os.open(pack, flags), "direct"
    except OSError:
        fd, mode = os.open(pack, os.O_RDONLY), "buffered (page cache dropped)"
    chunk = 1 << 20
    offs = range(0, size, chunk)
    half = size // 2
    pool = ThreadPoolExecutor(max(2, READ_THREADS))

    def read_one(off):
        os.preadv(fd, [memoryview(dst[off:off + chunk])], 4096 + off)
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            np.copyto(dst, src)
            one = time.perf_counter() - t
            t = time.perf_counter()
            list(pool.map(lambda lo: np.copyto(dst[lo:lo + half], src[lo:lo + half]),
                          (0, half)))
            copy.append(size / min(one, time.perf_counter() - t))
            best = float("inf")
            for depth in (1, READ_THREADS):
                if mode != "direct":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t = time.perf_counter()
                if depth == 1:
                    for off in offs:
                        read_one(off)
                else:
                    list(pool.map(read_one, offs))
                best = min(best, time.perf_counter() - t)
            read.append(size / best)
            t = time.perf_counter()
            for off in range(0, size, 65536):
                blake3.blake3(dst[off:off + 65536]).digest(16)
            hashing.append(size / (time.perf_counter() - t))
    finally:
        pool.shutdown()
        os.close(fd)
    # NOTE: the best repeat is the physical limit; the medians say how noisy the machine is
    return {"read_mode": mode, "copy_Bps": max(copy), "read_Bps": max(read),
            "hash_Bps": max(hashing), "copy_Bps_p50": float(np.median(copy)),
            "read_Bps_p50": float(np.median(read)), "hash_Bps_p50": float(np.median(hashing)),
            "read_threads": READ_THREADS}


def _sequence(tasks: list[str], n: int) -> list[str]:
    rng = np.random.default_rng(SEED)
    seq = [tasks[0]]
    while len(seq) <= n:
        t = tasks[int(rng.integers(len(tasks)))]
        if t != seq[-1]:
            seq.append(t)
    return seq


class FreshSession(Contender):
    def __init__(self, files, threads, cold: bool):
        self.files, self.threads, self.cold = files, threads, cold
        self.name = f"(b) fresh ORT session, {'cold' if cold else 'warm'} file"
        self.session = None

    def switch(self, task):
        import onnxruntime as ort

        from ..engines.onnx_engine import session_options
        self.session = None
        gc.collect()
        if self.cold:
            _drop_file_cache(self.files[task])
        t = time.perf_counter()
        self.session = ort.InferenceSession(self.files[task], session_options(self.threads),
                                            providers=["CPUExecutionProvider"])
        return time.perf_counter() - t, os.path.getsize(self.files[task])


class ResidentSessions(Contender):
    name = "(c) all sessions resident"

    def __init__(self, files, threads):
        import onnxruntime as ort

        from ..engines.onnx_engine import session_options
        gc.collect()
        before = _rss()
        self.sessions = {t: ort.InferenceSession(p, session_options(threads),
                                                 providers=["CPUExecutionProvider"])
                         for t, p in files.items()}
        self.memory = _rss() - before
        self.current = None

    def switch(self, task):
        t = time.perf_counter()
        self.current = self.sessions[task]
        return time.perf_counter() - t, 0


def steady_state(cfg, pack, files, task, x, runs: int) -> dict:
    """A default ORT session from the task file (what a user builds: ORT's own options but
    the thread count) vs edgert bound weights vs edgert pre-packed, alternated."""
    import onnxruntime as ort

    from ..runtime import Runtime
    rt = Runtime(cfg)
    m = rt.load(pack, task=task, prepack="sync")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.threads
    plain = ort.InferenceSession(files[task], opts, providers=["CPUExecutionProvider"])
    name = plain.get_inputs()[0].name
    feeds = {name: x}
    fast = m._fast
    fns = {"default ORT session": lambda: plain.run(None, feeds),
           "edgert bound weights": lambda: m.engine.run(feeds),
           "edgert pre-packed": lambda: fast.run(feeds)}
    times = {k: [] for k in fns}
    for f in fns.values():
        f()                                   # warm up once
    # NOTE: contenders alternate in blocks of runs, not run by run: a session that spins
    # keeps its workers busy for a moment after each run, and on 2 cores the next contender
    # would be timed against them (on a device only one of these sessions exists)
    block = max(5, runs // 4)
    for r in range(-(-runs // block)):
        for k in list(fns)[r % 3:] + list(fns)[:r % 3]:
            fns[k]()                          # the first run of a block wakes its workers
            for _ in range(block):
                t = time.perf_counter()
                fns[k]()
                times[k].append(1e3 * (time.perf_counter() - t))
    out = {"task": task, "ms": {k: summary(v) for k, v in times.items()}, "raw_ms": times,
           "prepack_build_s": fast.build_seconds,
           "prepack_charged_bytes": rt.arena.stats()["engine"]["in_use"]}
    m.close()
    return out


def steady_state_bert(cfg, runs: int) -> dict | None:
    """steady_state on a BERT-class encoder (edgert/recipes/bert.py: many small ops), packed
    as a one-task pack; None when transformers is not installed."""
    import importlib.util
    if importlib.util.find_spec("transformers") is None:
        return None
    from ..recipes.bert import build

    from ..pack.onnx_import import pack_onnx
    path = build("models/out/bert")
    pack = "models/out/bert.edgepack"
    if not os.path.exists(pack) or os.path.getmtime(pack) < os.path.getmtime(path):
        pack_onnx(path, {"encode": path}, pack)
    ids = np.random.default_rng(SEED).integers(0, 30522, (1, 16)).astype(np.int64)
    return steady_state(cfg, pack, {"encode": path}, "encode", ids, runs)


def _lm_pack(quick: bool) -> str:
    """An MoE pack to load beside the task model: the demo's or the benchmark's model when
    one was trained, else the recipe's quick model (seconds)."""
    from .moe import ensure_model, ensure_pack
    for d in ("models/out/moe", "models/out/moe-demo"):
        if (Path(d) / "model.safetensors").exists():
            return str(ensure_pack(Path(d)))
    model = Path("models/out/moe-tiny")
    ensure_model(model, quick=True)
    return str(ensure_pack(model))


def pruned_rows(cfg, seq: list[str] | None, n: int) -> dict:
    """preset -> the sparse rows (switch_pruned.py) of its model set over ``seq`` (a fresh
    sequence when None)."""
    from . import switch_pruned
    out = {}
    for preset in switch_pruned.MODEL_SETS:
        packs = switch_pruned.ensure_packs(preset)
        if seq is None:
            from ..pack import PackReader
            with PackReader(packs["dense"]) as r:
                seq = _sequence(r.tasks, n)
        out[preset] = switch_pruned.run(cfg, seq, packs, preset)
        switch_pruned.print_rows(out[preset], preset)
    return out


def quant_rows(cfg, seq: list[str], pack: str, models: str) -> dict:
    """The low-bit rows (switch_quant.py), printed."""
    from . import switch_quant
    rows = switch_quant.run(cfg, seq, pack, models)
    switch_quant.print_rows(rows)
    return rows


def main(args) -> int:
    from ..recipes.tasks import ensure_task_pack
    cfg = resolve(args.config)
    if args.pruned_only:
        n = 8 if args.quick else 30
        print(f"edgert bench switch --pruned-only: {n} switches, config {cfg.name}")
        write_json({"config": cfg.name, "quick": args.quick,
                    "pruned": pruned_rows(cfg, None, n)}, args.json)
        return 0
    ensure_task_pack(args.pack, args.models)
    lm_pack = _lm_pack(args.quick)
    from ..pack import PackReader
    with PackReader(args.pack) as r:
        tasks = r.tasks
    files = {t: os.path.join(args.models, f"{t}.onnx") for t in tasks}
    n, repeats, runs = (8, 3, 10) if args.quick else (30, 7, 40)
    seq = _sequence(tasks, n)
    if args.quant_only:
        print(f"edgert bench switch --quant-only: {n} switches, config {cfg.name}")
        write_json({"config": cfg.name, "quick": args.quick, "sequence": seq,
                    "quant": quant_rows(cfg, seq, args.pack, args.models)}, args.json)
        return 0
    lm_pack = _lm_pack(args.quick)
    print(f"edgert bench switch{' --quick' if args.quick else ''}: {len(tasks)} tasks, "
          f"{n} switches, config {cfg.name}, {cfg.threads} ORT threads")
    limits = measure_limits(args.pack, repeats)
    print(f"measured: copy {limits['copy_Bps'] / 1e9:.2f} GB/s, read ({limits['read_mode']}) "
          f"{limits['read_Bps'] / 1e9:.2f} GB/s, blake3 {limits['hash_Bps'] / 1e9:.2f} GB/s "
          "(best of repeats)")
    contenders = [EdgertSwitch(cfg, args.pack, "warm", seq[0]),
                  EdgertSwitch(cfg, args.pack, "cold", seq[0]),
                  FreshSession(files, cfg.threads, cold=False),
                  FreshSession(files, cfg.threads, cold=True),
                  ResidentSessions(files, cfg.threads),
                  EdgertSwitch(cfg, args.pack, "mono", seq[0]),
                  EdgertSwitch(cfg, args.pack, "cold+lm", seq[0], lm_pack=lm_pack)]
    raw = {c.name: {"ms": [], "bytes": []} for c in contenders}
    for i, task in enumerate(seq[1:]):
        k = i % len(contenders)
        gc.collect()          # once a round: a collect right before a switch evicts its caches
        for c in contenders[k:] + contenders[:k]:   # alternate who goes first
            gc.disable()                            # no collector pause inside a timed switch
            try:
                s, b = c.switch(task)
            finally:
                gc.enable()
            raw[c.name]["ms"].append(1e3 * s)
            raw[c.name]["bytes"].append(b)
    warm_c, cold_c, fresh_w, fresh_c, resident, mono, beside = contenders
    moved = np.asarray(raw[warm_c.name]["bytes"], float)
    limit_warm = 1e3 * moved / limits["copy_Bps"]
    limit_cold = 1e3 * moved / limits["read_Bps"]
    limit_cold_verified = limit_cold + 1e3 * moved / limits["hash_Bps"]
    x = np.random.default_rng(SEED).standard_normal(
        [d if isinstance(d, int) else 1 for d in warm_c.m.engine.inputs["image"][1]]
    ).astype(np.float32)
    steady = steady_state(cfg, args.pack, files, seq[-1], x, runs)
    bert = steady_state_bert(cfg, runs)
    dense = warm_c.m.dense_bytes
    memory = {warm_c.name: warm_c.rt.arena.stats()["peak_bytes"],
              cold_c.name: cold_c.rt.arena.stats()["peak_bytes"],
              mono.name: mono.rt.arena.stats()["peak_bytes"],
              beside.name + " (both models)": beside.rt.arena.stats()["peak_bytes"],
              resident.name: resident.memory, "dense task": dense,
              "pre-packed session (charged)": steady["prepack_charged_bytes"]}
    result = {"config": cfg.name, "quick": args.quick, "sequence": seq, "limits": limits,
              "switch": {k: {"ms": summary(v["ms"]), "bytes_p50": float(np.median(v["bytes"]))}
                         for k, v in raw.items()},
              "raw": raw, "limit_ms": {"warm_copy": summary(limit_warm),
                                       "cold_read": summary(limit_cold),
                                       "cold_read_plus_verify": summary(limit_cold_verified)},
              "steady_state": steady, "steady_state_bert": bert, "memory_bytes": memory,
              "beside": {"lm_pack": lm_pack, "models": beside.rt.models()}}
    timed = cold_c.m.switcher.history[-(len(seq) - 1):]
    reads = sum(r.reads for r in timed)
    result["cold_reads"] = {"per_switch_mean": reads / len(timed),
                            "mean_read_bytes": sum(r.bytes_read for r in timed) / max(reads, 1)}
    _print(result, warm_c.name, cold_c.name, fresh_w.name, fresh_c.name, beside.name)
    result["pruned"] = pruned_rows(cfg, seq, n)
    result["quant"] = quant_rows(cfg, seq, args.pack, args.models)
    write_json(result, args.json)
    if not args.quick:
        _plot(result, args.plot)
    return 0


def _print(res, warm, cold, fresh_w, fresh_c, beside) -> None:
    sw = res["switch"]
    print(f"\n{'switch latency (ms)':40s} {'p50':>8s} {'p10':>8s} {'p90':>8s} {'p99':>8s} "
          f"{'MB moved p50':>13s}")
    for name, s in sw.items():
        m = s["ms"]
        print(f"{name:40s} {m['p50']:8.2f} {m['p10']:8.2f} {m['p90']:8.2f} {m['p99']:8.2f} "
              f"{s['bytes_p50'] / 1e6:13.2f}")
    lim = res["limit_ms"]
    for name, s in lim.items():
        print(f"{'limit: ' + name:40s} {s['p50']:8.2f} {s['p10']:8.2f} {s['p90']:8.2f} "
              f"{s['p99']:8.2f}")
    w, c = sw[warm]["ms"]["p50"], sw[cold]["ms"]["p50"]
    print(f"\nspeed-up vs a fresh session (median): warm {sw[fresh_w]['ms']['p50'] / w:.0f}x, "
          f"cold {sw[fresh_c]['ms']['p50'] / c:.0f}x (target >= 20x)")
    print(f"vs physical limit (median): warm {w / lim['warm_copy']['p50']:.2f}x of copy, cold "
          f"{c / lim['cold_read']['p50']:.2f}x of read, {c / lim['cold_read_plus_verify']['p50']:.2f}x "
          "of read + blake3 verify (target <= 1.5x)")
    print(f"co-residence (same run): cold switch with an MoE LM in the same runtime "
          f"{sw[beside]['ms']['p50']:.2f} ms vs alone {c:.2f} ms at the median "
          f"({sw[beside]['ms']['p50'] / c:.2f}x; LM {res['beside']['lm_pack']})")
    cr = res["cold_reads"]
    print(f"cold switch storage reads: {cr['per_switch_mean']:.1f} per switch, "
          f"{cr['mean_read_bytes'] / 1e6:.2f} MB each on average")
    for key, what in (("steady_state", "demo ViT, task " + res["steady_state"]["task"]),
                      ("steady_state_bert", "BERT-class encoder, 16 tokens")):
        if not res.get(key):
            print(f"\nsteady-state inference, {what}: skipped (needs transformers)")
            continue
        st = res[key]["ms"]
        plain = st["default ORT session"]["p50"]
        print(f"\nsteady-state inference, {what} (ms):")
        for name, s in st.items():
            print(f"  {name:24s} p50 {s['p50']:7.2f}  p10 {s['p10']:7.2f}  p90 {s['p90']:7.2f}  "
                  f"{s['p50'] / plain:5.2f}x default (target <= 1.10x once a task keeps running)")
        print(f"  pre-packed session build {res[key]['prepack_build_s'] * 1e3:.0f} ms "
              "(background)")
    print("\nmemory for weights (MB):")
    for name, b in res["memory_bytes"].items():
        print(f"  {name:40s} {b / 1e6:8.1f}")


def _plot(res, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = list(res["raw"])
    data = [np.maximum(res["raw"][n]["ms"], 1e-3) for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.boxplot(data, vert=False, whis=(1, 99))
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set_xscale("log")
    for key, style in (("warm_copy", ":"), ("cold_read", "--")):
        ax.axvline(res["limit_ms"][key]["p50"], ls=style, c="gray",
                   label=f"limit: {key} (median)")
    ax.set_xlabel("switch latency, ms (log)")
    ax.set_title(f"edgert bench switch, {res['config']}: demo ViT tasks")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save(fig, path)
