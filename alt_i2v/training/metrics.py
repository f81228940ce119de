"""Multi-label metrics in numpy: precision/recall/F1 (micro and macro), average precision, ROC AUC, and
the single-label extras (top-1 accuracy, confusion matrix) and the images a model gets most wrong."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def f1_from_counts(tp, fp, fn):
    """F1 from true positive, false positive and false negative counts (0 where all are 0)."""
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)



def prf_at(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray | float) -> dict[str, Any]:
    """Micro and macro precision/recall/F1 (macro over tags with a positive) and per-tag arrays."""
    y = y_true > 0.5
    pred = y_prob >= np.asarray(thresholds, dtype=np.float32)
    tp = (pred & y).sum(0).astype(np.float64)
    fp = (pred & ~y).sum(0).astype(np.float64)
    fn = (~pred & y).sum(0).astype(np.float64)
    support = y.sum(0)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p_tag = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        r_tag = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
    f_tag = f1_from_counts(tp, fp, fn)
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    micro_p = TP / (TP + FP) if TP + FP else 0.0
    micro_r = TP / (TP + FN) if TP + FN else 0.0
    micro_f = 2 * TP / (2 * TP + FP + FN) if TP + FP + FN else 0.0
    macro = (lambda a: float(a[present].mean()) if present.any() else 0.0)
    return {"micro_f1": float(micro_f), "micro_precision": float(micro_p), "micro_recall": float(micro_r),
            "macro_f1": macro(f_tag), "macro_precision": macro(p_tag), "macro_recall": macro(r_tag),
            "_f1": f_tag, "_precision": p_tag, "_recall": r_tag, "_support": support}


def average_precision(y_true: np.ndarray, y_prob: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Per-tag average precision (area under the precision-recall steps); NaN where a tag has no positive."""
    n, t = y_prob.shape
    out = np.full(t, np.nan)
    ranks = np.arange(1, n + 1, dtype=np.float64)[:, None]
    for s in range(0, t, chunk):
        p = y_prob[:, s:s + chunk]
        y = (y_true[:, s:s + chunk] > 0.5)
        order = np.argsort(-p, axis=0, kind="stable")
        ys = np.take_along_axis(y, order, axis=0).astype(np.float64)
        prec = np.cumsum(ys, axis=0) / ranks
        npos = ys.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + chunk] = np.where(npos > 0, (prec * ys).sum(0) / np.maximum(npos, 1), np.nan)
    return out


def _rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    change = np.concatenate([[True], xs[1:] != xs[:-1]])
    group = np.cumsum(change) - 1
    starts = np.flatnonzero(change)
    ends = np.concatenate([starts[1:], [len(x)]])
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = avg[group]
    return ranks


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of one label (Mann-Whitney U, ties counted half); NaN when only one class is present."""
    y = np.asarray(y_true) > 0.5
    npos = int(y.sum())
    nneg = len(y) - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    r = _rank_average(np.asarray(y_score, dtype=np.float64))
    return float((r[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def per_tag_auc(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    return np.array([roc_auc(y_true[:, j], y_prob[:, j]) for j in range(y_true.shape[1])])


def micro_auc(y_true: np.ndarray, y_prob: np.ndarray, max_items: int = 4_000_000, seed: int = 0) -> float:
    """AUC over all (image, tag) pairs, on a fixed random sample when there are very many."""
    yt, yp = y_true.ravel(), y_prob.ravel()
    if yt.size > max_items:
        idx = np.random.default_rng(seed).choice(yt.size, max_items, replace=False)
        yt, yp = yt[idx], yp[idx]
    return roc_auc(yt, yp)


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def compute_metrics(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray) -> dict[str, Any]:
    """All summary metrics of one split; per-tag arrays under keys starting with ``_``."""
    cal = prf_at(y_true, y_prob, thresholds)
    half = prf_at(y_true, y_prob, 0.5)
    ap = average_precision(y_true, y_prob)
    auc = per_tag_auc(y_true, y_prob)
    out = {k: v for k, v in cal.items() if not k.startswith("_")}
    out.update({f"{k}_at_0.5": v for k, v in half.items() if not k.startswith("_")})
    out.update({"map": _nanmean(ap), "auc": _nanmean(auc), "auc_micro": micro_auc(y_true, y_prob),
                "_ap": ap, "_auc": auc, "_f1": cal["_f1"], "_precision": cal["_precision"],
                "_recall": cal["_recall"], "_support": cal["_support"], "_f1_at_0.5": half["_f1"]})
    return out


def is_single_label(y_true: np.ndarray) -> bool:
    """Every image has exactly one tag (imported class folders): top-1 and a confusion matrix apply."""
    return len(y_true) > 0 and bool(np.all((y_true > 0.5).sum(1) == 1))


def confusion(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, float]:
    t = (y_true > 0.5).argmax(1)
    p = y_prob.argmax(1)
    k = y_true.shape[1]
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm, float((t == p).mean())


def most_wrong(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray, names: Sequence[str],
               top: int = 20) -> list[dict[str, Any]]:
    """The images with the most confident mistakes at the thresholds: missed tags and false tags."""
    y = y_true > 0.5
    pred = y_prob >= thresholds[None, :]
    wrong = y != pred
    score = np.where(wrong, np.abs(y.astype(np.float32) - y_prob), 0.0).sum(1)
    order = np.argsort(-score, kind="stable")
    out = []
    for i in order[:top]:
        if score[i] <= 0:
            break
        missed = [j for j in np.flatnonzero(y[i] & ~pred[i])]
        extra = [j for j in np.flatnonzero(~y[i] & pred[i])]
        missed.sort(key=lambda j: y_prob[i, j])
        extra.sort(key=lambda j: -y_prob[i, j])
        out.append({"index": int(i), "errors": int(wrong[i].sum()), "score": round(float(score[i]), 4),
                    "missed": [[names[j], round(float(y_prob[i, j]), 3)] for j in missed],
                    "false": [[names[j], round(float(y_prob[i, j]), 3)] for j in extra],
                    "true_tags": [names[j] for j in np.flatnonzero(y[i])]})
    return out


__all__ = ["f1_from_counts", "prf_at", "average_precision", "roc_auc", "per_tag_auc", "micro_auc", "compute_metrics",
           "is_single_label", "confusion", "most_wrong"]
