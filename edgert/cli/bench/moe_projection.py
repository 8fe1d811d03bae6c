"""The projected half of `edgert bench moe`: routing traces of the measured runs replayed
through the real expert cache on a virtual clock (edgert/experts/replay.py).

1. Traces: the benchmark's segments (and the calibration text) decoded once with every
   expert resident and hints on, recording per token and layer the router's probabilities,
   its top-k and the next layer's hint (`TraceRecorder`).
2. Calibration: a `CostModel` from this run's measurements (expert reads, the resident step,
   the cache's bookkeeping with no misses, one hint); every measured contender is projected
   on its own segment's trace and the error against the measured tok/s is reported.
3. Devices: every shipped config with a `perf:` section, for the trained model's shape (in
   16-bit) and the OLMoE-1B-7B and Qwen3-30B-A3B shapes (traces mapped by
   `trace.synthesize`), at several budgets: LRU, the other policies, edgert (the exact
   policy and prefetch the cost model picks, `choose`) and lossy substitution.
All figures from here are projections and are labelled so.
"""
from __future__ import annotations

import numpy as np

from ...experts.costmodel import SHAPES, CostModel, ModelShape, prefetch_pays
from ...experts.replay import project, project_on_demand, project_resident
from ...experts.trace import RoutingTrace, synthesize

EXACT = (("lru", {}), ("lfu", {}), ("gate", {"decay": 0.9}), ("stale", {}))
DEVICE_BUDGETS = (0.1, 0.25, 0.5, 0.75)


def belady_future(tr: RoutingTrace) -> dict[int, list[int]]:
    """What every exact contender acquires, per layer in order: each step's experts sorted."""
    out = {l: [] for l in tr.layers}
    for _, rows in tr.step_rows():
        for i, l in enumerate(tr.layers):
            out[l].extend(sorted(set(tr.topk[rows, i].ravel().tolist())))
    return out


def slots_of(budget: float, shape: ModelShape) -> int:
    return min(shape.total_experts, max(1, round(budget * shape.total_experts)))


def project_spec(tr: RoutingTrace, shape: ModelShape, cost: CostModel, spec: dict) -> dict:
    """One contender (a spec of the measured bench) on one trace: its projected summary."""
    kind = spec["kind"]
    if kind == "resident":
        return project_resident(tr, shape, cost)
    if kind == "on-demand":
        return project_on_demand(tr, shape, cost)
    opts = dict(spec.get("options") or {})
    if spec["policy"] == "belady":
        opts = {"future": belady_future(tr)}
    p = project(tr, shape, cost, slots_of(spec["budget"], shape), policy=spec["policy"],
                policy_options=opts, prefetch=spec.get("prefetch", False),
                lossy_alpha=spec.get("alpha", 0.0), prefetch_min_prob=spec.get("min_prob", 0.2),
                hint_probe=spec.get("hint_probe", (256, 1024)))
    out = p.summary()
    out["substitution_rate"] = p.stats["total"].get("substitution_rate")
    return out


def project_over(traces, shape, cost, spec) -> dict:
    """Median tok/s over the traces (as the measured table), means of the rest."""
    runs = [project_spec(t, shape, cost, spec) for t in traces]
    out = {"tok_s": float(np.median([r["tok_s"] for r in runs]))}
    for k in runs[0]:
        if k != "tok_s":
            xs = [r[k] for r in runs if r.get(k) is not None]
            out[k] = float(np.mean(xs)) if xs else None
    return out


def choose(calib: RoutingTrace, shape: ModelShape, cost: CostModel, budget: float = 0.5,
           min_prob: float = 0.2) -> dict:
    """edgert's exact configuration for a device and shape, from the cost model: the exact
    policy with the best projected tok/s on the calibration trace, and prefetch on where
    `prefetch_pays` says it can pay and the projection agrees."""
    best = None
    for name, opts in EXACT:
        spec = {"kind": "cache", "budget": budget, "policy": name, "options": opts}
        tps = project_spec(calib, shape, cost, spec)["tok_s"]
        if best is None or tps > best[0] * 1.001:
            best = (tps, spec)
    spec = dict(best[1])
    if prefetch_pays(cost, shape):
        on = {**spec, "prefetch": True, "min_prob": min_prob}
        if project_spec(calib, shape, cost, on)["tok_s"] > best[0]:
            spec = on
    return spec


def calibrated_cost(table: dict, limits: dict, layers: int) -> CostModel:
    """This machine's cost model from the probes measured in the same run."""
    tpot = {n: 1.0 / table[n]["tok_s"] for n in ("resident", "100% lru", "100% hints") if n in table}
    route = max(0.0, (tpot.get("100% lru", tpot["resident"]) - tpot["resident"]) / layers)
    hint = max(0.0, (tpot.get("100% hints", tpot.get("100% lru", 0)) - tpot.get("100% lru", 0))
               / max(1, layers - 1)) if "100% hints" in tpot else 0.0
    return CostModel.calibrated(read_latency_s=0.0, read_Bps=limits["read_Bps"],
                                resident_tpot_s=tpot["resident"], layers=layers,
                                route_s=route, hint_s=hint)


def trained_shape(layout, model_cfg: dict, dtype_bytes: int | None = None) -> ModelShape:
    """The benchmark model's shape; `dtype_bytes` rescales its fp32 bytes (devices: 2)."""
    h, L = model_cfg["hidden_size"], len(layout.moe_layers)
    heads, kvh = model_cfg["num_attention_heads"], model_cfg.get("num_key_value_heads") or \
        model_cfg["num_attention_heads"]
    hd = h // heads
    scale = 1.0 if dtype_bytes is None else dtype_bytes / 4
    dense = int(((2 * heads + 2 * kvh) * hd * h + h * layout.num_experts) * 4 * scale)
    head = int(model_cfg["vocab_size"] * h * 4 * scale)
    name = "trained" + ("" if dtype_bytes is None else f" ({8 * dtype_bytes}-bit)")
    return ModelShape(name, L, layout.num_experts, layout.top_k, int(layout.extent_bytes * scale),
                      h, dense, head)


def project_measured(traces, calib, shape, cost, contenders) -> dict:
    """Every measured contender projected on its segments' traces with this machine's costs."""
    out = {}
    for name, spec in contenders:
        out[name] = project_over(traces, shape, cost, spec)
    return out


def device_contenders(edgert: dict, budgets, alphas, quick: bool):
    out = [("resident", {"kind": "resident"}), ("on-demand", {"kind": "on-demand"})]
    for b in budgets:
        tag = f"{round(100 * b)}%"
        out.append((f"{tag} lru", {"kind": "cache", "budget": b, "policy": "lru"}))
        if not quick:
            out += [(f"{tag} {n}", {"kind": "cache", "budget": b, "policy": n, "options": o})
                    for n, o in EXACT[1:]]
            out.append((f"{tag} belady", {"kind": "cache", "budget": b, "policy": "belady"}))
        e = {**edgert, "budget": b}
        out.append((f"{tag} edgert", e))
        out += [(f"{tag} lossy {a}", {**e, "alpha": a}) for a in alphas]
    return out


def project_devices(traces, calib, configs, shapes: dict, budgets, alphas, quick: bool) -> dict:
    """{config: {shape: {"edgert": spec, "prefetch_pays": bool, "table": {name: summary}}}}."""
    out = {}
    for cfg in configs:
        if cfg.perf is None:
            continue
        out[cfg.name] = {}
        for sname, shape in shapes.items():
            trs = [synthesize(t, shape.layers, shape.experts) for t in traces]
            cal = synthesize(calib, shape.layers, shape.experts)
            cost = CostModel.for_device(cfg.perf, shape)
            edgert = choose(cal, shape, cost)
            table = {name: project_over(trs, shape, cost, spec)
                     for name, spec in device_contenders(edgert, budgets, alphas, quick)}
            out[cfg.name][sname] = {"edgert": _spec_json(edgert),
                                    "prefetch_pays": prefetch_pays(cost, shape),
                                    "cost": {k: v for k, v in cost.__dict__.items()},
                                    "table": table}
    return out


def _spec_json(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "budget"}


def shapes_for(layout, model_cfg: dict, quick: bool) -> dict:
    names = ("olmoe-1b-7b",) if quick else SHAPES
    out = {} if quick else {"trained (16-bit)": trained_shape(layout, model_cfg, 2)}
    for n in names:
        s = ModelShape.from_name(n)
        if s.experts % layout.num_experts == 0 and s.top_k == layout.top_k:
            out[n] = s
    return out


# --- printing and plotting --------------------------------------------------------------------
def print_calibration(measured: dict, projected: dict, cost: CostModel) -> list[dict]:
    print(f"\nPROJECTED vs measured on this machine (cost model: read "
          f"{cost.read_Bps / 1e6:.0f} MB/s, resident step {1e3 * cost.layer_s:.3f} ms/layer, "
          f"cache bookkeeping {1e3 * cost.route_s:.3f} ms/layer, hint {1e3 * cost.hint_s:.3f} ms)")
    print(f"{'contender':16s} {'measured':>9s} {'projected':>10s} {'error':>7s} "
          f"{'hit meas.':>9s} {'hit proj.':>9s} {'MB/tok m.':>9s} {'MB/tok p.':>9s}")
    rows = []
    for name, m in measured.items():
        p = projected.get(name)
        if p is None:
            continue
        err = p["tok_s"] / m["tok_s"] - 1
        rows.append({"contender": name, "measured_tok_s": m["tok_s"], "projected_tok_s": p["tok_s"],
                     "error": err})
        print(f"{name:16s} {m['tok_s']:9.1f} {p['tok_s']:10.1f} {100 * err:+6.1f}% "
              f"{_f(m.get('exact_hit_rate'), '9.3f')} {_f(p.get('exact_hit_rate'), '9.3f')} "
              f"{(m.get('bytes_per_token') or 0) / 1e6:9.3f} {(p.get('bytes_per_token') or 0) / 1e6:9.3f}")
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"largest projection error: {100 * worst['error']:+.1f}% ({worst['contender']}; "
          f"target within 15%)")
    return rows


def print_devices(dev: dict) -> None:
    for cfg, per_shape in dev.items():
        for sname, d in per_shape.items():
            t = d["table"]
            e = d["edgert"]
            print(f"\nPROJECTED {cfg}, {sname}: edgert = {e['policy']}{e.get('options') or ''}"
                  f"{' + prefetch' if e.get('prefetch') else ', no prefetch'} "
                  f"(prefetch pays by the cost model: {d['prefetch_pays']})")
            print(f"{'contender':16s} {'tok/s':>8s} {'exact':>6s} {'effect.':>7s} {'MB/tok':>8s} "
                  f"{'stall ms':>9s} {'vs LRU':>7s}")
            for name, a in t.items():
                lru = t.get(name.split(" ")[0] + " lru")
                ratio = a["tok_s"] / lru["tok_s"] if lru and "%" in name else None
                print(f"{name:16s} {a['tok_s']:8.2f} {_f(a.get('exact_hit_rate'), '6.3f')} "
                      f"{_f(a.get('effective_hit_rate'), '7.3f')} "
                      f"{(a.get('bytes_per_token') or 0) / 1e6:8.1f} "
                      f"{1e3 * (a.get('stall_per_token_s') or 0):9.1f} {_f(ratio, '6.2f')}x")


def plot_devices(dev: dict, path: str, save, pyplot) -> None:
    plt = pyplot()
    if plt is None or not dev:
        return
    shapes = list(next(iter(dev.values())).keys())
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, sname in zip(axes[0], shapes):
        for c, (cfg, per_shape) in zip(colors, dev.items()):
            t = per_shape[sname]["table"]
            bs = sorted({int(n.split("%")[0]) for n in t if "%" in n})
            for label, style in (("lru", ":"), ("edgert", "-"), ("lossy 0.2", "--")):
                ys = [t[f"{b}% {label}"]["tok_s"] for b in bs if f"{b}% {label}" in t]
                if ys:
                    ax.plot(bs[:len(ys)], ys, style, color=c, marker="o", ms=3,
                            label=f"{cfg} {label}" if sname == shapes[0] else None)
            ax.axhline(t["resident"]["tok_s"], color=c, lw=0.6, alpha=0.5)
        ax.set(xlabel="expert budget, % of all experts", ylabel="decode tok/s (PROJECTED)",
               title=sname, yscale="log")
    fig.legend(fontsize=6, loc="lower center", ncol=5)
    fig.suptitle("edgert bench moe: projected decode speed per device config "
                 "(dotted LRU, solid edgert exact, dashed lossy 0.2; thin: all resident)", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    save(fig, path)


def _f(x, spec):
    return "-" if x is None else format(x, spec)
