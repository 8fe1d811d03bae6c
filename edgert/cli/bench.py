"""`edgert bench NAME`: benchmarks that print a table, write JSON and plot (BENCHMARKS.md)."""
from __future__ import annotations

BENCHES = ("edgert.bench.switch", "edgert.bench.moe",  # each adds its own subcommand
           "edgert.bench.kv",
           "edgert.bench.control", "edgert.bench.soak", "edgert.bench.fleet",
           "edgert.bench.contention")


def register(sub) -> None:
    from .arguments import register_modules
    p = sub.add_parser("bench", help="measure edgert against named baselines")
    register_modules(p.add_subparsers(dest="bench", required=True), BENCHES)
