"""`edgert bench NAME`: benchmarks that print a table, write JSON and plot (BENCHMARKS.md)."""
from __future__ import annotations

BENCHES = ("edgert.cli.bench.switch", "edgert.cli.bench.moe",  # each adds its own subcommand
           "edgert.cli.bench.kv",
           "edgert.cli.bench.control", "edgert.cli.bench.soak", "edgert.cli.bench.fleet",
           "edgert.cli.bench.contention", "edgert.cli.bench.update")


def register(sub) -> None:
    from .. import register_modules
    p = sub.add_parser("bench", help="measure edgert against named baselines")
    register_modules(p.add_subparsers(dest="bench", required=True), BENCHES)
