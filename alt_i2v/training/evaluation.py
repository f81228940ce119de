"""Scoring a model on a split of the store: ``evaluate`` writes ``MODEL/reports/`` (``metrics.json``,
``per_tag.json``, ``report.md`` and PNGs).

The numbers come from :mod:`alt_i2v.training.metrics` (mAP, micro/macro F1, precision and recall at the calibrated
thresholds of :mod:`alt_i2v.training.thresholds` and at 0.5, ROC AUC, the images the model gets most wrong, and
top-1 accuracy with a confusion matrix for single-label datasets); this module predicts the split and
writes the report.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AltI2VError, UsageError
from ..model.modeldir import ModelDir
from .metrics import compute_metrics, confusion, is_single_label, most_wrong
from ..model.thresholds import thresholds_vector

METRICS_VERSION = 1

# ---------------------------------------------------------------------------------------------------------
# Prediction over the store


def predict_split(model, store, split: str | None, *, batch_size: int = 64, workers: int = 0,
                  quiet: bool = True, desc: str = "predict", readers: Any = None
                  ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Probabilities of every image of a split: ``(keys, y_true (N, T), y_prob (N, T))``, store order.

    Batches all have ``batch_size`` images (the last one padded), so predict compiles once; they are
    read ahead by ``workers`` threads, or by the reader processes of ``readers`` (a sharded store). A record that
    does not decode is left out (keys and rows) and noted in ``store.bad``.
    """
    from ..config import resolve_workers
    from ..model.build import predict_batch
    from .pipeline import StoreDataset
    from ..progress import bar

    keys, labels = store.index(split)
    ds = StoreDataset(store, keys, labels, batch_size=batch_size, workers=resolve_workers(workers), readers=readers)
    y_true = np.zeros((len(keys), store.num_tags), dtype=np.float32)
    probs = np.zeros((len(keys), store.num_tags), dtype=np.float32)
    kept: list[bytes] = []
    with bar(total=len(keys), desc=desc, unit="img", quiet=quiet) as pbar:
        for index in range(len(ds)):  # the dataset reads the next batches while the model runs
            x, y, w = ds[index]
            p = predict_batch(model, x["image"], batch_size)
            if isinstance(p, list):
                p = p[0]
            real = ds.batch_indices(index)
            good = np.flatnonzero(w[:len(real)] > 0)
            pos = len(kept)
            probs[pos:pos + len(good)] = p[good]
            y_true[pos:pos + len(good)] = y[good]
            kept += [keys[real[i]] for i in good]
            pbar.update(len(real))
    ds.close()
    return kept, y_true[:len(kept)], probs[:len(kept)]


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
        rows["report"] = str(ModelDir(self.model_dir).reports / "report.md")
        rows["seconds"] = round(self.seconds, 1)
        return rows


def evaluate(data_dir: str | os.PathLike, model_dir: str | os.PathLike, split: str = "test", *,
             batch_size: int | None = None, quiet: bool = False, workers: int = 0, top: int = 20) -> EvalResult:
    """Score ``MODEL`` on ``split`` of ``DATA/store`` and write ``MODEL/reports/`` (metrics.json, report.md,
    PNGs). Uses the calibrated thresholds of thresholds.json, and also reports everything at 0.5."""
    from ..config import resolve_workers
    from ..fsutil import atomic_write_json, atomic_write_text
    from ..model.build import with_tta
    from ..model.modeldir import load_model
    from .readers import ReaderPool
    from ..store import SPLITS, open_store

    t0 = time.perf_counter()
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    if split not in SPLITS:
        raise AltI2VError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    from ..ready import ALT_I2V, detect

    ModelDir(model_dir).require()
    family = detect(model_dir)
    if family != ALT_I2V:
        raise UsageError(f"{model_dir} is a {family} model: its vocabulary is not the dataset's, so it is scored "
                         "on the tags both share by alt_i2v.compare(data, [model]) (--evaluate does so itself)")
    saved = ModelDir(model_dir).read()
    config, vocab, thresholds = saved.config, saved.vocab, saved.thresholds
    image_size = saved.image.image_size
    model = with_tta(load_model(model_dir), saved.tta)  # as the tagger predicts, and as it was calibrated
    names = vocab.names
    thr = thresholds_vector(thresholds, names)
    # the store must hold the pixels the model was trained on: same vocabulary, size and resize mode
    store = open_store(data_dir, vocab=vocab, image_size=image_size, resize=saved.image.resize)
    try:
        if store.count(split) == 0:
            raise AltI2VError(f"the {split} split of {store.path} has no images; evaluate another --split")
        readers = ReaderPool(store, processes=min(resolve_workers(workers), store.num_shards)) \
            if store.num_shards > 1 else None
        try:
            keys, y_true, y_prob = predict_split(model, store, split, batch_size=batch_size or 64, workers=workers,
                                                 quiet=quiet, desc=f"evaluate {split}", readers=readers)
        finally:
            if readers is not None:
                readers.close()
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

    reports = saved.dir.reports
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
    from ..data.posts import iter_posts, posts_path

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

    from ..fsutil import atomic_write_bytes

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
        from ..data.imaging import load_image

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


__all__ = ["evaluate", "EvalResult", "predict_split"]
