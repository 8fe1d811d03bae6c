"""The `edgert` command. Each feature module adds its subcommands with register()."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import EdgertError

# module -> registers these top-level commands
COMMAND_MODULES = (
    "edgert.cli.pack",      # pack, verify, inspect
    "edgert.cli.tasks",     # run, demo
    "edgert.cli.generate",  # generate
    "edgert.cli.bench",     # bench switch | moe
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgert", description="edgert: an inference runtime "
                                     "for Jetson-class edge devices")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    register_modules(parser.add_subparsers(dest="command", required=True), COMMAND_MODULES)
    return parser


def register_modules(sub, modules) -> None:
    """Let each module that is present add its subcommands to ``sub``."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:   # the module exists but one of its imports is missing
                raise
            continue
        module.register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EdgertError as e:
        print(f"edgert {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
