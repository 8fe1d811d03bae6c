"""`edgert bench NAME`: benchmarks that print a table, write JSON and plot (BENCHMARKS.md)."""
from __future__ import annotations

import importlib

BENCHES = ("edgert.bench.switch", "edgert.bench.moe")  # each adds its own subcommand


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure edgert against named baselines")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(bsub)
