"""Groups of near-copies in a dataset, as ``--dedupe`` wrote them to ``DATA/reports/dedupe.json``: read
here for ``--build``, which keeps each group in one split (the search package finds and writes them)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import AltI2VError

REPORT = "dedupe"  # DATA/reports/dedupe.json


def read_groups(data_dir: str | os.PathLike) -> list[list[Any]] | None:
    """The groups of ``DATA/reports/dedupe.json``, or None when there is no report (a damaged one is an
    error: a build must not silently split what the report said to keep together)."""
    from .layout import DataDir
    from ..fsutil import read_json_object

    path = DataDir(data_dir).report(REPORT)
    if not path.is_file():
        return None
    doc = read_json_object(path, "dedupe report")
    groups = doc.get("groups")
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise AltI2VError(f"{path}: no list of groups in it; run --dedupe again")
    return groups


def group_leaders(data_dir: str | os.PathLike) -> dict[Any, Any]:
    """Post id -> the id whose split its whole group takes (the group's first id), from the dedupe report;
    empty without one."""
    leaders: dict[Any, Any] = {}
    for group in read_groups(data_dir) or []:
        if group:
            for pid in group:
                leaders[pid] = group[0]
    return leaders


__all__ = ["read_groups", "group_leaders", "REPORT"]
