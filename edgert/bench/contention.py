"""`edgert bench contention`: edgert beside other busy processes on the same CPU.

Workloads: MoE decode (tokens/s of one-token steps, every expert resident) and task
inference (p50/p99 of one task's steady runs, pre-packed session), each alone, beside 1 and
2 busy processes (``python -c "while True: pass"``, started and always killed here) and
beside a second edgert process running the same workload. Two thread policies, alternated
in one run: edgert's (``decode_threads`` for small torch steps, the pre-packed ORT session
spinning ``SPIN_US`` only) and the one before it (every torch step on ``threads``, ORT's
default spin).

Fair share: edgert is one process among k + 1 runnable ones on n cores, so it is owed at
least n / (k + 1) cores; a workload that uses T threads alone (min(T, n) cores) is then at
most min(T, n) / min(T, n / (k + 1)) times slower. The bench prints that bound beside each
row.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import resolve
from .output import write_json

BUSY = "while True: pass"
PROMPT = b"import os\ndef main():\n    "


def fair_slowdown(threads: int, others: int, cores: int) -> float:
    """The most a workload of ``threads`` threads may slow beside ``others`` busy processes
    on ``cores`` cores, if it gets its process's fair share (module docstring)."""
    used = min(threads, cores)
    return used / min(threads, cores / (others + 1))


@contextmanager
def beside(n_busy: int, edgert_child: list[str] | None = None):
    """``n_busy`` busy processes (and an edgert child running ``edgert bench contention
    --child *edgert_child``, when given) for the duration."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n_busy)]
    try:
        if edgert_child:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edgert", "bench", "contention", "--child", *edgert_child],
                stdout=subprocess.DEVNULL))
            time.sleep(1.5)          # its load and first runs, before we measure
        time.sleep(0.2)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@contextmanager
def policy(name: str):
    """ORT's spin of the pre-packed session under a policy (the config carries the rest)."""
    from ..engines import onnx_engine
    keep = onnx_engine.SPIN_US
    onnx_engine.SPIN_US = keep if name == "edgert" else None
    try:
        yield
    finally:
        onnx_engine.SPIN_US = keep


def decode_tok_s(lm, tokens: int) -> float:
    with lm.sequence() as s:
        logits = s.feed(list(PROMPT))
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits = s.feed([int(np.argmax(logits))])
        return tokens / (time.perf_counter() - t0)


def task_ms(m, x: dict, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        m.run(x)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def _task_input(m) -> dict:
    name, (dtype, shape) = next(iter(m.engine.inputs.items()))
    return {name: np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in shape]).astype(dtype)}


def _load_task(rt, pack: str):
    m = rt.load(pack, prepack="auto")
    x = _task_input(m)
    for _ in range(4):               # the pre-packed session is built after 3 runs
        m.run(x)
    m.wait_prepacked(timeout=60)
    m.run(x)
    return m, x


def _child(work: str, pack: str, config) -> int:
    """A second edgert process: the same workload, over and over, until it is killed."""
    from ..runtime import Runtime
    rt = Runtime(config)
    if work == "moe":
        lm = rt.load(pack, expert_budget=1.0)
        while True:
            decode_tok_s(lm, 64)
    m, x = _load_task(rt, pack)
    while True:
        m.run(x)


def _packs(args) -> tuple[str, str]:
    from ..recipes.tasks import ensure_task_pack
    from .switch import _lm_pack
    tasks = args.tasks
    if tasks is None:
        quick = args.quick and not Path("models/out/tasks.edgepack").exists()
        tag = "-tiny" if quick else ""
        os.makedirs("models/out", exist_ok=True)
        tasks = f"models/out/tasks{tag}.edgepack"
        ensure_task_pack(tasks, f"models/out/tasks{tag}", "tiny" if quick else "demo")
    return tasks, args.moe or _lm_pack(True)


def main(args) -> int:
    if args.child:
        return _child(*args.child, args.config)
    from ..runtime import Runtime
    base = resolve(args.config)
    tasks_pack, moe_pack = _packs(args)
    cores = os.cpu_count() or 1
    tokens, runs, repeats = (48, 40, 2) if args.quick else (128, 150, 3)
    scenarios = [("alone", 0, None), ("1 busy", 1, None), ("2 busy", 2, None),
                 ("edgert beside", 0, "second")]
    configs = {"edgert": base, "before": replace(base, decode_threads=base.threads)}
    print(f"edgert bench contention{' --quick' if args.quick else ''}: config {base.name} "
          f"(threads {base.threads}, decode_threads {base.decode_threads}), {cores} CPUs; "
          f"moe {moe_pack}, tasks {tasks_pack}; {tokens} decode tokens x {repeats}, "
          f"{runs} task runs\nload average before: "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])} (other processes make "
          "every figure noisier)")
    result = {"config": base.name, "quick": args.quick, "cores": cores, "rows": []}
    for label, k, second in scenarios:
        for pol, cfg in configs.items():
            with policy(pol):
                rt = Runtime(cfg)
                lm = rt.load(moe_pack, expert_budget=1.0)
                decode_tok_s(lm, 8)
                m, x = _load_task(rt, tasks_pack)
                cfg_arg = ["--config", args.config] if args.config else []
                moe_child = ["moe", moe_pack, *cfg_arg] if second else None
                with beside(k, moe_child):
                    tok = [decode_tok_s(lm, tokens) for _ in range(repeats)]
                task_child = ["task", tasks_pack, *cfg_arg] if second else None
                with beside(k, task_child):
                    ms = task_ms(m, x, runs)
                rt.close()
            others = k + (1 if second else 0)
            row = {"scenario": label, "policy": pol, "others": others,
                   "moe_tok_s": float(np.median(tok)), "moe_repeats": tok,
                   "task_p50_ms": float(np.percentile(ms, 50)),
                   "task_p99_ms": float(np.percentile(ms, 99)), "task_ms": ms,
                   "fair_moe": fair_slowdown(cfg.decode_threads, others, cores),
                   "fair_task": fair_slowdown(cfg.threads, others, cores)}
            result["rows"].append(row)
    _report(result["rows"])
    write_json(result, args.json)
    return 0


def _report(rows: list[dict]) -> None:
    alone = {r["policy"]: r for r in rows if r["scenario"] == "alone"}
    print(f"\n{'beside':14s} {'policy':7s} {'MoE tok/s':>10s} {'x alone':>8s} {'fair >=':>8s} "
          f"{'task p50':>9s} {'p99':>8s} {'x alone':>8s} {'fair <=':>8s}")
    for r in rows:
        a = alone[r["policy"]]
        print(f"{r['scenario']:14s} {r['policy']:7s} {r['moe_tok_s']:10.0f} "
              f"{r['moe_tok_s'] / a['moe_tok_s']:7.2f}x {1 / r['fair_moe']:7.2f}x "
              f"{r['task_p50_ms']:6.2f} ms {r['task_p99_ms']:5.1f} ms "
              f"{r['task_p50_ms'] / a['task_p50_ms']:7.2f}x {r['fair_task']:7.2f}x")
    print("x alone: against the same policy alone in this run; fair: the fair-share bound "
          "(edgert owed n/(k+1) of n cores beside k other processes); 'before': every torch "
          f"step on `threads`, ORT's default spin. Alone, edgert vs before: MoE "
          f"{alone['edgert']['moe_tok_s'] / alone['before']['moe_tok_s']:.2f}x tok/s, task "
          f"p50 {alone['edgert']['task_p50_ms'] / alone['before']['task_p50_ms']:.2f}x")
