"""Per-tag decision thresholds calibrated on held-out data: the F1-maximising threshold of every tag on the
validation split, guarded against extreme values. The record it makes (thresholds.json) is read and
checked by :mod:`alt_i2v.model.thresholds`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..model.thresholds import THRESHOLDS_VERSION
from .metrics import f1_from_counts

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


__all__ = ["calibrate_thresholds", "GRID", "CLAMP", "SHRINK_PRIOR"]
