"""The low-bit rows of `edgert bench switch`: the demo task models packed float, and
quantized by ONNX Runtime (``edgert pack onnx --quant int8`` and ``--quant int4``), switched
warm and cold over the bench's switch sequence: bytes a switch reads from storage, latency,
and each task's recorded output error against its float model.

The quantized packs are built beside the float pack (``NAME.int8.edgepack``,
``NAME.int4.edgepack``) with the float pack's block size, and rebuilt when older than it.
"""
from __future__ import annotations

import os

MODES = ("int8", "int4")


def ensure_packs(pack: str, models: str) -> dict[str, str]:
    """kind -> pack path: the float pack as it is, and one per quantization mode."""
    from ..pack import PackReader
    from ..pack.onnx_import import pack_onnx
    from ..pack.onnx_quant import OnnxQuant
    with PackReader(pack) as r:
        tasks, block_size = r.tasks, r.block_size
    files = {t: os.path.join(models, f"{t}.onnx") for t in tasks}
    base = os.path.join(models, "base.onnx")
    out = {"float": pack}
    stem = pack.removesuffix(".edgepack")
    for mode in MODES:
        path = f"{stem}.{mode}.edgepack"
        if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(pack):
            print(f"packing {path} (onnxruntime quantizer, {mode})")
            pack_onnx(base, files, path, block_size=block_size, quant=OnnxQuant(mode))
        out[mode] = path
    return out


def run(cfg, seq: list[str], pack: str, models: str) -> dict:
    """The rows: per pack kind, mean bytes read per cold switch, warm and cold latency,
    stored and dense bytes, and the recorded output errors."""
    from ..pack import PackReader
    from .switch_pruned import run as run_rows
    packs = ensure_packs(pack, models)
    rows = run_rows(cfg, seq, packs)
    for kind, row in rows.items():
        with PackReader(packs[kind]) as r:
            q = r.config.get("quant")
            row["quant"] = q
            row["stored_bytes"] = sum(b.length for b in r.blocks if not b.zero)
            row["dense_bytes"] = {t: sum(s.nbytes for s in r.task(t).values()) for t in r.tasks}
        row.pop("pruning", None)
        row.pop("accuracy", None)
    return rows


def print_rows(rows: dict) -> None:
    print("\ntask models, float vs quantized by ONNX Runtime (dynamic int8; MatMulNBits int4), "
          "same switch sequence, contenders alternated:")
    print(f"  {'pack':6s} {'stored MB':>10s} {'task MB':>8s} {'read/switch MB':>15s} "
          f"{'warm p50':>9s} {'cold p50':>9s} {'cold p90':>9s}  output rel. L2 error per task")
    for kind, r in rows.items():
        task_mb = max(r["dense_bytes"].values()) / 1e6
        errs = "-" if r["quant"] is None else ", ".join(
            f"{t} {v['error']['rel_l2']:.3f}" for t, v in r["quant"]["tasks"].items())
        print(f"  {kind:6s} {r['stored_bytes'] / 1e6:10.2f} {task_mb:8.2f} "
              f"{r['read_bytes_mean'] / 1e6:15.2f} {r['warm_ms']['p50']:9.2f} "
              f"{r['cold_ms']['p50']:9.2f} {r['cold_ms']['p90']:9.2f}  {errs}")
    f = rows["float"]
    for kind in MODES:
        if kind in rows:
            q = rows[kind]
            print(f"  {kind} vs float: {f['read_bytes_mean'] / max(q['read_bytes_mean'], 1):.2f}x "
                  f"fewer bytes per cold switch, cold p50 "
                  f"{f['cold_ms']['p50'] / q['cold_ms']['p50']:.2f}x faster, warm p50 "
                  f"{f['warm_ms']['p50'] / q['warm_ms']['p50']:.2f}x")
