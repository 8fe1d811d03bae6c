"""The `edgert` command. Each feature module adds its subcommands with register()."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import EdgertError
from .arguments import register_modules

# module -> registers these top-level commands
COMMAND_MODULES = (
    "edgert.cli.configs",   # configs
    "edgert.cli.pack",      # pack, verify, inspect
    "edgert.cli.tasks",     # run, demo
    "edgert.cli.generate",  # generate
    "edgert.cli.bench",     # bench switch | moe
    "edgert.cli.control",   # serve, client, keys
    "edgert.cli.server",    # server
    "edgert.cli.update",    # update
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgert", description="edgert: an inference runtime "
                                     "for Jetson-class edge devices")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also EDGERT_DEBUG=1)")
    register_modules(parser.add_subparsers(dest="command", required=True), COMMAND_MODULES)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    debug = args.debug or os.environ.get("EDGERT_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # `edgert inspect PACK | head`: the reader left
        sys.stderr.close()
        return 0
    except (EdgertError, ValueError, OSError) as e:   # a mistake or a fault the user can fix
        if debug:
            raise
        what = e.strerror + (f": {e.filename}" if e.filename else "") \
            if isinstance(e, OSError) and e.strerror else str(e)
        print(f"edgert {args.command}: {type(e).__name__}: {what}", file=sys.stderr)
        return 2
    except Exception as e:  # NOTE: a bug in edgert; one line, the traceback on request
        if debug:
            raise
        print(f"edgert {args.command}: internal error: {type(e).__name__}: {e} (run with "
              "--debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
