"""The low-bit contenders of `edgert bench moe`: int8 and int4 experts under LRU, and mixed
precision, each at the same byte budget as the exact contenders of its budget (a fraction
of the full-precision experts' bytes), measured here and projected per device config.

Packs: beside the benchmark's own pack, `model.int8.edgepack` (--quant int8) and
`model.mixed.edgepack` (--quant mixed: int4 copies; int4 contenders read them too).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

SCHEMES = ("int8", "int4")


def ensure_packs(model: Path) -> dict[str, str]:
    """{"int8": pack, "mixed": pack} of the benchmark model, packed when missing or older
    than the checkpoint; a shape torch's int4 kernels refuse drops int4 and mixed (said)."""
    from ..pack.hf_import import pack_hf
    from ..pack.quant import QuantOptionError
    src = max(p.stat().st_mtime for p in model.glob("*.safetensors"))
    out = {}
    for quant in ("int8", "mixed"):
        pack = model / f"model.{quant}.edgepack"
        try:
            if not pack.exists() or pack.stat().st_mtime < src:
                pack_hf(str(model), str(pack), progress=False, quant=quant)
            out[quant] = str(pack)
        except QuantOptionError as e:
            print(f"no {quant} contenders for this model: {e}", flush=True)
    return out


def contenders(budgets, packs: dict) -> list[tuple[str, dict]]:
    out = []
    for b in budgets:
        if b >= 1.0:
            continue
        tag = f"{round(100 * b)}%"
        if "int8" in packs:
            out.append((f"{tag} int8", {"kind": "lowbit", "scheme": "int8", "budget": b,
                                        "pack": packs["int8"]}))
        if "mixed" in packs:
            out += [(f"{tag} int4", {"kind": "lowbit", "scheme": "int4", "budget": b,
                                     "pack": packs["mixed"]}),
                    (f"{tag} mixed", {"kind": "mixed", "budget": b, "pack": packs["mixed"]})]
    return out


def budget_bytes(layout, fraction: float) -> int:
    """The exact contenders' bytes at `fraction`: that many full-precision slots."""
    return max(1, round(fraction * len(layout.table))) * layout.slot_bytes


def load(rt, spec: dict):
    """(model, provider) of a low-bit contender: LRU over the copy's slots in the same
    bytes as the exact contenders, no prefetch (as the `lru` contender); mixed: its two
    caches (LRU) and the default band."""
    from ..experts.api import ExpertLayout
    from ..experts.cache import ExpertCache
    from ..pack import PackReader
    reader = PackReader(spec["pack"], read_mode=rt.config.storage.read_mode)
    if reader.storage.mode != "direct":
        reader.storage.drop_cache()
    nbytes = budget_bytes(ExpertLayout.from_reader(reader), spec["budget"])
    if spec["kind"] == "mixed":
        reader.close()
        lm = rt.load(spec["pack"], precision="mixed", expert_budget=nbytes, policy="lru",
                     prefix_cache=False)
        return lm, lm.provider
    low = ExpertLayout.from_reader(reader, spec["scheme"])
    slots = min(len(low.table), nbytes // low.slot_bytes)
    cache = ExpertCache(reader, rt.arena, "bench: expert slots", slots, policy="lru",
                        prefetch=False, layout=low)
    return rt.load(spec["pack"], provider=cache, precision=spec["scheme"],
                   prefix_cache=False), cache


def print_summary(table: dict) -> None:
    res_ppl = table["resident"]["ppl"]
    for b in ("25%", "50%", "75%"):
        lru = table.get(f"{b} lru")
        rows = [(n, table[f"{b} {n}"]) for n in ("int8", "int4", "mixed") if f"{b} {n}" in table]
        if lru and rows:
            print(f"low-bit at {b} (same bytes as exact): " + "; ".join(
                f"{n} {a['tok_s'] / lru['tok_s']:.2f}x LRU tok/s, ppl "
                f"{100 * (a['ppl'] / res_ppl - 1):+.2f}%, KL {a['kl_mean']:.4f}, greedy "
                f"agreement {a.get('greedy_agreement') or 0:.3f}, "
                f"{(a['bytes_per_token'] or 0) / 1e6:.3f} MB/tok"
                + (f", {100 * a['low_precision_share']:.0f}% of experts at int4"
                   if a.get("low_precision_share") is not None else "") for n, a in rows))


def bytes_ratio(scheme: str, group: int = 64) -> float:
    """Bytes of a low-bit expert per byte of its 16-bit original (scales included)."""
    return (0.5 + 4 / group) / 2 if scheme == "int4" else 0.5


def project_device_rows(trs, shape, perf, budgets, project_over, cost_for) -> dict:
    """Projected LRU over int8 / int4 experts, and mixed precision, at each budget's bytes
    (16-bit shapes): the expert bytes shrink, so the same bytes hold 1/ratio as many experts
    and a miss reads ratio as many bytes. NOTE: the cost model streams the copy's bytes for
    compute and does not charge dequantization."""
    out = {}
    for scheme in SCHEMES:
        r = bytes_ratio(scheme)
        s = replace(shape, expert_bytes=int(shape.expert_bytes * r))
        cost = cost_for(perf, s)
        for b in budgets:
            out[f"{round(100 * b)}% {scheme} lru"] = project_over(
                trs, s, cost, {"kind": "cache", "budget": min(1.0, b / r), "policy": "lru"})
    cost = cost_for(perf, shape)
    for b in budgets:
        out[f"{round(100 * b)}% mixed"] = project_over(trs, shape, cost,
                                                       mixed_spec(b, shape, perf, cost_for))
    return out


def mixed_spec(budget: float, shape, perf, cost_for) -> dict:
    """A projected mixed contender: LRU in both caches, the default band, int4 copies."""
    r = bytes_ratio("int4")
    low = replace(shape, expert_bytes=int(shape.expert_bytes * r))
    return {"kind": "mixed", "budget": budget, "low_bytes": low.expert_bytes,
            "low_expert_s": cost_for(perf, low).expert_s}


def project_mixed_spec(tr, shape, cost, spec: dict, slots: int) -> dict:
    """One projected mixed contender on one trace (`slots` full-precision slots' bytes)."""
    from ..errors import BudgetExceeded
    from ..projection.replay_mixed import project_mixed, summary
    try:
        p = project_mixed(tr, shape, cost, slots * shape.expert_bytes, spec["low_bytes"],
                          spec["low_expert_s"])
    except BudgetExceeded:        # fewer bytes than top-k slots at each precision
        return {"tok_s": float("nan"), "tok_s_steady": float("nan")}
    return summary(p)


def own_budget_rows(trs, cal, shape, cfg, project_over, choose, cost_for) -> dict:
    """The config's own expert cache (`memory.experts`), as a fraction of the shape's 16-bit
    experts (at most all of them): exact LRU, edgert exact, int8 / int4 LRU and mixed."""
    total = shape.total_experts * shape.expert_bytes
    f = min(1.0, cfg.budget.experts / total)
    cost = cost_for(cfg.perf, shape)
    table = {"lru": project_over(trs, shape, cost, {"kind": "cache", "budget": f,
                                                    "policy": "lru"}),
             "edgert": project_over(trs, shape, cost, choose(cal, shape, cost, f))}
    for scheme in SCHEMES:
        r = bytes_ratio(scheme)
        s = replace(shape, expert_bytes=int(shape.expert_bytes * r))
        table[f"{scheme} lru"] = project_over(
            trs, s, cost_for(cfg.perf, s), {"kind": "cache", "budget": min(1.0, f / r),
                                            "policy": "lru"})
    table["mixed"] = project_over(trs, shape, cost, mixed_spec(f, shape, cfg.perf, cost_for))
    return {"bytes": cfg.budget.experts, "fraction": f, "table": table}


def print_own(cfg: str, sname: str, own: dict) -> None:
    t = own["table"]
    lru = t["lru"]["tok_s"]
    print(f"PROJECTED {cfg}, {sname}, the config's own expert cache "
          f"({own['bytes'] / 2**30:.2f} GiB = {100 * own['fraction']:.1f}% of the 16-bit "
          f"experts): " + "; ".join(
              f"{n} {a['tok_s']:.2f} tok/s ({a['tok_s'] / lru:.2f}x"
              + (f", {100 * a['low_precision_share']:.0f}% at int4"
                 if a.get("low_precision_share") is not None else "") + ")"
              for n, a in t.items()))
