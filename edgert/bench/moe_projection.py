"""The projected half of `edgert bench moe`: routing traces of the measured runs replayed
through the real expert cache on a virtual clock (edgert/projection/replay.py).

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

from ..projection.costmodel import SHAPES, CostModel, ModelShape, prefetch_pays
from ..projection.replay import project, project_on_demand, project_resident
from ..projection.share import share_slots
from ..projection.trace import RoutingTrace, synthesize
from .moe_lowbit import own_budget_rows, print_own, project_device_rows, project_mixed_spec

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
    if kind == "mixed":
        return project_mixed_spec(tr, shape, cost, spec, slots_of(spec["budget"], shape))
    cost = cost.for_policy(spec["policy"])
    opts = dict(spec.get("options") or {})
    if spec["policy"] == "belady":
        opts = {"future": belady_future(tr)}
    slots = slots_of(spec["budget"], shape)
    quota = share_for(tr, shape, slots, spec) if spec.get("share") else None
    prefetch = spec.get("prefetch", False)
    key = (id(tr), shape, slots, spec["policy"], repr(spec.get("options")), spec.get("share"),
           spec.get("alpha", 0.0))
    if not prefetch and key in _REPLAYS:       # counts do not depend on time: retime them
        p = _REPLAYS[key][1].retimed(shape, cost)
    else:
        p = project(tr, shape, cost, slots, policy=spec["policy"], quota=quota,
                    policy_options=opts, prefetch=prefetch,
                    lossy_alpha=spec.get("alpha", 0.0), prefetch_min_prob=spec.get("min_prob", 0.2),
                    hint_probe=spec.get("hint_probe", (256, 1024)))
        if not prefetch:
            _REPLAYS[key] = (tr, p)      # holds the trace: its id stays unique
    out = p.summary()
    out["substitution_rate"] = p.stats["total"].get("substitution_rate")
    return out


_SHARES: dict = {}
_REPLAYS: dict = {}     # replays without prefetch, by trace and spec (retimed per device)


def share_for(tr: RoutingTrace, shape: ModelShape, slots: int, spec: dict):
    """Slots per layer for a spec with "share": from the calibration trace when one was
    registered for the shape (`register_calibration`), else from `tr` itself."""
    key = (shape.name, slots, spec["policy"], repr(spec.get("options")))
    if key not in _SHARES:
        src = _CALIB.get(shape.name, tr)
        _SHARES[key] = share_slots(src, shape, slots, spec["policy"], spec.get("options"))
    return _SHARES[key]


_CALIB: dict = {}


def register_calibration(shape: ModelShape, calib: RoutingTrace) -> None:
    """Slot sharing for `shape` is computed on `calib` (never on the measured segments)."""
    _CALIB[shape.name] = calib


def project_over(traces, shape, cost, spec) -> dict:
    """Median tok/s over the traces (as the measured table), means of the rest."""
    runs = [project_spec(t, shape, cost, spec) for t in traces]
    out = {k: float(np.median([r[k] for r in runs])) for k in ("tok_s", "tok_s_steady")}
    for k in runs[0]:
        if k not in out:
            xs = [r[k] for r in runs if r.get(k) is not None]
            out[k] = float(np.mean(xs)) if xs else None
    return out


MARGIN = 1.02   # a change from LRU (or an addition) must project 2% faster: within that,
                # the calibration text cannot tell it from noise in routing


def choose(calib: RoutingTrace, shape: ModelShape, cost: CostModel, budget: float,
           min_prob: float = 0.2, share: bool = False) -> dict:
    """edgert's exact configuration for a device, shape and budget, decided by the cost
    model on the calibration trace (never on the measured segments): LRU unless another
    exact policy projects faster by MARGIN, then cross-layer slot sharing (`share_slots`,
    when asked) and prefetch, each kept only when it projects faster by MARGIN."""
    def tps(spec):
        return project_spec(calib, shape, cost, spec)["tok_s"]
    best = {"kind": "cache", "budget": budget, "policy": "lru", "options": {}}
    best_t = tps(best)
    for name, opts in EXACT[1:]:
        spec = {**best, "policy": name, "options": opts}
        t = tps(spec)
        if t > best_t * MARGIN:
            best_t, best = t, spec
    if share:
        on = {**best, "share": True}
        t = tps(on)
        if t > best_t * MARGIN:
            best_t, best = t, on
    on = {**best, "prefetch": True, "min_prob": min_prob}
    if tps(on) > best_t * MARGIN:
        best = on
    return best


def choose_all(calib, shape, cost, budgets, min_prob: float = 0.2) -> dict:
    """{budget: edgert's spec}: `choose` at each budget below 100%."""
    return {b: choose(calib, shape, cost, b, min_prob) for b in budgets if b < 1.0}


# the bookkeeping of each policy that observes more than LRU, with no misses
POLICY_PROBES = {"lfu": "100% lfu", "gate": "100% gate", "stale": "100% stale"}
AHEAD_PROBE = "min ahead"        # "min lru" with read-ahead: what a prefetch read costs
PROBES = ("resident", "on-demand", "100% lru", "100% hints", "min lru", AHEAD_PROBE,
          *POLICY_PROBES.values())


def fit_miss_cost(cost: CostModel, table: dict, traces, shape: ModelShape,
                  spec: dict) -> CostModel:
    """`cost` with a miss's CPU work (`miss_s`) set so that the "min lru" probe projects its
    measured steady tok/s (bisection). The closed form in `calibrated_cost` equates mean step
    times, but steady tok/s drops each run's slowest tenth of steps, which in a projection
    are its miss-heaviest and in a measurement partly noise: fitted, the probe that prices
    misses matches on the figure every contender is compared on."""
    m = table.get("min lru")
    if not m:
        return cost
    target = m.get("tok_s_steady", m["tok_s"])

    def at(x: float) -> float:
        return project_over(traces, shape, cost.with_(miss_s=x), spec)["tok_s_steady"]
    return cost.with_(miss_s=_bisect(at, target, 0.0, 10.0 * cost.read_s(shape.expert_bytes)))


def _bisect(at, target: float, lo: float, hi: float, steps: int = 12) -> float:
    """x in [lo, hi] where the decreasing `at(x)` meets `target` (an end where it cannot)."""
    if at(lo) <= target:
        return lo
    if at(hi) >= target:
        return hi
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if at(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def fit_prefetch_cpu(cost: CostModel, table: dict, traces, shape: ModelShape,
                     spec: dict) -> CostModel:
    """`cost` with the engine time one prefetch read takes (`prefetch_cpu_s`) set so that the
    read-ahead probe's gain over "min lru" (the same cache without read-ahead) projects as
    measured (bisection: the projected gain falls as that time grows). Without the two
    probes, `cost` unchanged (a demand read's CPU cost).

    NOTE: on a machine whose cores all compute, the worker's reads take time from the
    engine (thread switches, the GIL, a core); the probe measures how much, so the chooser
    turns prefetch on here only where it pays at that price. The gain, not the probe's own
    tok/s, is matched: the projection's error on "min lru" is not prefetch's."""
    m, base = table.get(AHEAD_PROBE), table.get("min lru")
    if not m or not base:
        return cost
    target = m.get("tok_s_steady", m["tok_s"]) / base.get("tok_s_steady", base["tok_s"])
    plain = project_over(traces, shape, cost, {**spec, "prefetch": False})["tok_s_steady"]

    def at(x: float) -> float:
        ahead = project_over(traces, shape, cost.with_(prefetch_cpu_s=x), spec)["tok_s_steady"]
        return ahead / plain
    hi = 4.0 * (cost.read_s(shape.expert_bytes) + cost.miss_s)
    return cost.with_(prefetch_cpu_s=_bisect(at, target, 0.0, hi, steps=10))


def fit_costs(cost: CostModel, table: dict, traces, shape: ModelShape, ahead_spec: dict) -> CostModel:
    """The probes' bisections in order: a miss's cost, then a prefetch read's."""
    cost = fit_miss_cost(cost, table, traces, shape, {**ahead_spec, "prefetch": False})
    return fit_prefetch_cpu(cost, table, traces, shape, ahead_spec)


def calibrated_cost(table: dict, limits: dict, shape: ModelShape) -> CostModel:
    """This machine's cost model from the probes measured in the same run: the resident
    step (compute), a cache holding everything (its bookkeeping per layer), the same with
    a hint at every layer (one hint), and a cache of top-k slots per layer ("min lru":
    nearly every expert a step uses is a miss; the cost of a miss beyond the measured read:
    syscalls, verification, eviction, threads waking). Without that probe, on-demand
    (every expert read, no cache) stands in. Reads: the measured random O_DIRECT reads."""
    tpot = {n: 1.0 / table[n].get("tok_s_steady", table[n]["tok_s"]) for n in PROBES if n in table}
    L = shape.layers
    route = max(0.0, (tpot.get("100% lru", tpot["resident"]) - tpot["resident"]) / L)
    hint = max(0.0, (tpot["100% hints"] - tpot["100% lru"]) / max(1, L - 1)) \
        if "100% hints" in tpot and "100% lru" in tpot else 0.0
    read_s = shape.expert_bytes / limits["read_Bps"]
    miss, extra = 0.0, 0.0
    if "min lru" in tpot and "100% lru" in tpot and table["min lru"].get("bytes_per_token"):
        m = table["min lru"]
        misses = m["bytes_per_token"] / shape.expert_bytes                     # per token
        # a demand read that follows compute costs more than one right after another read
        # (storage and threads idle); the probe times both kinds
        if m.get("first_read_s_mean") is not None and m.get("next_read_s_mean") is not None:
            extra = max(0.0, m["first_read_s_mean"] - m["next_read_s_mean"])
        firsts = m.get("first_reads_per_token") or 0.0
        miss = max(0.0, (tpot["min lru"] - tpot["100% lru"] - extra * firsts) / misses - read_s)
    elif "on-demand" in tpot:
        per_read = (tpot["on-demand"] - tpot["resident"]) / (L * shape.top_k)
        miss = max(0.0, per_read - read_s)
    # NOTE: every policy keeps LRU's recency clock and adds its own bookkeeping, so none
    # is charged less than LRU: a probe that measured faster than "100% lru" measured noise
    # (left unclamped, that noise alone made the chooser prefer LFU at 75% in one run)
    by_policy = {pol: max(route, (tpot[name] - tpot["resident"]) / L)
                 for pol, name in POLICY_PROBES.items() if name in tpot}
    return CostModel.calibrated(read_latency_s=0.0, read_Bps=limits["read_Bps"],
                                resident_tpot_s=tpot["resident"], layers=L,
                                route_s=route, hint_s=hint, miss_s=miss,
                                first_read_extra_s=extra, route_by_policy=by_policy)


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
        if spec["kind"] in ("lowbit", "mixed"):   # low-bit: projected per device config only
            continue
        out[name] = project_over(traces, shape, cost, spec)
    return out


def device_contenders(edgert: dict, budgets, alphas, detail: bool):
    """`edgert`: {budget: spec} (`choose_all`)."""
    out = [("resident", {"kind": "resident"}), ("on-demand", {"kind": "on-demand"})]
    for b in budgets:
        tag = f"{round(100 * b)}%"
        out.append((f"{tag} lru", {"kind": "cache", "budget": b, "policy": "lru"}))
        if detail:
            out += [(f"{tag} {n}", {"kind": "cache", "budget": b, "policy": n, "options": o})
                    for n, o in EXACT[1:]]
            out.append((f"{tag} belady", {"kind": "cache", "budget": b, "policy": "belady"}))
        e = edgert[b]
        out.append((f"{tag} edgert", e))
        out += [(f"{tag} lossy {a}", {**e, "alpha": a}) for a in alphas]
    return out


DETAIL = ("jetson-orin-nano-8gb", "olmoe-1b-7b")   # every policy here; elsewhere LRU and edgert


def project_devices(traces, calib, configs, shapes: dict, budgets, alphas, quick: bool) -> dict:
    """{config: {shape: {"edgert": spec, "prefetch_pays": bool, "table": {name: summary}}}}.
    Traces are mapped once per shape, so replays without prefetch serve every config."""
    out = {cfg.name: {} for cfg in configs if cfg.perf is not None}
    for sname, shape in shapes.items():
        trs = [synthesize(t, shape.layers, shape.experts) for t in traces]
        cal = synthesize(calib, shape.layers, shape.experts)
        register_calibration(shape, cal)
        bs = budgets if shape.total_experts <= 1024 else tuple(b for b in budgets if b <= 0.5)
        for cfg in configs:
            if cfg.perf is None:
                continue
            cost = CostModel.for_device(cfg.perf, shape)
            edgert = choose_all(cal, shape, cost, bs)
            detail = not quick and (cfg.name, sname) == DETAIL
            table = {name: project_over(trs, shape, cost, spec)
                     for name, spec in device_contenders(edgert, bs, alphas, detail)}
            table.update(project_device_rows(trs, shape, cfg.perf, bs, project_over,
                                             CostModel.for_device))
            out[cfg.name][sname] = {"edgert": {f"{round(100 * b)}%": _spec_json(e)
                                               for b, e in edgert.items()},
                                    "prefetch_pays": prefetch_pays(cost, shape),
                                    "cost": dict(cost.__dict__), "table": table,
                                    "own": own_budget_rows(trs, cal, shape, cfg, project_over,
                                                           choose, CostModel.for_device)}
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
    print(f"\nPROJECTED vs measured on this machine (cost model from the probes "
          f"{', '.join(PROBES)}: read {cost.read_Bps / 1e6:.0f} MB/s + {1e3 * cost.miss_s:.3f} ms "
          f"per miss, + {1e3 * cost.first_read_extra_s:.3f} ms for a read after compute, resident step {1e3 * cost.layer_s:.3f} ms/layer, cache bookkeeping "
          f"{1e3 * cost.route_s:.3f} ms/layer (" + ", ".join(
              f"{pol} {1e3 * r:.3f}" for pol, r in cost.route_by_policy) +
          f"), hint {1e3 * cost.hint_s:.3f} ms, a prefetch read takes "
          f"{1e3 * cost.prefetch_cpu_s:.3f} ms from the engine). Compared: steady "
          f"tok/s (each run without its slowest 10% of steps, median of runs), both sides alike")
    print(f"{'contender':16s} {'measured':>9s} {'projected':>10s} {'error':>7s} "
          f"{'(all steps: meas.':>18s} {'proj.)':>7s} {'hit meas.':>9s} {'hit proj.':>9s} "
          f"{'MB/tok m.':>9s} {'MB/tok p.':>9s}")
    rows = []
    for name, m in measured.items():
        p = projected.get(name)
        if p is None:
            continue
        ms, ps = m.get("tok_s_steady", m["tok_s"]), p.get("tok_s_steady", p["tok_s"])
        err = ps / ms - 1
        rows.append({"contender": name, "measured_tok_s": ms, "projected_tok_s": ps, "error": err,
                     "probe": name in PROBES,
                     "measured_tok_s_all_steps": m["tok_s"], "projected_tok_s_all_steps": p["tok_s"]})
        print(f"{name:16s} {ms:9.1f} {ps:10.1f} {100 * err:+6.1f}% {m['tok_s']:18.1f} "
              f"{p['tok_s']:7.1f} {_f(m.get('exact_hit_rate'), '9.3f')} "
              f"{_f(p.get('exact_hit_rate'), '9.3f')} {(m.get('bytes_per_token') or 0) / 1e6:9.3f} "
              f"{(p.get('bytes_per_token') or 0) / 1e6:9.3f}")
    tested = [r for r in rows if not r["probe"]]
    worst = max(tested, key=lambda r: abs(r["error"]))
    within = sum(abs(r["error"]) <= 0.15 for r in tested)
    print(f"projection error of the contenders (the probes set the costs): {within} of "
          f"{len(tested)} within 15%; largest {100 * worst['error']:+.1f}% ({worst['contender']})")
    return rows


def print_devices(dev: dict) -> None:
    for cfg, per_shape in dev.items():
        for sname, d in per_shape.items():
            t = d["table"]
            print(f"\nPROJECTED {cfg}, {sname}: edgert = " + "; ".join(
                f"{b} {describe(e)}" for b, e in d["edgert"].items())
                + f" (the analytic rule says prefetch pays: {d['prefetch_pays']})")
            print(f"{'contender':16s} {'tok/s':>8s} {'exact':>6s} {'effect.':>7s} {'MB/tok':>8s} "
                  f"{'stall ms':>9s} {'vs LRU':>7s}")
            for name, a in t.items():
                lru = t.get(name.split(" ")[0] + " lru")
                ratio = a["tok_s"] / lru["tok_s"] if lru and "%" in name else None
                print(f"{name:16s} {a['tok_s']:8.2f} {_f(a.get('exact_hit_rate'), '6.3f')} "
                      f"{_f(a.get('effective_hit_rate'), '7.3f')} "
                      f"{(a.get('bytes_per_token') or 0) / 1e6:8.1f} "
                      f"{1e3 * (a.get('stall_per_token_s') or 0):9.1f} {_f(ratio, '6.2f')}x")
            if "own" in d:
                print_own(cfg, sname, d["own"])


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
            for label, style in (("lru", ":"), ("edgert", "-"), ("lossy 0.4", "--")):
                ys = [t[f"{b}% {label}"]["tok_s"] for b in bs if f"{b}% {label}" in t]
                if ys:
                    ax.plot(bs[:len(ys)], ys, style, color=c, marker="o", ms=3,
                            label=f"{cfg} {label}" if sname == shapes[0] else None)
            ax.axhline(t["resident"]["tok_s"], color=c, lw=0.6, alpha=0.5)
        ax.set(xlabel="expert budget, % of all experts", ylabel="decode tok/s (PROJECTED)",
               title=sname, yscale="log")
    fig.legend(fontsize=6, loc="lower center", ncol=5)
    fig.suptitle("edgert bench moe: projected decode speed per device config "
                 "(dotted LRU, solid edgert exact, dashed lossy 0.4; thin: all resident)", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    save(fig, path)


def describe(spec: dict) -> str:
    return (f"{spec['policy']}{spec.get('options') or ''}"
            f"{' + shared slots' if spec.get('share') else ''}"
            f"{' + prefetch' if spec.get('prefetch') else ''}")


def _f(x, spec):
    return "-" if x is None else format(x, spec)
