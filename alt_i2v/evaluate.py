"""Scoring a model on a split of the store, and the per-tag threshold calibration training uses.

Everything is numpy: mAP, micro/macro F1, precision and recall at the calibrated thresholds and at 0.5,
ROC AUC, a per-tag table, the images the model gets most wrong, and for single-label datasets (imported
class folders) top-1 accuracy with a confusion matrix. ``evaluate`` writes ``MODEL/reports/``:
``metrics.json``, ``report.md`` and PNGs.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import THRESHOLDS_FILE
from .errors import AltI2VError

THRESHOLDS_VERSION = 1
METRICS_VERSION = 1
GRID = np.round(np.concatenate([[0.002, 0.005], np.arange(0.01, 0.995, 0.01), [0.995]]), 4)

# ---------------------------------------------------------------------------------------------------------
# Threshold calibration


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


def _f1(tp, fp, fn):
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def _middle_argmax(values: np.ndarray) -> int:
    """Index of the maximum; among ties, the middle one (the widest margin on a flat optimum)."""
    best = np.flatnonzero(values >= values.max() - 1e-12)
    return int(best[len(best) // 2])


def calibrate_thresholds(y_true: np.ndarray, y_prob: np.ndarray, names: Sequence[str] | None = None, *,
                         min_positives: int = 5, grid: np.ndarray | None = None,
                         calibrated_on: str = "val") -> dict[str, Any]:
    """Per-tag thresholds maximising F1 on held-out data (the thresholds.json record).

    The global threshold maximises micro-F1 over all tags; tags with fewer than ``min_positives``
    positives get the global value (too few examples to place a threshold of their own).
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float32)
    if y_true.shape != y_prob.shape or y_true.ndim != 2:
        raise ValueError(f"y_true {y_true.shape} and y_prob {y_prob.shape} must be the same (N, T)")
    grid = GRID if grid is None else np.asarray(grid, dtype=np.float64)
    names = list(names) if names is not None else [str(i) for i in range(y_true.shape[1])]
    tp, fp, pos = _counts_at(y_true, y_prob, grid)
    fn = pos[None, :] - tp
    micro = _f1(tp.sum(1), fp.sum(1), fn.sum(1))
    global_t = float(grid[_middle_argmax(micro)]) if len(y_true) else 0.5
    per_tag = _f1(tp, fp, fn)  # (G, T)
    out: dict[str, float] = {}
    own = 0
    for j, name in enumerate(names):
        if pos[j] >= max(1, min_positives):
            out[name] = float(grid[_middle_argmax(per_tag[:, j])])
            own += 1
        else:
            out[name] = global_t
    return {"version": THRESHOLDS_VERSION, "global": global_t, "min_positives": int(min_positives),
            "method": "max_f1", "calibrated_on": calibrated_on, "images": int(len(y_true)),
            "tags_with_own_threshold": own, "tags": out}


def thresholds_vector(thresholds: dict[str, Any] | float | None, names: Sequence[str]) -> np.ndarray:
    """A thresholds.json record (or one float) as a ``(T,)`` array in vocabulary order."""
    if thresholds is None:
        return np.full(len(names), 0.5, dtype=np.float32)
    if isinstance(thresholds, (int, float)):
        return np.full(len(names), float(thresholds), dtype=np.float32)
    g = float(thresholds.get("global", 0.5))
    tags = thresholds.get("tags", {})
    return np.array([float(tags.get(n, g)) for n in names], dtype=np.float32)


def check_thresholds(doc: Any, where: str) -> dict[str, Any]:
    """``doc`` if it is a usable thresholds.json record: the global and every per-tag value a finite
    number in [0, 1] (a NaN, -3 or Inf would silently tag everything or nothing), else AltI2VError."""
    if not isinstance(doc, dict):
        raise AltI2VError(f"{where}: not a thresholds record (a JSON object)")
    tags = doc.get("tags") or {}
    if not isinstance(tags, dict):
        raise AltI2VError(f"{where}: 'tags' must map tag names to numbers")
    values = [("global", doc.get("global", 0.5))] + [(f"tag {k!r}", v) for k, v in tags.items()]
    for what, v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:  # NaN fails too
            raise AltI2VError(f"{where}: the {what} threshold must be a number in [0, 1], got {v!r}; "
                              "retrain or fix the file")
    return doc


def load_thresholds(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(model_dir) / THRESHOLDS_FILE
    if not path.exists():
        return None
    return check_thresholds(json.loads(path.read_text(encoding="utf-8")), str(path))


# ---------------------------------------------------------------------------------------------------------
# Metrics


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
    f_tag = _f1(tp, fp, fn)
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


# ---------------------------------------------------------------------------------------------------------
# Prediction over the store


def predict_split(model, store, split: str | None, *, batch_size: int = 64, workers: int = 0,
                  quiet: bool = True, desc: str = "predict") -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Probabilities of every image of a split: ``(keys, y_true (N, T), y_prob (N, T))``, store order.

    Batches are read ahead by threads while the model runs.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from .config import resolve_workers
    from .model import predict_batch
    from .pipeline import StoreDataset
    from .progress import bar

    keys, labels = store.index(split)
    ds = StoreDataset(store, keys, labels, batch_size=batch_size, workers=1)
    y_true = np.zeros((len(keys), store.num_tags), dtype=np.float32)
    probs = np.zeros((len(keys), store.num_tags), dtype=np.float32)
    nworkers = max(1, resolve_workers(workers))
    out_pos = 0
    with ThreadPoolExecutor(nworkers) as ex, bar(total=len(keys), desc=desc, unit="img", quiet=quiet) as pbar:
        pending: deque = deque()
        nxt = 0
        while nxt < len(ds) and len(pending) < nworkers * 2:
            pending.append(ex.submit(ds.__getitem__, nxt))
            nxt += 1
        while pending:
            x, y = pending.popleft().result()
            y_true[out_pos:out_pos + len(y)] = y
            if nxt < len(ds):
                pending.append(ex.submit(ds.__getitem__, nxt))
                nxt += 1
            p = predict_batch(model, x, batch_size)
            if isinstance(p, list):
                p = p[0]
            probs[out_pos:out_pos + len(x)] = p
            out_pos += len(x)
            pbar.update(len(x))
    if store.bad:  # records that did not decode were left out: drop their keys and unused rows
        keys = [k for k in keys if k not in store.bad]
        y_true, probs = y_true[:out_pos], probs[:out_pos]
    return keys, y_true, probs


# ---------------------------------------------------------------------------------------------------------
# evaluate()


@dataclass
class EvalResult:
    """What ``evaluate`` measured and wrote."""

    model_dir: Path
    split: str
    images: int
    metrics: dict[str, Any]
    per_tag: list[dict[str, Any]] = field(default_factory=list)
    worst_images: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bad_records: list[dict] = field(default_factory=list)  # store records left out: they did not decode

    def summary(self) -> dict[str, Any]:
        m = self.metrics
        rows = {"split": f"{self.split} ({self.images} images, {m.get('tags_evaluated')} tags present)",
                "mAP": m["map"], "AUC (macro)": m["auc"],
                "micro F1 / P / R": f"{m['micro_f1']:.4f} / {m['micro_precision']:.4f} / {m['micro_recall']:.4f}"
                                    " (calibrated thresholds)",
                "micro F1 at 0.5": m["micro_f1_at_0.5"],
                "macro F1 / P / R": f"{m['macro_f1']:.4f} / {m['macro_precision']:.4f} / {m['macro_recall']:.4f}",
                "macro F1 at 0.5": m["macro_f1_at_0.5"]}
        if "top1_accuracy" in m:
            rows["top-1 accuracy"] = m["top1_accuracy"]
        if self.per_tag:
            best = sorted(self.per_tag, key=lambda r: -r["f1"])[:3]
            rows["best tags (F1)"] = ", ".join(f"{r['tag']} {r['f1']:.2f}" for r in best)
        if self.bad_records:
            rows["bad store records"] = (f"{len(self.bad_records)} left out (first: {self.bad_records[0]['key']}: "
                                         f"{self.bad_records[0]['reason'][:80]}); run --build --rebuild")
        rows["report"] = str(self.model_dir / "reports" / "report.md")
        rows["seconds"] = round(self.seconds, 1)
        return rows


def _read_model_dir(model_dir: Path) -> tuple[dict, Any, dict | None]:
    from .vocab import Vocab

    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise AltI2VError(f"{model_dir}: no config.json; is this a model directory written by --train?")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    return config, Vocab.load(model_dir / "vocab.json"), load_thresholds(model_dir)


def evaluate(data_dir: str | os.PathLike, model_dir: str | os.PathLike, split: str = "test", *,
             batch_size: int | None = None, quiet: bool = False, workers: int = 0, top: int = 20) -> EvalResult:
    """Score ``MODEL`` on ``split`` of ``DATA/store`` and write ``MODEL/reports/`` (metrics.json, report.md,
    PNGs). Uses the calibrated thresholds of thresholds.json, and also reports everything at 0.5."""
    from .fsutil import atomic_write_json, atomic_write_text
    from .model import load_model
    from .store import SPLITS, Store

    t0 = time.perf_counter()
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    if split not in SPLITS:
        raise AltI2VError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    config, vocab, thresholds = _read_model_dir(model_dir)
    image_size = int(config.get("image", {}).get("image_size") or config["model"]["image_size"])
    model = load_model(model_dir)
    names = vocab.names
    thr = thresholds_vector(thresholds, names)
    store = Store(data_dir, vocab=vocab, image_size=image_size)
    try:
        if store.count(split) == 0:
            raise AltI2VError(f"the {split} split of {store.path} has no images; evaluate another --split")
        keys, y_true, y_prob = predict_split(model, store, split, batch_size=batch_size or 64, workers=workers,
                                             quiet=quiet, desc=f"evaluate {split}")
        wrong = most_wrong(y_true, y_prob, thr, names, top=top)
        for w in wrong:
            w["id"] = store.get(keys[w.pop("index")])["id"]
        bad = store.bad_report()
    finally:
        store.close()
    m = compute_metrics(y_true, y_prob, thr)
    present = m["_support"] > 0
    metrics: dict[str, Any] = {
        "version": METRICS_VERSION, "split": split, "images": int(len(keys)), "tags": len(names),
        "tags_evaluated": int(present.sum()),
        "thresholds": "calibrated" if thresholds else "0.5 (no thresholds.json)",
        **{k: _round(v) for k, v in m.items() if not k.startswith("_")},
    }
    cm = None
    if is_single_label(y_true):
        cm, top1 = confusion(y_true, y_prob)
        metrics["top1_accuracy"] = round(top1, 6)
        metrics["single_label"] = True
    per_tag = []
    for j in np.flatnonzero(present):
        per_tag.append({"tag": names[j], "category": vocab.tag_categories[j], "support": int(m["_support"][j]),
                        "ap": _round(m["_ap"][j]), "auc": _round(m["_auc"][j]), "f1": _round(m["_f1"][j]),
                        "precision": _round(m["_precision"][j]), "recall": _round(m["_recall"][j]),
                        "f1_at_0.5": _round(m["_f1_at_0.5"][j]), "threshold": _round(thr[j])})
    by_f1 = sorted(per_tag, key=lambda r: (-r["f1"], -r["support"], r["tag"]))
    files = _post_files(data_dir, [w["id"] for w in wrong])
    for w in wrong:
        w["file"] = files.get(str(w["id"]))

    reports = model_dir / "reports"
    written = []
    record = {**metrics, "per_tag_best": by_f1[:top], "per_tag_worst": by_f1[::-1][:top],
              "most_wrong": wrong, "bad_store_records": bad, "confusion_matrix": cm.tolist() if cm is not None and len(cm) <= 100 else None,
              "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    written.append(str(atomic_write_json(reports / "metrics.json", record)))
    atomic_write_json(reports / "per_tag.json", by_f1)
    written.append(str(reports / "per_tag.json"))
    pngs = _plots(reports, m, names, present, cm, y_true, data_dir, wrong, image_size)
    written += pngs
    atomic_write_text(reports / "report.md", _report_md(model_dir, config, metrics, by_f1, wrong, pngs, top))
    written.append(str(reports / "report.md"))
    return EvalResult(model_dir=model_dir, split=split, images=int(len(keys)), metrics=metrics, per_tag=by_f1,
                      worst_images=wrong, files=written, seconds=time.perf_counter() - t0, bad_records=bad)


def _post_files(data_dir: Path, ids: list) -> dict[str, str]:
    """Image file (relative to DATA) of each post id, from posts.jsonl when it is there."""
    from .dataset import iter_posts, posts_path

    want = {str(i) for i in ids}
    out: dict[str, str] = {}
    if not want or not posts_path(data_dir).exists():
        return out
    try:
        for post in iter_posts(data_dir):
            if str(post.get("id")) in want and post.get("file"):
                out[str(post["id"])] = str(post["file"])
    except Exception:  # noqa: BLE001 - file names are a convenience in the report, never a failure
        pass
    return out


def _round(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return None if math.isnan(v) else round(v, 6)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _save_fig(fig, path: Path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .fsutil import atomic_write_bytes

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return str(atomic_write_bytes(path, buf.getvalue()))


def _plots(reports: Path, m: dict, names, present, cm, y_true, data_dir, wrong, image_size) -> list[str]:
    """tag_quality.png (sorted per-tag F1 and AP), most_wrong.png, confusion_matrix.png (single-label)."""
    from matplotlib.figure import Figure

    out = []
    f1 = np.sort(m["_f1"][present])[::-1]
    ap = np.sort(np.nan_to_num(m["_ap"][present]))[::-1]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(f1, label="F1 (calibrated)")
    ax.plot(ap, label="average precision")
    ax.set_xlabel("tags, best to worst")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"per-tag quality ({int(present.sum())} tags)")
    out.append(_save_fig(fig, reports / "tag_quality.png"))

    if cm is not None:
        k = cm.shape[0]
        keep = np.argsort(-y_true.sum(0))[:min(k, 40)]
        sub = cm[np.ix_(keep, keep)]
        rows = sub.sum(1, keepdims=True)
        norm = np.where(rows > 0, sub / np.maximum(rows, 1), 0.0)
        size = max(4.0, 0.3 * len(keep) + 2)
        fig = Figure(figsize=(size, size))
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(keep)), [names[i] for i in keep], rotation=90, fontsize=7)
        ax.set_yticks(range(len(keep)), [names[i] for i in keep], fontsize=7)
        ax.set_xlabel("predicted (top-1)")
        ax.set_ylabel("true")
        for i in range(len(keep)):
            for j in range(len(keep)):
                if sub[i, j]:
                    ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title("confusion matrix (row-normalised colour, counts)")
        out.append(_save_fig(fig, reports / "confusion_matrix.png"))

    shown = [w for w in wrong if w.get("file")][:12]
    if shown:
        from .imaging import load_image

        cols = 4
        rows_n = math.ceil(len(shown) / cols)
        fig = Figure(figsize=(cols * 3.2, rows_n * 3.6))
        for k, w in enumerate(shown):
            ax = fig.add_subplot(rows_n, cols, k + 1)
            try:
                ax.imshow(load_image(str(data_dir / w["file"]), max(image_size, 96)))
            except Exception:  # noqa: BLE001 - a missing file leaves an empty panel
                pass
            ax.axis("off")
            miss = ", ".join(t for t, _ in w["missed"][:3]) or "-"
            extra = ", ".join(t for t, _ in w["false"][:3]) or "-"
            ax.set_title(f"id {w['id']}\nmissed: {miss}\nfalse: {extra}", fontsize=7)
        out.append(_save_fig(fig, reports / "most_wrong.png"))
    return out


def _report_md(model_dir: Path, config: dict, metrics: dict, by_f1: list, wrong: list, pngs: list,
               top: int) -> str:
    m = metrics
    lines = [f"# Evaluation of `{model_dir.name}` on the {m['split']} split", "",
             f"{m['images']} images, {m['tags_evaluated']} of {m['tags']} tags present. Backbone "
             f"`{config.get('model', {}).get('backbone')}`, {config.get('image', {}).get('image_size')}px. "
             f"Thresholds: {m['thresholds']}.", "",
             "| metric | calibrated thresholds | at 0.5 |", "|---|---|---|"]
    for key, label in [("micro_f1", "micro F1"), ("micro_precision", "micro precision"),
                       ("micro_recall", "micro recall"), ("macro_f1", "macro F1"),
                       ("macro_precision", "macro precision"), ("macro_recall", "macro recall")]:
        lines.append(f"| {label} | {_fmt(m.get(key))} | {_fmt(m.get(key + '_at_0.5'))} |")
    lines += ["", f"- mAP (mean average precision over tags present): **{_fmt(m['map'])}**",
              f"- ROC AUC: macro {_fmt(m['auc'])}, micro {_fmt(m['auc_micro'])}"]
    if "top1_accuracy" in m:
        lines.append(f"- single-label data: top-1 accuracy **{_fmt(m['top1_accuracy'])}** "
                     "(see confusion_matrix.png)")
    lines.append("- macro averages are over the tags present in this split")
    head = ["| tag | category | images | AP | F1 | P | R | threshold |", "|---|---|---|---|---|---|---|---|"]

    def row(r):
        return (f"| {r['tag']} | {r['category']} | {r['support']} | {_fmt(r['ap'])} | {_fmt(r['f1'])} | "
                f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['threshold'])} |")

    lines += ["", f"## Best {min(top, len(by_f1))} tags (F1)", ""] + head + [row(r) for r in by_f1[:top]]
    lines += ["", f"## Worst {min(top, len(by_f1))} tags (F1)", ""] + head + [row(r) for r in by_f1[::-1][:top]]
    lines += ["", "## Images the model gets most wrong", "",
              "Missed: true tags below their threshold; false: predicted tags the image does not have "
              "(probabilities in brackets).", "", "| id | file | errors | missed | false |", "|---|---|---|---|---|"]
    for w in wrong:
        miss = ", ".join(f"{t} ({p:.2f})" for t, p in w["missed"][:6]) or "-"
        extra = ", ".join(f"{t} ({p:.2f})" for t, p in w["false"][:6]) or "-"
        lines.append(f"| {w['id']} | {w.get('file') or '-'} | {w['errors']} | {miss} | {extra} |")
    if not wrong:
        lines.append("| - | - | 0 | - | - |")
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in pngs]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


__all__ = ["evaluate", "EvalResult", "calibrate_thresholds", "thresholds_vector", "load_thresholds",
           "check_thresholds", "compute_metrics", "prf_at", "average_precision", "roc_auc", "predict_split", "most_wrong",
           "is_single_label", "confusion", "THRESHOLDS_FILE"]
