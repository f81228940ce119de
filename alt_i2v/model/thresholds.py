"""A model's per-tag decision thresholds (thresholds.json): the record, reading and checking it, turning it
into a vector in vocabulary order, and ``--threshold`` text, so every stage agrees on what a threshold
is. Training makes the record (:mod:`alt_i2v.training.thresholds`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AltI2VError, UsageError
from ..fsutil import read_json_object

THRESHOLDS_VERSION = 1
DEFAULT_THRESHOLD = 0.5  # only when a model directory has no thresholds.json


def thresholds_vector(thresholds: dict[str, Any] | float | None, names: Sequence[str]) -> np.ndarray:
    """A thresholds.json record (or one float) as a ``(T,)`` array in vocabulary order."""
    if thresholds is None:
        return np.full(len(names), DEFAULT_THRESHOLD, dtype=np.float32)
    if isinstance(thresholds, (int, float)):
        return np.full(len(names), float(thresholds), dtype=np.float32)
    g = float(thresholds.get("global", DEFAULT_THRESHOLD))
    tags = thresholds.get("tags", {})
    return np.array([float(tags.get(n, g)) for n in names], dtype=np.float32)


def uniform_thresholds(value: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """A thresholds.json record that gives every tag ``value`` (a model that was never calibrated)."""
    return {"version": THRESHOLDS_VERSION, "global": float(value), "tags": {}}


MCUT = -1.0  # in a thresholds vector: this tag's threshold is the MCut of its category, per image
MCUT_CHARACTER_FLOOR = 0.15  # the WD14 tools never let MCut put a character threshold lower


def mcut_threshold(probs: np.ndarray) -> float:
    """MCut (Largeron et al. 2012): the middle of the largest gap between the sorted probabilities of one
    image (of one category), so the tags above the gap are kept. One probability: 0.5 of it."""
    p = np.sort(np.asarray(probs, dtype=np.float64).ravel())[::-1]
    if len(p) < 2:
        return float(p[0]) / 2 if len(p) else 0.5
    k = int(np.argmax(p[:-1] - p[1:]))
    return float((p[k] + p[k + 1]) / 2)


def resolve_mcut(probs: np.ndarray, thresholds: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """``thresholds`` ((T,)) for the probabilities ``probs`` ((T,) or (N, T)) with every :data:`MCUT`
    replaced, per image, by the MCut of the probabilities of that tag's category (at least
    :data:`MCUT_CHARACTER_FLOOR` for character tags). Without MCUT entries, ``thresholds`` itself."""
    thresholds = np.asarray(thresholds, np.float32)
    marked = thresholds == MCUT
    if not marked.any():
        return thresholds
    probs = np.asarray(probs, np.float32)
    rows = probs.reshape(-1, probs.shape[-1])
    out = np.repeat(thresholds[None, :], len(rows), axis=0)
    for cat in np.unique(np.asarray(categories)[marked]):
        cols = np.flatnonzero(marked & (np.asarray(categories) == cat))
        floor = MCUT_CHARACTER_FLOOR if cat == "character" else 0.0
        for r, row in enumerate(rows):
            out[r, cols] = max(floor, mcut_threshold(row[cols]))
    return out.reshape(probs.shape)


def check_probability(value: Any, what: str, *, mcut: bool = False) -> float:
    """``value`` as a float in [0, 1], or a UsageError naming ``what``; with ``mcut``, ``"mcut"`` gives
    :data:`MCUT`."""
    if mcut and isinstance(value, str) and value.strip().lower() == "mcut":
        return MCUT
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise UsageError(f"{what} must be in [0, 1], got {v}")
    return v


def check_thresholds(doc: Any, where: str) -> dict[str, Any]:
    """``doc`` if it is a usable thresholds.json record: the global and every per-tag value a finite
    number in [0, 1] (a NaN, -3 or Inf would silently tag everything or nothing), else AltI2VError."""
    if not isinstance(doc, dict):
        raise AltI2VError(f"{where}: not a thresholds record (a JSON object)")
    tags = doc.get("tags") or {}
    if not isinstance(tags, dict):
        raise AltI2VError(f"{where}: 'tags' must map tag names to numbers")
    values = [("global", doc.get("global", DEFAULT_THRESHOLD))] + [(f"tag {k!r}", v) for k, v in tags.items()]
    for what, v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:  # NaN fails too
            raise AltI2VError(f"{where}: the {what} threshold must be a number in [0, 1], got {v!r}; "
                              "retrain or fix the file")
    return doc


def read_thresholds(path: str | os.PathLike) -> dict[str, Any] | None:
    """A thresholds.json record, checked (:func:`check_thresholds`); None when there is no file."""
    path = Path(path)
    if not path.is_file():
        return None
    doc = check_thresholds(read_json_object(path, "thresholds"), str(path))
    return {**doc, "global": float(doc.get("global", DEFAULT_THRESHOLD)), "tags": dict(doc.get("tags") or {})}


def parse_threshold(text: Any) -> float | str | dict | None:
    """``--threshold`` text: ``0.4``, per category ``general=0.4,character=0.8`` (tag names work too), and
    ``mcut`` (every category by MCut) or ``general=mcut`` in place of a number."""
    if text is None or isinstance(text, (int, float, dict)):
        return text
    text = str(text).strip()
    if "=" not in text:
        if text.lower() == "mcut":
            return "mcut"
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--threshold must be a number, 'mcut' or 'category=value,...', got {text!r}") from None
    out: dict[str, float | str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if value.strip().lower() == "mcut":
            out[key.strip()] = "mcut"
            continue
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--threshold: {part.strip()!r} is not 'name=number' or 'name=mcut'") from None
    return out


__all__ = ["thresholds_vector", "read_thresholds", "check_thresholds", "parse_threshold", "check_probability",
           "uniform_thresholds", "mcut_threshold", "resolve_mcut", "MCUT", "DEFAULT_THRESHOLD",
           "THRESHOLDS_VERSION"]
