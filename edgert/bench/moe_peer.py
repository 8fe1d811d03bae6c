"""`edgert bench moe --peer llama.cpp`: edgert against llama.cpp on the benchmark model, like
with like: the checkpoint's float32 against GGUF f32, edgert's int8 experts against Q8_0 and
its int4 experts against Q4_0 (each quantizes the expert weights only; gguf_export.py).

Same prompt (64 bytes of held-out text), same greedy decode of N tokens, same threads (the
device config's `threads` for the prompt, `decode_threads` for a decode step: on 2 shared
cores llama.cpp decoding this model with 2 threads ran at 0.9 tok/s beside a busy process
and at 40 with 1), each contender in a fresh process (moe_peer_run.py), alternated over
the repeats; figures: decode tok/s, time to first token, peak resident memory.
(a) Fully resident: every expert in edgert's arena; llama.cpp with its file mapped.
(b) Under one memory budget: edgert with its experts at 25% of the float experts' bytes,
    run once outside any cgroup to set the two limits below; then, at each limit, edgert's
    same 25% run and llama.cpp each in a memory cgroup of that limit, page cache included
    (llama.cpp maps its model file, so the kernel keeps what fits and reads the rest again,
    its own expert cache; edgert reads with O_DIRECT into its arena): one budget
    definition, the cgroup's, for both sides. The limits are the two readings of edgert's
    uncontained run: B_budget, the peak of what edgert's budget governs (arena: dense
    weights, expert slots, KV pages; plus charged engine memory; torch's heap is outside it,
    so edgert itself may not fit there), and B_process, what edgert's whole process added
    to its resident memory after its imports, at its peak. Each process joins its cgroup after its imports
    (the interpreter and torch/llama.cpp libraries were resident before), so the limit
    bounds what loading and decoding add. The cgroup is made under this process's own
    memory cgroup (v2: ``memory.max``; v1: ``memory.limit_in_bytes``) and removed after;
    where none can be made the budget rows are skipped with the reason printed.
Without llama-cpp-python the edgert side still runs (resident, 25%, 25% in each cgroup) and
the llama.cpp rows say why they are missing.
Needs the optional extra ``peers`` (llama-cpp-python, gguf); never the test suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PAIRS = (("exact", "f32"), ("int8", "q8_0"), ("int4", "q4_0"))
BUDGET = 0.25
N_CTX = 512


def _run(args: dict, timeout: float = 600) -> dict:
    p = subprocess.run([sys.executable, "-m", "edgert.bench.moe_peer_run", json.dumps(args)],
                       check=False, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return {"error": f"exit {p.returncode}: {tail}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- memory cgroups ---------------------------------------------------------------------
def _own_cgroup() -> tuple[str, str] | None:
    """(version, directory) of this process's memory cgroup, or None."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, ctrl, path in lines:
        if "memory" in ctrl.split(","):
            d = "/sys/fs/cgroup/memory" + path
            if os.path.isdir(d):
                return "v1", d
    for hid, ctrl, path in lines:
        if hid == "0" and ctrl == "":
            d = "/sys/fs/cgroup" + path
            try:
                with open(os.path.join(d, "cgroup.controllers")) as f:
                    if "memory" in f.read().split():
                        return "v2", d
            except OSError:
                pass
    return None


class MemoryCgroup:
    """A child memory cgroup of our own, limited to ``limit`` bytes; ``peak()`` afterwards."""

    def __init__(self, limit: int):
        own = _own_cgroup()
        if own is None:
            raise OSError("no memory cgroup controller (v1 or v2) for this process")
        self.version, parent = own
        self.path = os.path.join(parent, f"edgert-peer-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)             # PermissionError / OSError: the caller says why
        try:
            if self.version == "v2":
                self._write("memory.max", limit)
                self._write("memory.swap.max", 0)
            else:
                self._write("memory.limit_in_bytes", limit)
        except OSError:
            self.close()
            raise

    def _write(self, name: str, value) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def peak(self) -> int | None:
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                with open(os.path.join(self.path, name)) as f:
                    return int(f.read())
            except OSError:
                continue
        return None

    def oom_kills(self) -> int:
        for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            try:
                with open(os.path.join(self.path, name)) as f:
                    for line in f:
                        k, _, v = line.partition(" ")
                        if k == key:
                            return int(v)
            except OSError:
                continue
        return 0

    def close(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


# --- the comparison ---------------------------------------------------------------------
def ensure_gguf(model: Path) -> dict[str, str]:
    from .gguf_export import write_gguf
    src = max(p.stat().st_mtime for p in model.glob("*.safetensors"))
    out = {}
    for _, q in PAIRS:
        path = model / f"model.{q}.gguf"
        if not path.exists() or path.stat().st_mtime < src:
            write_gguf(model, path, q)
        out[q] = str(path)
    return out


def _budget_fraction(packs: dict, precision: str) -> float:
    """25% of the float experts' bytes, as a fraction of the experts at ``precision``."""
    from ..experts.api import ExpertLayout
    from ..pack import PackReader
    with PackReader(packs[precision]) as r:
        exact = ExpertLayout.from_reader(r).extent_bytes
        mine = ExpertLayout.from_reader(r, precision).extent_bytes
    return min(1.0, BUDGET * exact / mine)


def run_peer(model: Path, pack: str, low_packs: dict, cfg_arg, threads: int,
             decode_threads: int, prompt: list[int], tokens: int, repeats: int) -> dict:
    try:
        import llama_cpp  # noqa: F401
        no_llama = None
    except ImportError as e:
        no_llama = f"no llama-cpp-python (pip install 'edgert[peers]'): {e}"
        print(f"--peer llama.cpp: {no_llama}; edgert's side runs alone", flush=True)
    ggufs = ensure_gguf(model) if no_llama is None else {}
    packs = {"exact": pack, "int8": low_packs.get("int8"), "int4": low_packs.get("mixed")}
    common = {"prompt": prompt, "tokens": tokens, "threads": threads,
              "decode_threads": decode_threads}
    out = {"llama_skipped": no_llama} if no_llama else {}
    for prec, q in PAIRS:
        if packs[prec] is None:
            continue
        ed = {**common, "side": "edgert", "path": packs[prec], "config": cfg_arg,
              "precision": prec}
        ll = {**common, "side": "llama", "path": ggufs.get(q), "n_ctx": N_CTX}
        frac = _budget_fraction(packs, prec)
        runs = {name: [] for name in ROWS}
        note = None
        for r in range(repeats):
            order = [("edgert resident", {**ed, "budget": 1.0}),
                     ("llama.cpp resident", ll), ("edgert 25%", {**ed, "budget": frac})]
            order = order[r % 3:] + order[:r % 3]
            for name, a in order:
                if a["side"] == "llama" and no_llama:
                    continue
                runs[name].append(_run(a))
            e = runs["edgert 25%"][-1]
            if "error" in e:
                continue
            for tag, limit in (("B_budget", e["budgeted_peak"]), ("B_process", _added(e))):
                sides = [(f"edgert 25%, {tag}", {**ed, "budget": frac}),
                         (f"llama.cpp, {tag}", ll)]
                for name, a in sides[r % 2:] + sides[:r % 2]:   # who goes first alternates
                    if a["side"] == "llama" and no_llama:
                        continue
                    res, note = _in_cgroup(a, limit)
                    if res is not None:
                        runs[name].append(res)
        out[f"{prec} vs {q}"] = {"runs": runs, "budget_fraction": frac, "cgroup_note": note,
                                 "llama_note": no_llama,
                                 "gguf_bytes": os.path.getsize(ggufs[q]) if q in ggufs else None}
        _print_pair(prec, q, out[f"{prec} vs {q}"])
    return out


ROWS = ("edgert resident", "llama.cpp resident", "edgert 25%", "edgert 25%, B_budget",
        "llama.cpp, B_budget", "edgert 25%, B_process", "llama.cpp, B_process")
PAIRED = (("edgert resident", "llama.cpp resident"),
          ("edgert 25%, B_budget", "llama.cpp, B_budget"),
          ("edgert 25%, B_process", "llama.cpp, B_process"))


def _in_cgroup(args: dict, limit: int) -> tuple[dict | None, str | None]:
    """(llama.cpp's run in a memory cgroup of ``limit`` bytes, None), or (None, why not)."""
    try:
        cg = MemoryCgroup(limit)
    except OSError as e:
        return None, f"skipped: cannot make a memory cgroup here ({e})"
    try:
        res = _run({**args, "cgroup": cg.path})
        res.update(limit=limit, cgroup_peak=cg.peak(), oom_kills=cg.oom_kills(),
                   cgroup=cg.version)
        return res, None
    finally:
        cg.close()


def _added(res: dict) -> int | None:
    if "error" in res:
        return None
    return res["peak_rss"] - res["rss_before"]


def _med(runs: list[dict], key: str):
    xs = [r[key] for r in runs if "error" not in r and r.get(key) is not None]
    return float(np.median(xs)) if xs else None


def _print_pair(prec: str, q: str, d: dict) -> None:
    runs = d["runs"]
    gguf = f"GGUF {d['gguf_bytes'] / 1e6:.1f} MB" if d["gguf_bytes"] else "no GGUF written"
    print(f"\nedgert {prec} experts vs llama.cpp {q} ({gguf}), medians of "
          f"{len(runs['edgert resident'])} fresh processes each; a row ', B_x' ran in a "
          f"memory cgroup limited to B_x (page cache included):")
    print(f"  {'contender':22s} {'tok/s':>8s} {'TTFT ms':>8s} {'peak RSS MB':>12s} "
          f"{'added MB':>9s}  agreement with edgert resident")
    ref = next((r["tokens"] for r in runs["edgert resident"] if "error" not in r), None)
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            why = rs[0]["error"] if rs else (d["llama_note"] if name.startswith("llama")
                                             and d["llama_note"] else
                                             d["cgroup_note"] or "not run")
            if rs and "limit" in rs[0]:
                why += (f" (limit {rs[0]['limit'] / 1e6:.1f} MB, OOM kills "
                        f"{sum(r.get('oom_kills', 0) for r in rs)}, {len(rs)} of {len(rs)})")
            print(f"  {name:22s} {why}")
            continue
        agree = np.mean([np.mean(np.asarray(r["tokens"]) == np.asarray(ref)) for r in ok]) \
            if ref else float("nan")
        added = np.median([r["peak_rss"] - r["rss_before"] for r in ok])
        extra = ""
        if ", B_" in name:
            failed = len(rs) - len(ok)
            extra = (f"  (limit {ok[0]['limit'] / 1e6:.1f} MB, cgroup {ok[0]['cgroup']} peak "
                     f"{(_med(ok, 'cgroup_peak') or 0) / 1e6:.1f} MB, OOM kills "
                     f"{sum(r.get('oom_kills', 0) for r in rs)}"
                     + (f", {failed} of {len(rs)} runs failed" if failed else "") + ")")
        print(f"  {name:22s} {_med(ok, 'tok_s'):8.1f} {1e3 * _med(ok, 'ttft_s'):8.1f} "
              f"{_med(ok, 'peak_rss') / 1e6:12.1f} {added / 1e6:9.1f}  {agree:.3f}{extra}")
    for a, b in PAIRED:
        x, y = _med(runs[a], "tok_s"), _med(runs[b], "tok_s")
        if x and y:
            print(f"  {a} / {b}: {x / y:.2f}x decode tok/s")
