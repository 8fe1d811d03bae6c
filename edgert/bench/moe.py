"""`edgert bench moe`: decode speed and quality of the demo MoE under expert budgets,
measured on this machine and projected for every device config (moe_projection.py).

Model: the fine-grained benchmark MoE (edgert/recipes/moe.py --shape fine: 8 layers of 64
experts, top-8; --quick: its tiny variant). Workload: held-out text (models/out/moe/heldout.txt, files never trained on). Each run
prefills a 64-byte prompt (untimed, it fills the cache), then decodes the next N bytes with
teacher forcing: one token per step through the expert-cache path, exactly the work of a
generation step, while the true next byte gives perplexity and the all-resident model's
logits on the same step give KL. Experts are read cold: O_DIRECT (when the filesystem
refuses it: buffered reads with the pack's pages dropped by POSIX_FADV_DONTNEED before each
run; the JSON says which).

Contenders, alternated within each repeat (the starting one rotates):
  resident     every expert in the arena (the 100% upper bound, no reads while decoding)
  on-demand    no cache: every expert a step uses is read, used and dropped
  lru          per-layer LRU over the budget's slots, no prefetch (mixtral-offloading's policy)
  lfu, gate    the other policies without prefetch; belady: offline optimal on this run's own
               trace (a bound on hit rate, not a deployable policy)
  stale        least-stale eviction (policies.py)
  edgert       the exact configuration the cost model picks for this machine (moe_projection
               .choose: best projected policy on a calibration text; prefetch of hinted experts
               with p >= --prefetch-min-prob (0.2) + read-ahead where it pays)
  lossy a      edgert + substitution at alpha a (0.3, 0.4, 0.5)
  100% lru, 100% hints   probes for the cost model: the cache's bookkeeping with no misses,
               and the same with a prefetch hint at every layer
  100% lfu, 100% gate, 100% stale   probes: each policy's own bookkeeping with no misses
  min lru      probe: top-k slots per layer, nearly every expert a miss (a miss's CPU cost)
  min ahead    probe: the same with read-ahead (what a prefetch read costs the engine here)
  int8, int4   LRU over the experts' int8 / int4 copies in the same bytes as the budget's
               exact slots (more experts fit, a miss reads fewer bytes; moe_lowbit.py)
  mixed        precision="mixed": the top band of each token's experts at full precision,
               the rest from int4 copies, two LRU caches in the same bytes
Budgets: 25/50/75% of all experts, plus 100%. Every contender is also projected from its
segment's routing trace with this machine's measured costs; the error is reported.
Physical limits measured in the same run: O_DIRECT read bandwidth (bytes per token / bandwidth
is the I/O floor of a contender) and the resident TPOT (the compute floor).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..config import DeviceConfig, resolve, shipped
from ..stats import summary
from . import moe_lowbit as L
from . import moe_projection as P
from .output import pyplot, save, write_json

PROMPT = 64
BUDGETS = (0.25, 0.5, 0.75, 1.0)
ALPHAS = (0.3, 0.4, 0.5)


# --- the model and its pack --------------------------------------------------------------------
def ensure_model(model: Path, quick: bool) -> None:
    if (model / "config.json").exists() and (model / "heldout.txt").exists():
        return
    cmd = [sys.executable, "-m", "edgert.recipes.moe", "--shape", "fine", "--out", str(model)] + \
        (["--quick"] if quick else [])
    print(f"no trained model at {model}: running {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)


def ensure_pack(model: Path) -> Path:
    pack = model / "model.edgepack"
    src = max(p.stat().st_mtime for p in model.glob("*.safetensors"))
    if not pack.exists() or pack.stat().st_mtime < src:
        from ..pack.hf_import import pack_hf
        pack_hf(str(model), str(pack), progress=False)
    return pack


class OnDemandExperts:
    """No cache: each acquire reads its experts into `top_k` arena slots; release drops them."""

    prefetch = False   # it would ignore hints: the engine does not compute them

    def __init__(self, reader, arena):
        from ..experts.api import ExpertLayout
        from ..memory import SlotPool
        self.layout = ExpertLayout.from_reader(reader)
        self.reader = reader
        self.pool = SlotPool(arena, "bench: on-demand experts", self.layout.slot_bytes)
        self.max_acquire = self.layout.top_k
        self._slots = self.pool.alloc(self.max_acquire)
        self.loads = self.bytes_read = 0
        self.stall_s = 0.0

    def route(self, layer, probs, topk_idx):
        return topk_idx

    def acquire(self, layer, expert_ids):
        t0, out = time.perf_counter(), {}
        for slot, e in zip(self._slots, expert_ids):
            idx = self.layout.block(layer, int(e))
            view = self.pool.view(slot)
            self.reader.read_into([idx], [view])          # the pack's verified read path
            out[int(e)] = self.layout.views(view)
            self.loads += 1
            self.bytes_read += self.reader.blocks[idx].length
        self.stall_s += time.perf_counter() - t0
        return out

    def release(self, layer, expert_ids):
        pass

    def hint(self, layer, probs):
        pass

    def reset_stats(self):
        self.loads = self.bytes_read = 0
        self.stall_s = 0.0

    def stats(self):
        return {"total": {"exact_hit_rate": 0.0, "effective_hit_rate": 0.0, "loads": self.loads,
                          "bytes_read": self.bytes_read, "stall_s": self.stall_s}}

    def close(self):
        self.pool.close()


# --- one run ---------------------------------------------------------------------------------
def make_provider(rt, pack, spec: dict):
    from ..experts.api import ExpertLayout, ResidentExperts
    from ..experts.api import slots_for_budget
    from ..experts.cache import ExpertCache
    from ..pack import PackReader
    reader = PackReader(pack, read_mode=rt.config.storage.read_mode)
    if spec["kind"] == "resident":
        return ResidentExperts(reader, rt.arena, "bench: resident experts")
    if spec["kind"] == "record":
        from ..projection.trace import TraceRecorder
        res = ResidentExperts(reader, rt.arena, "bench: resident experts")
        return TraceRecorder(res, res.layout.moe_layers)
    if reader.storage.mode != "direct":
        reader.storage.drop_cache()
    if spec["kind"] == "on-demand":
        return OnDemandExperts(reader, rt.arena)
    lay = ExpertLayout.from_reader(reader)
    slots = slots_for_budget(spec["budget"], len(lay.table), lay.extent_bytes, rt.arena.mapped)
    quota = spec.get("quota")
    return ExpertCache(reader, rt.arena, "bench: expert slots", slots, policy=spec["policy"],
                       policy_options=spec.get("options"), lossy_alpha=spec.get("alpha", 0.0),
                       prefetch=spec.get("prefetch", False), record_trace=spec.get("trace", False),
                       prefetch_min_prob=spec.get("min_prob", 0.2),
                       hint_probe=spec.get("hint_probe", (256, 1024)), quota=quota)


def decode_run(rt, pack, spec: dict, ids: list[int], ref: np.ndarray | None) -> dict:
    """Prefill PROMPT ids, then teacher-forced decode steps over the rest; figures of the steps."""
    import torch
    # NOTE: no prefix cache: every run prefills for real (a cached prompt would skip the
    # prefill's routing and start the expert cache cold, and only after the first run)
    if spec["kind"] in ("lowbit", "mixed"):
        lm, provider = L.load(rt, spec)
    else:
        provider = make_provider(rt, pack, spec)
        lm = rt.load(pack, provider=provider, prefix_cache=False)
    seq = lm.sequence()
    try:
        seq.feed(ids[:PROMPT])
        if hasattr(provider, "drain"):
            provider.drain()
        if hasattr(provider, "reset_stats"):
            provider.reset_stats()
        steps, logits = [], []
        for t in range(PROMPT, len(ids) - 1):
            t0 = time.perf_counter()
            out = seq.feed([ids[t]])
            steps.append(time.perf_counter() - t0)
            logits.append(torch.from_numpy(out))
        st = provider.stats()
    finally:
        seq.close()
        lm.close()
        if hasattr(provider, "drain"):
            provider.drain()
        trace = provider.trace() if spec.get("trace") or spec["kind"] == "record" else None
        provider.close()
    lg = torch.log_softmax(torch.stack(logits), dim=-1)                     # [N, V]
    target = torch.tensor(ids[PROMPT + 1:])
    nll = -lg.gather(1, target[:, None])[:, 0]
    res = {"tpot_s": steps, "nll": nll.tolist(), "stats": st.get("total", st),
           "low_precision_share": st.get("low_precision_share")}
    if ref is not None:
        p_ref = torch.from_numpy(ref)
        res["kl"] = (p_ref.exp() * (p_ref - lg)).sum(-1).clamp_min(0).tolist()
        res["max_abs_logprob_diff"] = float((p_ref - lg).abs().max())
        res["greedy_agreement"] = float((p_ref.argmax(-1) == lg.argmax(-1)).float().mean())
    res["logprobs"] = lg.numpy()
    res["trace"] = trace
    return res


def record(rt, pack, ids: list[int]):
    """The routing trace of decoding `ids` (prefill, then teacher-forced steps)."""
    return decode_run(rt, pack, {"kind": "record"}, ids, None)["trace"]


def probe_spec(name: str, min_budget: float = 0.125) -> dict:
    """The cost model's probes: a cache holding every expert, without and with hints; one
    with top-k slots per layer (`min_budget`: nearly every expert a step uses is a miss)."""
    spec = {"kind": "cache", "budget": 1.0, "policy": "lru"}
    if name == "min lru":
        return {**spec, "budget": min_budget}
    if name == P.AHEAD_PROBE:                   # the same with read-ahead (no hinted reads)
        return {**spec, "budget": min_budget, "prefetch": True, "hint_probe": None,
                "min_prob": 1.01}
    policy = name.removeprefix("100% ")
    if policy in P.POLICY_PROBES:               # one policy's own bookkeeping, no misses
        return {**spec, "policy": policy, "options": dict(P.EXACT)[policy]}
    return spec if name == "100% lru" else {**spec, "prefetch": True, "hint_probe": None,
                                            "min_prob": 1.01}


def measure_read_bandwidth(rt, pack, repeats: int = 3) -> dict:
    from ..experts.api import ExpertLayout
    from ..memory import SlotPool
    from ..pack import PackReader
    reader = PackReader(pack, read_mode=rt.config.storage.read_mode)
    storage = reader.storage
    lay = ExpertLayout.from_reader(reader)
    pool = SlotPool(rt.arena, "bench: read bandwidth", lay.slot_bytes)
    slot = pool.alloc(1)[0]
    best = 0.0
    try:
        order = sorted(lay.table.values())
        np.random.default_rng(0).shuffle(order)       # experts in no order, as misses read them
        for _ in range(repeats):
            if storage.mode != "direct":
                storage.drop_cache()
            t0, n = time.perf_counter(), 0
            for idx in order:                          # one expert per read, as a miss reads
                reader.read_into([idx], [pool.view(slot)])
                n += reader.blocks[idx].length
            best = max(best, n / (time.perf_counter() - t0))
    finally:
        pool.close()
        reader.close()
    return {"read_Bps": best, "read_mode": storage.mode, "extent_bytes": lay.extent_bytes,
            "experts": len(lay.table), "top_k": lay.top_k, "layers": len(lay.moe_layers)}


# --- the benchmark ---------------------------------------------------------------------------
def probes(min_budget: float) -> list[tuple[str, dict]]:
    """The contenders that set this machine's costs (moe_projection.PROBES), with specs."""
    return [("resident", {"kind": "resident"}), ("on-demand", {"kind": "on-demand"}),
            *((n, probe_spec(n, min_budget)) for n in P.PROBES[2:])]


def contenders(edgert: dict, budgets, full: bool, min_budget: float) -> list[tuple[str, dict]]:
    out = probes(min_budget)
    for b in budgets:
        if b >= 1.0:
            continue
        tag = f"{round(100 * b)}%"
        cache = {"kind": "cache", "budget": b}
        out.append((f"{tag} lru", {**cache, "policy": "lru"}))
        if full and b <= 0.5:
            out += [(f"{tag} lfu", {**cache, "policy": "lfu"}),
                    (f"{tag} gate", {**cache, "policy": "gate", "options": dict(P.EXACT)["gate"]}),
                    (f"{tag} stale", {**cache, "policy": "stale"}),
                    (f"{tag} belady", {**cache, "policy": "belady"})]
        e = edgert[b]
        out.append((f"{tag} edgert", e))
        out += [(f"{tag} lossy {a}", {**e, "alpha": a})
                for a in (ALPHAS if full and b <= 0.5 else ALPHAS[1:2])]
    return out


def main(args) -> int:
    import torch

    from .. import Runtime
    cfg = resolve(args.config)
    quick = args.quick
    model = Path(args.model or ("models/out/moe-fine-tiny" if quick else "models/out/moe-fine"))
    budgets = (0.5, 1.0) if quick else BUDGETS
    # mistakes in the arguments are named before minutes of training or measuring
    previous = _load_result(args.reproject) if args.reproject else None
    if args.only:
        _only(args.only, contenders({b: {} for b in budgets}, budgets, not quick, 0.0)
              + L.contenders(budgets, {"int8": "", "mixed": ""}))
    ensure_model(model, quick)
    pack = str(ensure_pack(model))
    low_packs = L.ensure_packs(model)
    text = (model / "heldout.txt").read_bytes()
    n_tok = args.tokens or (24 if quick else 192)
    repeats = args.repeats or (1 if quick else 3)
    if args.peer:
        from .moe_peer import run_peer
        print(f"edgert bench moe --peer {args.peer}: {model}, {repeats} x {n_tok} greedy decode "
              f"steps after a {PROMPT}-byte prompt, {cfg.threads} threads for a prompt and "
              f"{cfg.decode_threads} for a decode step each side", flush=True)
        write_json({"peer": args.peer, "model": str(model), "tokens": n_tok,
                    "result": run_peer(model, pack, low_packs, args.config, cfg.threads,
                                       cfg.decode_threads, list(text[:PROMPT]), n_tok,
                                       repeats)}, args.json)
        return 0
    rt = Runtime(cfg)
    torch.set_num_threads(cfg.threads)
    span = PROMPT + n_tok + 1
    calib_ids = list(text[-span:])                       # calibration: the end of the held-out text
    step = (len(text) - 2 * span) // repeats            # evaluation segments spread over the text
    segments = [list(text[i * step:i * step + span]) for i in range(repeats)]
    limits = measure_read_bandwidth(rt, pack)
    print(f"edgert bench moe{' --quick' if quick else ''}: {model}, {limits['layers']} layers x "
          f"{limits['experts'] // limits['layers']} experts (top-{limits['top_k']}), expert "
          f"{limits['extent_bytes'] / 1e3:.0f} kB; reads {limits['read_mode']} "
          f"{limits['read_Bps'] / 1e6:.0f} MB/s; {repeats} x {n_tok} decode steps", flush=True)
    # routing traces (every expert resident, hints on) and this machine's cost model
    calib_trace = record(rt, pack, calib_ids)
    seg_traces = [record(rt, pack, ids) for ids in segments]
    lay, model_cfg = _layout(pack), json.loads((model / "config.json").read_text())
    shape = P.trained_shape(lay, model_cfg)
    if previous is not None:
        return _reproject(args, previous, pack, model, cfg, quick, budgets, calib_trace,
                          seg_traces, lay, model_cfg, shape)
    min_budget = lay.top_k / lay.num_experts
    measured_probes = {name: _summary(decode_run(rt, pack, spec, calib_ids, None) |
                                      {"kl": [0.0], "max_abs_logprob_diff": 0.0})
                       for name, spec in probes(min_budget)}
    pre_cost = P.fit_costs(P.calibrated_cost(measured_probes, limits, shape), measured_probes,
                           [calib_trace], shape, probe_spec(P.AHEAD_PROBE, min_budget))
    P.register_calibration(shape, calib_trace)
    edgert = P.choose_all(calib_trace, shape, pre_cost, budgets, args.prefetch_min_prob)
    print("edgert here (chosen by the cost model on the calibration text): " + "; ".join(
        f"{round(100 * b)}% {P.describe(e)}" for b, e in edgert.items()), flush=True)
    cs = contenders(edgert, budgets, not quick, lay.top_k / lay.num_experts) + \
        L.contenders(budgets, low_packs)
    if args.only:
        keep = _only(args.only, cs)
        cs = [c for c in cs if c[0] in keep]
    decode_run(rt, pack, cs[0][1], segments[0], None)             # warm up once
    raw = {name: [] for name, _ in cs}
    for r, ids in enumerate(segments):
        ref = decode_run(rt, pack, {"kind": "resident"}, ids, None)["logprobs"]
        order = cs[r % len(cs):] + cs[:r % len(cs)]
        for name, spec in order:
            if spec.get("policy") == "belady":
                spec = {**spec, "options": {"future": P.belady_future(seg_traces[r])}}
            if spec.get("share"):
                spec = {**spec, "quota": P.share_for(calib_trace, shape,
                                                     P.slots_of(spec["budget"], shape), spec)}
            res = decode_run(rt, pack, spec, ids, ref)
            raw[name].append(_summary(res))
        print(f"repeat {r + 1}/{repeats} done", flush=True)
    table = {name: _aggregate(runs) for name, runs in raw.items()}
    result = {"config": cfg.name, "quick": quick, "model": str(model), "limits": limits,
              "edgert": {f"{round(100 * b)}%": P._spec_json(e) for b, e in edgert.items()},
              "prefetch_min_prob": args.prefetch_min_prob,
              "tokens_per_run": n_tok, "prompt": PROMPT, "repeats": repeats,
              "table": table, "raw": raw}
    return _project_and_report(args, result, cs, cfg, quick, calib_trace, seg_traces, lay,
                               model_cfg, shape)


def _only(text: str, cs) -> set[str]:
    keep = {n.strip() for n in text.split(",")}
    unknown = keep - {n for n, _ in cs}
    if unknown:
        raise ValueError(f"--only: unknown contenders {sorted(unknown)}; known: "
                         f"{', '.join(n for n, _ in cs)}")
    return keep


def _load_result(path: str) -> dict:
    """A previous run's --json output, for --reproject; ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--reproject {path}: no such file")
    try:
        result = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--reproject {path}: not JSON ({e})") from None
    missing = [k for k in ("table", "limits", "edgert") if not isinstance(result, dict)
               or k not in result]
    if missing:
        raise ValueError(f"--reproject {path}: not the --json output of `edgert bench moe` "
                         f"(no {', '.join(missing)})")
    return result


def _reproject(args, result, pack, model, cfg, quick, budgets, calib_trace, seg_traces,
               lay, model_cfg, shape) -> int:
    try:
        edgert = {b: {**result["edgert"][f"{round(100 * b)}%"], "budget": b}
                  for b in budgets if b < 1.0}
    except KeyError as e:
        raise ValueError(f"--reproject {args.reproject}: no edgert choice for budget {e} "
                         f"(a --quick run's JSON needs --quick)") from None
    cs = contenders(edgert, budgets, not quick, lay.top_k / lay.num_experts)
    P.register_calibration(shape, calib_trace)
    return _project_and_report(args, result, cs, cfg, quick, calib_trace, seg_traces, lay,
                               model_cfg, shape)


def _project_and_report(args, result, cs, cfg, quick, calib_trace, seg_traces, lay,
                        model_cfg, shape) -> int:
    table, limits = result["table"], result["limits"]
    cost = P.fit_costs(P.calibrated_cost(table, limits, shape), table, seg_traces, shape,
                       probe_spec(P.AHEAD_PROBE, lay.top_k / lay.num_experts))
    projected = P.project_measured(seg_traces, calib_trace, shape, cost, cs)
    configs = [DeviceConfig.load(n) for n in shipped() if n != cfg.name]   # this one: measured
    shapes = P.shapes_for(lay, model_cfg, quick)
    budgets_dev = (0.25, 0.5) if quick else P.DEVICE_BUDGETS
    devices = P.project_devices(seg_traces, calib_trace,
                                [c for c in configs if c.name == "jetson-orin-nano-8gb"] if quick
                                else configs, shapes, budgets_dev, ALPHAS, quick)
    result.update(cost_model=dict(cost.__dict__), projected_here=projected,
                  projected_devices=devices)
    _print(result)
    result["calibration_error"] = P.print_calibration(table, projected, cost)
    P.print_devices(devices)
    write_json(result, args.json)
    if not quick:
        _plot(result, args.plot)
        P.plot_devices(devices, args.plot_projection, save, pyplot)
    return 0


def _layout(pack):
    from ..experts.api import ExpertLayout
    from ..pack import PackReader
    reader = PackReader(pack, read_mode="buffered")
    try:
        return ExpertLayout.from_reader(reader)
    finally:
        reader.close()


def _summary(res: dict) -> dict:
    st, steps = res["stats"], np.asarray(res["tpot_s"])
    n = len(steps)
    return {"tok_s": n / steps.sum(), "tpot_s": steps.tolist(), "ppl": float(np.exp(np.mean(res["nll"]))),
            "kl_mean": float(np.mean(res["kl"])), "kl_max": float(np.max(res["kl"])),
            "max_abs_logprob_diff": res["max_abs_logprob_diff"],
            "greedy_agreement": res.get("greedy_agreement"),
            "low_precision_share": res.get("low_precision_share"),
            "exact_hit_rate": st.get("exact_hit_rate"), "effective_hit_rate": st.get("effective_hit_rate"),
            "bytes_per_token": st.get("bytes_read", 0) / n, "stall_per_token_s": st.get("stall_s", 0.0) / n,
            "prefetch_precision": st.get("prefetch_precision"), "prefetch_recall": st.get("prefetch_recall"),
            "substitution_rate": st.get("substitution_rate"),
            # demand reads by what preceded them (compute, or another read): the cost model's
            # first_read_extra_s is the difference of their means in the "min lru" probe
            "first_read_s_mean": _per(st, "first_read_s", "first_reads"),
            "next_read_s_mean": _per(st, "next_read_s", "next_reads"),
            "first_reads_per_token": st.get("first_reads", 0) / n, "stats": st}


def _per(st: dict, total: str, count: str) -> float | None:
    return st[total] / st[count] if st.get(count) else None


def steady_tok_s(tpot_s) -> float:
    """Decode tok/s over a run's steps without its slowest 10%: what the calibration compares
    (measured and projected alike), because on a shared machine other jobs stall whole steps.
    """
    x = np.asarray(tpot_s, dtype=float)
    return float(1.0 / x[x <= np.quantile(x, 0.9)].mean())


def _aggregate(runs: list[dict]) -> dict:
    tps = [r["tok_s"] for r in runs]
    steps = np.concatenate([r["tpot_s"] for r in runs])
    def mean(k):
        xs = [r[k] for r in runs if r.get(k) is not None]
        return float(np.mean(xs)) if xs else None
    tpot = summary(1e3 * steps)
    return {"tok_s": float(np.median(tps)), "tok_s_min": float(min(tps)), "tok_s_max": float(max(tps)),
            "tok_s_steady": float(np.median([steady_tok_s(r["tpot_s"]) for r in runs])),
            "tpot_p50_ms": tpot["p50"], "tpot_p90_ms": tpot["p90"],
            "ppl": float(np.exp(np.mean([np.log(r["ppl"]) for r in runs]))),
            "kl_mean": mean("kl_mean"), "kl_max": float(max(r["kl_max"] for r in runs)),
            "max_abs_logprob_diff": float(max(r["max_abs_logprob_diff"] for r in runs)),
            **{k: mean(k) for k in ("exact_hit_rate", "effective_hit_rate", "bytes_per_token",
                                    "greedy_agreement", "low_precision_share",
                                    "stall_per_token_s", "prefetch_precision", "prefetch_recall",
                                    "first_read_s_mean", "next_read_s_mean",
                                    "first_reads_per_token")}}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _print(res: dict) -> None:
    t, lim = res["table"], res["limits"]
    res_ppl = t["resident"]["ppl"]
    hdr = (f"\n{'contender':16s} {'tok/s':>7s} {'(min-max)':>13s} {'TPOT p50':>9s} {'p90 ms':>7s} "
           f"{'exact':>6s} {'effect.':>7s} {'MB/tok':>7s} {'stall':>7s} {'IO floor':>8s} "
           f"{'ppl':>6s} {'dppl':>6s} "
           f"{'KL/tok':>8s} {'vs LRU':>7s}")
    print(hdr)
    for name, a in t.items():
        lru = t.get(name.split(" ")[0] + " lru")
        ratio = a["tok_s"] / lru["tok_s"] if lru and "%" in name else None
        floor = 1e3 * (a["bytes_per_token"] or 0) / lim["read_Bps"]
        print(f"{name:16s} {a['tok_s']:7.1f} {a['tok_s_min']:6.1f}-{a['tok_s_max']:<6.1f} "
              f"{a['tpot_p50_ms']:9.2f} {a['tpot_p90_ms']:7.2f} {_fmt(a['exact_hit_rate'], '6.3f')} "
              f"{_fmt(a['effective_hit_rate'], '7.3f')} {(a['bytes_per_token'] or 0) / 1e6:7.3f} "
              f"{1e3 * (a['stall_per_token_s'] or 0):5.2f}ms "
              f"{floor:6.2f}ms {a['ppl']:6.3f} {100 * (a['ppl'] / res_ppl - 1):+5.2f}% "
              f"{_fmt(a['kl_mean'], '8.5f')} {_fmt(ratio, '6.2f')}x")
    print(f"\ncompute floor (resident TPOT p50) {t['resident']['tpot_p50_ms']:.2f} ms; IO floor = "
          f"bytes/token / {lim['read_Bps'] / 1e6:.0f} MB/s ({lim['read_mode']} reads, measured)")
    print("targets measured here: edgert exact >= 1.0x LRU at every budget: " + ", ".join(
        f"{b} {t[f'{b} edgert']['tok_s'] / t[f'{b} lru']['tok_s']:.2f}x"
        for b in ("25%", "50%", "75%") if f"{b} edgert" in t and f"{b} lru" in t))
    for b in ("25%", "50%"):
        lossy = [(a, t[f"{b} lossy {a}"]) for a in ALPHAS if f"{b} lossy {a}" in t]
        if lossy:
            print(f"lossy quality at {b} (KL <= 0.02 nats/token, ppl within +1%): " + ", ".join(
                f"alpha {a}: KL {x['kl_mean']:.4f}, ppl {100 * (x['ppl'] / res_ppl - 1):+.2f}%"
                for a, x in lossy))
    for b in ("25%", "50%", "75%"):
        e, l = t.get(f"{b} edgert"), t.get(f"{b} lru")
        if e and l and e["stall_per_token_s"]:
            print(f"{b}: load stall per token, LRU / edgert exact = "
                  f"{l['stall_per_token_s'] / e['stall_per_token_s']:.2f}x; bytes read per token "
                  f"{l['bytes_per_token'] / max(e['bytes_per_token'], 1):.2f}x")
    exact = [n for n in t if n.endswith("edgert") or n.endswith("lru") or n == "on-demand"]
    L.print_summary(t)
    print("exact contenders, max |log-prob - resident|: "
          f"{max(t[n]['max_abs_logprob_diff'] for n in exact):.2e}")


def _plot(res: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    t = res["table"]
    budgets = sorted({int(n.split("%")[0]) for n in t if "%" in n})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in ["lru", "gate", "edgert", *(f"lossy {a}" for a in ALPHAS)]:
        xs = [b for b in budgets if f"{b}% {label}" in t]
        if xs:
            ax1.plot(xs, [t[f"{b}% {label}"]["tok_s"] for b in xs], marker="o", label=label)
            key = "effective_hit_rate" if label.startswith("lossy") else "exact_hit_rate"
            ax2.plot(xs, [t[f"{b}% {label}"][key] for b in xs], marker="o",
                     label=label + (" (effective)" if key.startswith("eff") else ""))
    proj = res.get("projected_here") or {}
    for label, c in (("lru", "C0"), ("edgert", "C2")):
        xs = [b for b in budgets if f"{b}% {label}" in proj]
        if xs:
            ax1.plot(xs, [proj[f"{b}% {label}"]["tok_s"] for b in xs], ls="--", c=c, marker="x",
                     label=f"{label} (PROJECTED)")
    for name, style in (("resident", "--"), ("on-demand", ":")):
        if name in t:
            ax1.axhline(t[name]["tok_s"], ls=style, c="gray", label=name)
    xs = [b for b in budgets if f"{b}% belady" in t]
    if xs:
        ax2.plot(xs, [t[f"{b}% belady"]["exact_hit_rate"] for b in xs], ls="--", c="k",
                 label="belady (bound)")
    ax1.set(xlabel="expert budget, % of all experts", ylabel="decode tokens/s (median)")
    ax2.set(xlabel="expert budget, % of all experts", ylabel="hit rate (exact; lossy: effective)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"edgert bench moe ({res['config']}, {res['limits']['read_mode']} reads)")
    fig.tight_layout()
    save(fig, path)
