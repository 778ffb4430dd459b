"""The ``caduceus`` command line: ``caduceus <command> ...``.

Each command lives in its own module, which provides ``add_command(subparsers)``: it adds its parser
and sets ``run`` (a function of the parsed arguments). Add a command by listing its module here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = ("caduceus.data", "caduceus.pretrain", "caduceus.vep", "caduceus.track", "caduceus.embed",
                   "caduceus.benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caduceus", description="Caduceus DNA language models in plain PyTorch.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (ValueError, OSError) prints its message, not a traceback, and exits 1;
    set CADUCEUS_TRACEBACK=1 to see the traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as error:
        if os.environ.get("CADUCEUS_TRACEBACK"):
            raise
        print(f"caduceus {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
