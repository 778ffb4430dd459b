"""Where weights come from: a local directory (more sources are added by the hub issue)."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_model_dir(name_or_path: str | os.PathLike, **_: object) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    raise FileNotFoundError(f"{name_or_path}: no such model directory")
