"""What `edgert inspect` says about a pack's low-bit expert copies: bytes and error."""
from __future__ import annotations

import numpy as np

from .lowbit import PROJECTIONS


def lowbit_summary(lowbit, experts) -> dict:
    """Per copy: scheme, group, bytes against the 16-bit expert, and the quantization error
    of every tensor (relative L2, max abs), summarised per projection."""
    out = {"precision": lowbit.precision, "copies": {}}
    for scheme, c in lowbit.copies.items():
        keys = sorted(c.errors)
        e = np.array([c.errors[k] for k in keys], dtype=np.float64).reshape(len(keys), -1, 2)
        per = {}
        for i, p in enumerate(PROJECTIONS):
            worst = int(e[:, i, 0].argmax())
            per[p] = {"rel_l2_mean": float(e[:, i, 0].mean()), "rel_l2_max": float(e[worst, i, 0]),
                      "worst": f"expert {keys[worst][0]}.{keys[worst][1]}",
                      "max_abs": float(e[:, i, 1].max())}
        out["copies"][scheme] = {
            "group_size": c.group_size, "expert_bytes": c.extent_bytes,
            "ratio": c.extent_bytes / experts.extent_bytes, "error": per,
            "tensors": {f"{l}.{x}.{p}": {"rel_l2": c.errors[(l, x)][2 * i],
                                         "max_abs": c.errors[(l, x)][2 * i + 1]}
                        for (l, x) in keys for i, p in enumerate(PROJECTIONS)}}
    return out


def describe_lowbit(s: dict) -> list[str]:
    lines = [f"low-bit copies (default precision {s['precision']}):"]
    for scheme, c in s["copies"].items():
        group = "per row" if c["group_size"] == 0 else f"groups of {c['group_size']}"
        lines.append(f"  {scheme} ({group}): {c['expert_bytes']} B per expert, "
                     f"{c['ratio']:.3f}x the full-precision expert")
        for p, v in c["error"].items():
            lines.append(f"    {p}: rel L2 mean {v['rel_l2_mean']:.4f}, max {v['rel_l2_max']:.4f} "
                         f"({v['worst']}); max abs {v['max_abs']:.4g}")
    return lines
