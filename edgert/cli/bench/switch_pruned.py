"""The sparse rows of `edgert bench switch`: one set of task models packed dense, and
pruned independently and jointly (``edgert pack onnx --prune-blocks``) under each block
importance (activation, the default, and norm), switched warm and cold over the bench's
switch sequence.

Two model sets of the recipe (models/tasks/build.py), each with its calibration inputs
(each task's images drawn from its own scene statistics): the ``sparse`` preset, the demo
ViT and fine-tunes with a spread of block norms shared by all tasks, where the weights
decide most of a block's importance; and the ``demo`` preset, whose random blocks have
nearly equal norms, where the task's inputs decide it.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np

from ...stats import summary

FRACTION = 0.5       # the target fraction
# preset -> (models, --max-error). sparse: the target rows, bounded by what 50% of its
# blocks cost; demo: no bound, to show the masks at 50% on a model whose block norms do
# not discriminate (its errors, about 0.9, say the model is destroyed; not a target row)
MODEL_SETS = {"sparse": ("models/out/tasks-sparse", 0.7), "demo": ("models/out/tasks", None)}
# kind -> (joint, importance); None: dense
KINDS = {"dense": None,
         "independent": (False, "activation"), "joint": (True, "activation"),
         "independent/norm": (False, "norm"), "joint/norm": (True, "norm")}


def ensure_packs(preset: str = "sparse", fraction: float = FRACTION) -> dict[str, str]:
    """kind -> pack path, packed from the preset's models unless a pack newer than them
    with the same pruning settings exists."""
    from ...pack import PackReader
    from ...pack.onnx_import import pack_onnx
    from ...pack.prune import PruneOptions, pruning_summary
    root = Path(__file__).resolve().parents[3]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from models.tasks.build import ensure_built
    models, max_error = MODEL_SETS[preset]
    paths = ensure_built(models, preset)
    tasks = {k: v for k, v in paths.items() if k != "base"}
    calib = {t: os.path.join(models, "calib", f"{t}.npz") for t in tasks}
    newest = max(map(os.path.getmtime, [*paths.values(), *calib.values()]))
    out = {}
    for kind, how in KINDS.items():
        pack = f"{models}.{kind.replace('/', '-')}.edgepack"
        prune = None if how is None else \
            PruneOptions(fraction, calib, joint=how[0], max_error=max_error, importance=how[1])
        fresh = os.path.exists(pack) and os.path.getmtime(pack) >= newest
        if fresh:
            with PackReader(pack) as r:
                doc = pruning_summary(r)
            fresh = (doc is None) if prune is None else doc is not None and \
                (doc.get("fraction"), doc.get("joint"), doc.get("max_error"),
                 doc.get("importance")) == (fraction, prune.joint, max_error, how[1])
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


def print_rows(rows: dict, preset: str, fraction: float = FRACTION) -> None:
    models, max_error = MODEL_SETS[preset]
    print(f"\ntask models ({models}, {preset} preset): dense vs {fraction:.0%} of "
          f"weight-matrix blocks pruned, " + (f"--max-error {max_error:g} (relative)"
                                              if max_error else "no --max-error"))
    print(f"  {'pack':17s} {'read/switch MB':>14s} {'zeroed MB':>10s} {'warm p50':>9s} "
          f"{'cold p50':>9s} {'cold p90':>9s} {'spare MB':>9s}  rel. error / top-1 per task")
    for kind, r in rows.items():
        doc = r["pruning"]
        errs = "-" if doc is None else ", ".join(
            f"{t} {p['error']['rel']:.2f}/{p['error']['top1'] or 0:.2f}@{p['fraction']:.2f}"
            for t, p in doc["tasks"].items())
        print(f"  {kind:17s} {r['read_bytes_mean'] / 1e6:14.2f} {r['zero_bytes_mean'] / 1e6:10.2f} "
              f"{r['warm_ms']['p50']:9.2f} {r['cold_ms']['p50']:9.2f} {r['cold_ms']['p90']:9.2f} "
              f"{r['spare_bytes'] / 1e6:9.1f}  {errs}")
    d = rows["dense"]
    within = max_error is not None and all(
        p["error"]["rel"] <= max_error for k, r in rows.items() if k != "dense"
        for p in r["pruning"]["tasks"].values())
    for suffix, name in (("", "activation (default)"), ("/norm", "norm")):
        i, j = rows[f"independent{suffix}"], rows[f"joint{suffix}"]
        print(f"  {name}: joint vs independent, bytes read per cold switch "
              f"{i['read_bytes_mean'] / max(j['read_bytes_mean'], 1):.2f}x fewer (target >= 2x); "
              f"cold p50 vs dense: joint {d['cold_ms']['p50'] / j['cold_ms']['p50']:.2f}x, "
              f"independent {d['cold_ms']['p50'] / i['cold_ms']['p50']:.2f}x faster (target >= 2x)")
    if max_error is not None:
        print(f"  every task within the error bound: {'yes' if within else 'NO'}")
