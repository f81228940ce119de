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


def check_probability(value: Any, what: str) -> float:
    """``value`` as a float in [0, 1], or a UsageError naming ``what``."""
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


def parse_threshold(text: Any) -> float | dict | None:
    """``--threshold`` text: ``0.4`` or per category ``general=0.4,character=0.8`` (tag names work too)."""
    if text is None or isinstance(text, (int, float, dict)):
        return text
    text = str(text).strip()
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--threshold must be a number or 'category=value,...', got {text!r}") from None
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--threshold: {part.strip()!r} is not 'name=number'") from None
    return out


__all__ = ["thresholds_vector", "read_thresholds", "check_thresholds", "parse_threshold", "check_probability",
           "uniform_thresholds", "DEFAULT_THRESHOLD", "THRESHOLDS_VERSION"]
