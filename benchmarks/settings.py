"""``--set KEY=VALUE`` for the benchmark scripts: launch settings of the Triton scan changed for one run."""

from __future__ import annotations

import argparse
import ast
from types import ModuleType


def add_settings_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a FWD_CONFIG entry (bwd_KEY: BWD_CONFIG's), e.g. --set group=False")


def apply_settings(scan: ModuleType, items: list[str]) -> None:
    """Set the scan module's FWD_CONFIG entries (``bwd_KEY``: BWD_CONFIG's) from KEY=VALUE strings, values as Python
    literals; a key the config does not have is refused rather than added."""
    for item in items:
        key, sep, value = item.partition("=")
        target = scan.BWD_CONFIG if key.startswith("bwd_") else scan.FWD_CONFIG
        name = key.removeprefix("bwd_")
        if not sep or name not in target:
            raise SystemExit(f"--set {item!r}: want KEY=VALUE with KEY one of {sorted(target)}")
        target[name] = ast.literal_eval(value)
