"""Per-tag decision thresholds: calibration on held-out data, and reading and checking thresholds.json.

Training calibrates (the F1-maximising threshold of every tag on the validation split, guarded against
extreme values), the tagger and
the evaluator read the record back; ``--threshold`` text is parsed here too, so every stage agrees on
what a threshold is.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AltI2VError, UsageError
from ..fsutil import read_json_object
from .metrics import f1_from_counts

THRESHOLDS_VERSION = 1
DEFAULT_THRESHOLD = 0.5  # only when a model directory has no thresholds.json
GRID = np.round(np.concatenate([[0.002, 0.005], np.arange(0.01, 0.995, 0.01), [0.995]]), 4)


def _counts_at(y_true: np.ndarray, y_prob: np.ndarray, grid: np.ndarray, chunk: int = 2048
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives of every tag at every grid threshold (predicted = prob >= t).

    Returns ``tp (G, T)``, ``fp (G, T)`` and positives ``(T,)``, from per-tag histograms of where each
    probability falls among the thresholds: O(N*T), no (G, N, T) array.
    """
    n, t = y_prob.shape
    g = len(grid)
    pos_hist = np.zeros((t, g + 1), dtype=np.int64)
    all_hist = np.zeros((t, g + 1), dtype=np.int64)
    offs = (np.arange(t, dtype=np.int64) * (g + 1))[None, :]
    for start in range(0, n, chunk):
        p = y_prob[start:start + chunk]
        y = y_true[start:start + chunk] > 0.5
        bins = np.searchsorted(grid, p, side="right") + offs  # p >= grid[k] for k < bin
        all_hist += np.bincount(bins.ravel(), minlength=t * (g + 1)).reshape(t, g + 1)
        pos_hist += np.bincount(bins[y], minlength=t * (g + 1)).reshape(t, g + 1)
    # predicted positive at threshold k: bins k+1..g -> reverse cumulative sum
    above_pos = np.cumsum(pos_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (T, G)
    above_all = np.cumsum(all_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    tp = above_pos.T
    fp = (above_all - above_pos).T
    return tp, fp, pos_hist.sum(axis=1)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _plateau_middle(values: np.ndarray, grid: np.ndarray) -> float:
    """The middle, in logit space, of the widest run of grid thresholds that reach the maximum.

    On a perfectly separated tag every threshold in the gap between the highest negative and the lowest
    positive scores F1 = 1; the logit midpoint of that gap is the widest margin on the scale the model
    works in (a gap of 0.002..0.3 gives 0.025, not the 0.002 a first-maximum rule picks)."""
    idx = np.flatnonzero(values >= values.max() - 1e-12)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    run = max(runs, key=len)
    return float(_sigmoid((_logit(grid[run[0]]) + _logit(grid[run[-1]])) / 2))


CLAMP = (0.05, 0.95)  # no calibrated threshold outside this range
SHRINK_PRIOR = 10.0  # a tag's own threshold counts as its positives against this many at the global one


def calibrate_thresholds(y_true: np.ndarray, y_prob: np.ndarray, names: Sequence[str] | None = None, *,
                         min_positives: int = 5, grid: np.ndarray | None = None, calibrated_on: str = "val",
                         clamp: tuple[float, float] | None = CLAMP, shrink_prior: float = SHRINK_PRIOR
                         ) -> dict[str, Any]:
    """Per-tag thresholds maximising F1 on held-out data (the thresholds.json record).

    The global threshold maximises micro-F1 over all tags; tags with fewer than ``min_positives``
    positives get the global value (too few examples to place a threshold of their own). Guards against
    the extreme thresholds (0.002, 0.99) that small or perfectly separable validation sets produce, which
    then flip many test images: a flat F1 optimum is resolved to its logit midpoint; the tag's threshold is
    shrunk toward the global one in logit space with weight ``positives / (positives + shrink_prior)``
    (few positives: a noisy estimate, so mostly the global value; many: mostly its own); and the result is
    clamped to ``clamp``. ``clamp=None, shrink_prior=0`` turns the guards off.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float32)
    if y_true.shape != y_prob.shape or y_true.ndim != 2:
        raise ValueError(f"y_true {y_true.shape} and y_prob {y_prob.shape} must be the same (N, T)")
    grid = GRID if grid is None else np.asarray(grid, dtype=np.float64)
    names = list(names) if names is not None else [str(i) for i in range(y_true.shape[1])]
    tp, fp, pos = _counts_at(y_true, y_prob, grid)
    fn = pos[None, :] - tp
    micro = f1_from_counts(tp.sum(1), fp.sum(1), fn.sum(1))
    lo, hi = clamp if clamp else (0.0, 1.0)
    global_t = round(float(np.clip(_plateau_middle(micro, grid), lo, hi)), 4) if len(y_true) else 0.5
    per_tag = f1_from_counts(tp, fp, fn)  # (G, T)
    out: dict[str, float] = {}
    own = 0
    for j, name in enumerate(names):
        if pos[j] >= max(1, min_positives):
            w = pos[j] / (pos[j] + max(0.0, float(shrink_prior)))
            t = _sigmoid(w * _logit(_plateau_middle(per_tag[:, j], grid)) + (1 - w) * _logit(global_t))
            out[name] = round(float(np.clip(t, lo, hi)), 4)
            own += 1
        else:
            out[name] = global_t
    return {"version": THRESHOLDS_VERSION, "global": global_t, "min_positives": int(min_positives),
            "method": "max_f1", "guard": {"clamp": list(clamp) if clamp else None,
                                          "shrink_prior": float(shrink_prior), "midpoint": "logit"},
            "calibrated_on": calibrated_on, "images": int(len(y_true)),
            "tags_with_own_threshold": own, "tags": out}


def thresholds_vector(thresholds: dict[str, Any] | float | None, names: Sequence[str]) -> np.ndarray:
    """A thresholds.json record (or one float) as a ``(T,)`` array in vocabulary order."""
    if thresholds is None:
        return np.full(len(names), DEFAULT_THRESHOLD, dtype=np.float32)
    if isinstance(thresholds, (int, float)):
        return np.full(len(names), float(thresholds), dtype=np.float32)
    g = float(thresholds.get("global", DEFAULT_THRESHOLD))
    tags = thresholds.get("tags", {})
    return np.array([float(tags.get(n, g)) for n in names], dtype=np.float32)


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


__all__ = ["calibrate_thresholds", "thresholds_vector", "read_thresholds", "check_thresholds", "parse_threshold", "check_probability",
           "mcut_threshold", "resolve_mcut", "MCUT",
           "DEFAULT_THRESHOLD", "THRESHOLDS_VERSION", "GRID"]
