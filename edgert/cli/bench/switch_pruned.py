"""The sparse rows of `edgert bench switch`: one set of task models packed dense, pruned
independently and pruned jointly (``edgert pack onnx --prune-blocks``), switched warm and
cold over the bench's switch sequence.

The models are the recipe's ``sparse`` preset (models/tasks/build.py: the demo ViT and
fine-tunes with a spread of block norms), with its calibration inputs.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np

from ...stats import summary

MODELS = "models/out/tasks-sparse"
FRACTION = 0.5       # the target fraction
MAX_ERROR = 0.7      # relative output error bound: what 50% of a random ViT's blocks cost
KINDS = ("dense", "independent", "joint")


def ensure_packs(models: str = MODELS, fraction: float = FRACTION,
                 max_error: float = MAX_ERROR) -> dict[str, str]:
    """kind -> pack path, packed from the sparse preset's models unless a pack newer than
    them with the same pruning settings exists."""
    from ...pack import PackReader
    from ...pack.onnx_import import pack_onnx
    from ...pack.prune import PruneOptions, pruning_summary
    root = Path(__file__).resolve().parents[3]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from models.tasks.build import ensure_built
    paths = ensure_built(models, "sparse")
    tasks = {k: v for k, v in paths.items() if k != "base"}
    calib = {t: os.path.join(models, "calib", f"{t}.npz") for t in tasks}
    newest = max(map(os.path.getmtime, [*paths.values(), *calib.values()]))
    out = {}
    for kind in KINDS:
        pack = f"{models}.{kind}.edgepack"
        prune = None if kind == "dense" else \
            PruneOptions(fraction, calib, joint=kind == "joint", max_error=max_error)
        fresh = os.path.exists(pack) and os.path.getmtime(pack) >= newest
        if fresh:
            with PackReader(pack) as r:
                doc = pruning_summary(r)
            fresh = (doc is None) if prune is None else doc is not None and \
                (doc.get("fraction"), doc.get("joint"), doc.get("max_error")) == \
                (fraction, prune.joint, max_error)
        if not fresh:
            print(f"packing {models} -> {pack} ({kind})")
            pack_onnx(paths["base"], tasks, pack, prune=prune)
        out[kind] = pack
    return out


def run(cfg, seq: list[str], packs: dict[str, str]) -> dict:
    """Warm and cold switches of every pack over ``seq``, contenders alternated; bytes read
    from storage, bytes zero-filled, latency, spare-slot memory, and each task's recorded
    output error."""
    from ...pack import PackReader
    from ...pack.prune import pruning_summary
    from .switch import EdgertSwitch
    contenders = [(kind, mode, EdgertSwitch(cfg, packs[kind], mode, seq[0]))
                  for kind in packs for mode in ("warm", "cold")]
    raw = {(k, m): {"ms": [], "read": [], "zero": []} for k, m, _ in contenders}
    for i, task in enumerate(seq[1:]):
        j = i % len(contenders)
        gc.collect()
        for kind, mode, c in contenders[j:] + contenders[:j]:
            gc.disable()
            try:
                s, _ = c.switch(task)
            finally:
                gc.enable()
            r = c.m.switcher.history[-1]
            raw[kind, mode]["ms"].append(1e3 * s)
            raw[kind, mode]["read"].append(r.bytes_read)
            raw[kind, mode]["zero"].append(getattr(r, "zero_bytes", 0))
    rows = {}
    for kind in packs:
        with PackReader(packs[kind]) as r:
            doc = pruning_summary(r)
        warm = next(c for k, m, c in contenders if k == kind and m == "warm")
        rows[kind] = {
            "pack": packs[kind],
            "read_bytes_mean": float(np.mean(raw[kind, "cold"]["read"])),
            "zero_bytes_mean": float(np.mean(raw[kind, "cold"]["zero"])),
            "warm_ms": summary(raw[kind, "warm"]["ms"]),
            "cold_ms": summary(raw[kind, "cold"]["ms"]),
            "spare_bytes": warm.m.switcher.stats()["spare_bytes"],
            "pruning": doc, "raw": {m: raw[kind, m] for m in ("warm", "cold")}}
    for _, _, c in contenders:
        c.m.close()
    return rows


def print_rows(rows: dict, fraction: float = FRACTION, max_error: float = MAX_ERROR) -> None:
    print(f"\nsparse task models ({MODELS}, sparse preset): dense vs {fraction:.0%} of "
          f"weight-matrix blocks pruned, --max-error {max_error:g} (relative)")
    print(f"  {'pack':12s} {'read/switch MB':>14s} {'zeroed MB':>10s} {'warm p50':>9s} "
          f"{'cold p50':>9s} {'cold p90':>9s} {'spare MB':>9s}  rel. error / top-1 per task")
    for kind, r in rows.items():
        doc = r["pruning"]
        errs = "-" if doc is None else ", ".join(
            f"{t} {p['error']['rel']:.2f}/{p['error']['top1'] or 0:.2f}@{p['fraction']:.2f}"
            for t, p in doc["tasks"].items())
        print(f"  {kind:12s} {r['read_bytes_mean'] / 1e6:14.2f} {r['zero_bytes_mean'] / 1e6:10.2f} "
              f"{r['warm_ms']['p50']:9.2f} {r['cold_ms']['p50']:9.2f} {r['cold_ms']['p90']:9.2f} "
              f"{r['spare_bytes'] / 1e6:9.1f}  {errs}")
    d, i, j = rows["dense"], rows["independent"], rows["joint"]
    within = all(p["error"]["rel"] <= max_error for r in (i, j)
                 for p in r["pruning"]["tasks"].values())
    print(f"  joint vs independent, bytes read per cold switch: "
          f"{i['read_bytes_mean'] / max(j['read_bytes_mean'], 1):.2f}x fewer (target >= 2x); "
          f"cold p50 joint vs dense: {d['cold_ms']['p50'] / j['cold_ms']['p50']:.2f}x faster, "
          f"independent vs dense {d['cold_ms']['p50'] / i['cold_ms']['p50']:.2f}x (target >= 2x); "
          f"every task within the error bound: {'yes' if within else 'NO'}")
