"""On-disk model registry: ``<root>/<line>/<version>/`` plus a ``CHAMPION`` pointer per line."""

from __future__ import annotations

import os
from pathlib import Path

CHAMPION_FILE = "CHAMPION"


def line_dir(root: str | os.PathLike, line: str) -> Path:
    return Path(root) / line


def model_dir(root: str | os.PathLike, line: str, version: str) -> Path:
    return line_dir(root, line) / version


def read_champion(root: str | os.PathLike, line: str) -> str | None:
    """The champion version of a line, or None when the line has none yet."""
    p = line_dir(root, line) / CHAMPION_FILE
    try:
        text = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None
