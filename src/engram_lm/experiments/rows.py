"""Result rows (one dict per finished run) grouped and sorted for tables and figures."""

from __future__ import annotations

import re
from typing import Any


def group_by(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def natural_key(value: Any) -> list[tuple[int, float, str]]:
    """Sort key that reads numbers inside names as numbers: engram_table_wd_3.0 before
    engram_table_wd_10.0, 0.5 before 10.0."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(value))
    return [(1, float(p), "") if i % 2 else (0, 0.0, p) for i, p in enumerate(parts)]
