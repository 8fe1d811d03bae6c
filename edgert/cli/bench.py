"""`edgert bench NAME`: the command line of the benchmarks that print a table, write JSON and
plot (BENCHMARKS.md). The options of each are declared here; its code is in edgert/bench/
and is imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
from functools import partial

TASKS_PACK = "models/out/tasks.edgepack"     # the demo's task pack (tools/demo.sh)


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure edgert against named baselines")
    benches = p.add_subparsers(dest="bench", required=True)
    for add in (_switch, _moe, _moe_step, _kv, _control, _soak, _fleet, _contention, _update):
        add(benches)


def _run(module: str, args) -> int:
    """A benchmark's ``main(args)``, its module imported only now."""
    return importlib.import_module(module).main(args)


def _switch(sub) -> None:
    p = sub.add_parser("switch", help="task-switch latency vs a fresh ORT session and others")
    p.add_argument("--quick", action="store_true", help="fewer repeats; under a minute; no plot")
    p.add_argument("--json", metavar="OUT", help="write raw per-repeat figures here")
    p.add_argument("--config", help="device config YAML (default: cpu-dev)")
    p.add_argument("--pack", default="models/out/tasks.edgepack")
    p.add_argument("--models", default="models/out/tasks")
    p.add_argument("--plot", default="docs/img/bench-switch.png")
    p.add_argument("--pruned-only", action="store_true",
                   help="only the sparse rows: dense vs pruned independently vs jointly, "
                        "by activation and by norm importance")
    p.add_argument("--quant-only", action="store_true",
                   help="only the low-bit rows: the task pack float vs quantized by ONNX "
                        "Runtime (int8, int4), bytes per switch and latency")
    p.set_defaults(func=partial(_run, "edgert.bench.switch"))


def _moe(sub) -> None:
    p = sub.add_parser("moe", help="MoE decode under expert budgets vs LRU, on-demand, resident")
    p.add_argument("--quick", action="store_true", help="tiny model, one repeat; under a minute")
    p.add_argument("--json", metavar="OUT", help="write raw per-repeat figures here")
    p.add_argument("--config", help="device config YAML (default: cpu-dev)")
    p.add_argument("--model", help="HF checkpoint dir (default models/out/moe-fine, or "
                   "moe-fine-tiny with --quick; trained by edgert/recipes/moe.py --shape fine)")
    p.add_argument("--tokens", type=int, help="decode steps per run")
    p.add_argument("--repeats", type=int)
    p.add_argument("--prefetch-min-prob", type=float, default=0.2,
                   help="edgert prefetches hinted experts with at least this probability")
    p.add_argument("--plot", default="docs/img/bench-moe.png")
    p.add_argument("--plot-projection", default="docs/img/bench-moe-projection.png")
    p.add_argument("--only", metavar="NAMES",
                   help="comma-separated contenders to measure (e.g. 'resident,min lru,25%% lru'); "
                        "the probes among them set the costs")
    p.add_argument("--reproject", metavar="JSON",
                   help="keep the measured figures of an earlier run's JSON (same model, "
                        "--tokens, --repeats) and redo only the traces and projections")
    p.add_argument("--peer", choices=["llama.cpp"],
                   help="instead of the contenders: edgert against llama.cpp on the same model "
                        "(GGUF f32/Q8_0/Q4_0 vs exact/int8/int4), resident and both in a memory "
                        "cgroup limited to edgert's 25%% run (bench/moe_peer.py; llama.cpp's "
                        "side needs the 'peers' extra, edgert's runs without it)")
    p.set_defaults(func=partial(_run, "edgert.bench.moe"))


def _kv(sub) -> None:
    p = sub.add_parser("kv", help="prefix cache: TTFT from each tier vs recompute; TPOT vs "
                                  "context")
    p.add_argument("--quick", action="store_true", help="one repeat, two contexts, no plot")
    p.add_argument("--json", metavar="OUT", help="write raw per-repeat figures here")
    p.add_argument("--config", help="device config YAML (default: cpu-dev)")
    p.add_argument("--model", default="models/out/moe-demo",
                   help="HF checkpoint dir of the trained demo model")
    p.add_argument("--repeats", type=int)
    p.add_argument("--dir", help="disk tier directory (default: a temporary one)")
    p.add_argument("--plot", default="docs/img/bench-kv.png")
    p.add_argument("--child", help=argparse.SUPPRESS)     # the fresh process of a repeat
    p.set_defaults(func=partial(_run, "edgert.bench.kv"))


def _control(sub) -> None:
    p = sub.add_parser("control", help="device service round trips and overhead vs in-process")
    p.add_argument("--quick", action="store_true", help="short runs, one repeat; under a minute")
    p.add_argument("--json", metavar="OUT", help="write raw per-repeat figures here")
    p.add_argument("--config", help="device config (default: cpu-dev)")
    p.add_argument("--tasks", default=TASKS_PACK, metavar="PACK")
    p.add_argument("--moe", metavar="PACK", help="MoE pack (default: the demo's)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="the config's compute threads, for both sides (e.g. 1 on 2 cores: a "
                        "core left for the service's sockets)")
    p.add_argument("--plot", default="docs/img/bench-control.png")
    p.set_defaults(func=partial(_run, "edgert.bench.control"))


def _soak(sub) -> None:
    p = sub.add_parser("soak", help="the device service under load, faults and hostile callers")
    p.add_argument("--quick", action="store_true", help="4 clients x 50 requests; under a minute")
    p.add_argument("--json", metavar="OUT", help="write raw figures here")
    p.add_argument("--config", help="device config (default: cpu-dev)")
    p.add_argument("--tasks", default=TASKS_PACK, metavar="PACK")
    p.add_argument("--moe", metavar="PACK", help="MoE pack (default: the demo's)")
    p.add_argument("--clients", type=int, metavar="N", help="soak clients (default 8; quick 4)")
    p.add_argument("--requests", type=int, metavar="M",
                   help="requests per client per round (default 500; quick 50)")
    p.add_argument("--plot", default="docs/img/bench-soak.png")
    p.set_defaults(func=partial(_run, "edgert.bench.soak"))


def _fleet(sub) -> None:
    p = sub.add_parser("fleet", help="fleet server: prewarm prediction, KV sharing, ops/s")
    p.add_argument("--quick", action="store_true", help="fewer devices, days and seconds")
    p.add_argument("--json", metavar="OUT", help="write the figures here")
    p.add_argument("--pack", default="models/out/tasks.edgepack", help="a task pack")
    p.add_argument("--moe-pack", default="models/out/moe-demo.edgepack",
                   help="an MoE pack for the KV-sharing figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="docs/img/bench-fleet.png")
    p.add_argument("--skip", action="append", default=[], choices=("predict", "kv", "ops"),
                   help="leave a part out")
    p.set_defaults(func=partial(_run, "edgert.bench.fleet"))


def _moe_step(sub) -> None:
    p = sub.add_parser("moe-step", help="MoE decode step: before issue 22, fused, compiled")
    p.add_argument("--pack", default="models/out/moe-demo.edgepack",
                   help="an MoE pack (default: the demo model's)")
    p.add_argument("--config", help="device config (default: cpu-dev)")
    p.add_argument("--quick", action="store_true", help="32 steps, one repeat, no compile")
    p.add_argument("--tokens", type=int, help="decode steps per run (default 128)")
    p.add_argument("--repeats", type=int, help="default 3")
    p.add_argument("--budgets", default="1.0,0.5", help="expert budgets (fractions)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--json", metavar="OUT", help="write the raw figures here")
    p.set_defaults(func=partial(_run, "edgert.bench.moe_step"))


def _contention(sub) -> None:
    p = sub.add_parser("contention", help="MoE decode and task latency beside busy processes")
    p.add_argument("--quick", action="store_true", help="fewer tokens and runs; ~1 minute")
    p.add_argument("--json", metavar="OUT", help="write the raw figures here")
    p.add_argument("--config", help="device config (default: cpu-dev)")
    p.add_argument("--tasks", help="an onnx-tasks pack (default: the demo's, built if missing; "
                                   "--quick: its tiny variant unless the demo pack exists)")
    p.add_argument("--moe", help="an MoE pack (default: the demo's model when trained, else "
                                 "the recipe's quick model)")
    p.add_argument("--child", nargs=2, metavar=("WORK", "PACK"), help=argparse.SUPPRESS)
    p.set_defaults(func=partial(_run, "edgert.bench.contention"))


def _update(sub) -> None:
    p = sub.add_parser("update", help="signed differential pack updates: bytes moved vs "
                       "blocks changed, update time, serving latency during an update")
    p.add_argument("--models", default="models/out/tasks", help="the demo task models "
                   "(built there by the recipe when missing)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and windows")
    p.add_argument("--json", metavar="OUT", help="write the figures here")
    p.add_argument("--server-nice", type=int, default=19, metavar="N",
                   help="nice value of the server process (default 19: on a fleet it runs "
                   "on another machine; here it should take only CPU the device leaves)")
    p.set_defaults(func=partial(_run, "edgert.bench.update"))
