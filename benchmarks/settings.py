"""``--set KEY=VALUE`` for the benchmark scripts: launch settings of the Triton scan (or of the CUDA backend) changed
for one run."""

from __future__ import annotations

import argparse
import ast
from types import ModuleType


def add_settings_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a FWD_CONFIG entry (bwd_KEY: BWD_CONFIG's; cuda_KEY: one of the CUDA "
                             "backend's SETTINGS: time segments, BACKWARD, CHECKPOINT, SUMS), e.g. --set group=False "
                             "--set cuda_BACKWARD='triton'")


def apply_settings(scan: ModuleType, items: list[str]) -> None:
    """Set the scan module's FWD_CONFIG entries (``bwd_KEY``: BWD_CONFIG's; ``cuda_KEY``: one of the CUDA backend's
    SETTINGS) from KEY=VALUE strings, values as Python literals; a key that is not there is refused rather than
    added."""
    for item in items:
        key, sep, value = item.partition("=")
        if key.startswith("cuda_"):
            from caduceus.ops.cuda import scan as cuda_scan

            target, name = vars(cuda_scan), key.removeprefix("cuda_")
            known = cuda_scan.SETTINGS
        else:
            target = scan.BWD_CONFIG if key.startswith("bwd_") else scan.FWD_CONFIG
            name = key.removeprefix("bwd_")
            known = tuple(target)
        if not sep or name not in known:
            raise SystemExit(f"--set {item!r}: want KEY=VALUE with KEY one of {sorted(known)}")
        target[name] = ast.literal_eval(value)
