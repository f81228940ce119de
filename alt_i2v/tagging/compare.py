"""Scoring any model on a user's own labelled dataset, and several side by side (``--evaluate --data DATA
--model A --model B ...``): one report on the same images of the same split.

Every model reads the split's image files with its own loader (its input size and fit), so an alt-i2v
model, a WD14 tagger and a DeepDanbooru project see the same pictures as they expect them. Only the tags a
model shares with the dataset's vocabulary can be scored: those are, the others are listed. The
comparison reports, per model, mAP and micro/macro F1 at the model's own thresholds (calibrated ones for an
alt-i2v model, the family's defaults for a ready model) on the tags every model shares with the data, the
same on each model's own shared tags, and the average precision of each shared tag per model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AltI2VError, ImageLoadError, UsageError
from ..training.metrics import average_precision, prf_at

COMPARE_VERSION = 1


@dataclass
class SplitImages:
    """The labelled images of one split: post ids, files and the data vocabulary's labels (N, T)."""

    ids: list
    files: list[str]
    labels: np.ndarray
    names: list[str]
    split: str


def split_images(data_dir: str | os.PathLike, split: str = "test") -> SplitImages:
    """The posts of ``split`` with their image files and labels over ``DATA/vocab.json``. The split is the
    store's (the same hash of the id, with the fractions the store was built with; 0.1/0.1 without one)."""
    from ..data.posts import iter_posts, post_image_path, posts_path
    from ..data.layout import DataDir
    from ..store import SPLITS, open_store, split_of
    from ..data.vocab import Vocab

    data = DataDir(data_dir)
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not posts_path(data_dir).exists():
        raise AltI2VError(f"{posts_path(data_dir)}: no posts; --evaluate scores a labelled dataset "
                          "(--scrape or --import one first)")
    vocab = Vocab.load(data.vocab)
    val, test = 0.1, 0.1
    if (data.store / "CURRENT").is_file() or (data.store / "meta.json").is_file():
        with open_store(data_dir, lock=False) as store:
            fractions = store.meta.get("split") or {}
        val, test = float(fractions.get("val", val)), float(fractions.get("test", test))
    ids, files, rows = [], [], []
    for post in iter_posts(data_dir):
        if split_of(post["id"], val, test) != split or not post.get("file"):
            continue
        ids.append(post["id"])
        files.append(str(post_image_path(post, data_dir)))
        rows.append(vocab.labels(post))
    labels = np.zeros((len(ids), len(vocab)), np.float32)
    for i, row in enumerate(rows):
        labels[i, row] = 1.0
    if not ids:
        raise AltI2VError(f"{data.root}: the {split} split has no images; evaluate another --split")
    return SplitImages(ids=ids, files=files, labels=labels, names=list(vocab.names), split=split)


def model_probabilities(tagger: Any, files: Sequence[str], *, quiet: bool = True, desc: str = "predict"
                        ) -> tuple[np.ndarray, list[int]]:
    """Probabilities (N, T) of ``files`` (NaN rows for those that fail) and the failed positions."""
    from ..progress import bar

    out = np.full((len(files), len(tagger.vocab)), np.nan, np.float32)
    failed: list[int] = []
    with bar(total=len(files), desc=desc, unit="img", quiet=quiet) as progress:
        for start, loaded, ok, probs in tagger.iter_probabilities(list(files)):
            for r, i in enumerate(ok):
                out[start + i] = probs[r]
            failed += [start + i for i, x in enumerate(loaded) if isinstance(x, ImageLoadError)]
            progress.update(len(loaded))
    return out, failed


def score(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray) -> dict[str, Any]:
    """mAP (over tags with a positive), micro/macro F1, precision and recall at ``thresholds`` ((T,) or
    per image (N, T)), and per-tag AP (NaN where a tag has no positive)."""
    if y_true.shape[1] == 0:
        return {"map": None, "micro_f1": None, "macro_f1": None, "micro_precision": None, "micro_recall": None,
                "tags": 0, "tags_present": 0, "_ap": np.empty(0)}
    ap = average_precision(y_true, y_prob)
    prf = prf_at(y_true, y_prob, thresholds)
    present = np.isfinite(ap)
    return {"map": float(np.mean(ap[present])) if present.any() else None,
            "micro_f1": prf["micro_f1"], "macro_f1": prf["macro_f1"], "micro_precision": prf["micro_precision"],
            "micro_recall": prf["micro_recall"], "tags": int(y_true.shape[1]), "tags_present": int(present.sum()),
            "_ap": ap}


@dataclass
class CompareResult:
    """What :func:`compare` measured and wrote."""

    split: str
    images: int
    models: list[dict[str, Any]]
    common_tags: list[str]
    per_tag: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        rows: dict[str, Any] = {"split": f"{self.split} ({self.images} images, {len(self.common_tags)} tags "
                                         "shared by the data and every model)"}
        for m in self.models:
            c = m["common"]
            rows[m["name"]] = (f"mAP {_fmt(c['map'])}, micro F1 {_fmt(c['micro_f1'])}, macro F1 "
                               f"{_fmt(c['macro_f1'])} ({m['family']}, {m['shared']} tags shared, "
                               f"{len(m['not_in_model'])} of the data's not in it)")
        if self.failed:
            rows["images left out"] = f"{len(self.failed)} (first: {self.failed[0]['error'][:80]})"
        rows["report"] = next((f for f in self.files if f.endswith(".md")), "-")
        rows["seconds"] = round(self.seconds, 1)
        return rows


def _name(tagger: Any, taken: set[str]) -> str:
    base = Path(tagger.model_dir).resolve().name or "model"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def compare(data_dir: str | os.PathLike, models: Sequence[Any], split: str = "test", *, out: Any = None,
            quiet: bool = False, batch_size: int | None = None, workers: int | None = None) -> CompareResult:
    """Score ``models`` (model directories of any family, or Taggers) on the same images of ``split`` of
    the dataset, write ``compare.json`` and ``report.md`` into ``out`` (default
    ``DATA/reports/compare-<split>/``; ``DATA/reports/evaluate-<model>-<split>/`` for one model)."""
    from ..fsutil import atomic_write_json, atomic_write_text
    from ..data.layout import DataDir
    from .tagger import Tagger

    t0 = time.perf_counter()
    if not models:
        raise UsageError("--evaluate needs --model DIR (repeat it to compare models)")
    images = split_images(data_dir, split)
    taggers = [m if isinstance(m, Tagger) or hasattr(m, "iter_probabilities") else
               Tagger(m, batch_size=batch_size, workers=workers) for m in models]
    taken: set[str] = set()
    names = [_name(t, taken) for t in taggers]
    probs, failed_any = [], set()
    for t, name in zip(taggers, names):
        p, failed = model_probabilities(t, images.files, quiet=quiet, desc=f"evaluate {name}")
        probs.append(p)
        failed_any.update(failed)
    keep = np.array([i for i in range(len(images.files)) if i not in failed_any], dtype=np.int64)
    if len(keep) == 0:
        raise AltI2VError(f"no image of the {split} split could be read (first: {images.files[0]})")
    y_all = images.labels[keep]
    data_index = {n: j for j, n in enumerate(images.names)}
    shared_of = [[n for n in images.names if n in t.vocab.index] for t in taggers]
    common = [n for n in images.names if all(n in t.vocab.index for t in taggers)]
    report_models, ap_common = [], []
    for t, name, p, shared in zip(taggers, names, probs, shared_of):
        thr_all = np.asarray(t.thresholds_matrix(p[keep]) if hasattr(t, "thresholds_matrix")
                             else t.thresholds_for(None), np.float32)

        def cols(tags: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            mi = [t.vocab.index[n] for n in tags]
            di = [data_index[n] for n in tags]
            thr = thr_all[..., mi]
            return y_all[:, di], p[keep][:, mi], thr

        own = score(*cols(shared))
        com = score(*cols(common))
        ap_common.append(com.pop("_ap"))
        own.pop("_ap")
        report_models.append({
            "name": name, "path": str(Path(t.model_dir).resolve()), "family": getattr(t, "family", "alt-i2v"),
            "thresholds": getattr(t, "threshold_source", "calibrated"), "tags": len(t.vocab), "shared": len(shared),
            "common": _rounded(com), "own_shared": _rounded(own),
            "not_in_model": [n for n in images.names if n not in t.vocab.index]})
    per_tag = []
    support = y_all.sum(0)
    for k, n in enumerate(common):
        per_tag.append({"tag": n, "support": int(support[data_index[n]]),
                        "ap": {m: _r(ap[k]) for m, ap in zip(names, ap_common)}})
    per_tag.sort(key=lambda r: (-r["support"], r["tag"]))
    failed = [{"file": images.files[i], "error": f"{images.files[i]}: could not be read by every model"}
              for i in sorted(failed_any)]
    data = DataDir(data_dir)
    if out is None:
        out = data.reports / (f"compare-{split}" if len(taggers) > 1 else f"evaluate-{names[0]}-{split}")
    out = Path(out)
    record = {"version": COMPARE_VERSION, "split": split, "images": int(len(keep)), "data": str(data.root.resolve()),
              "common_tags": common, "models": report_models, "per_tag_ap": per_tag, "left_out": failed,
              "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    files = [str(atomic_write_json(out / "compare.json", record)),
             str(atomic_write_text(out / "report.md", _report_md(record)))]
    return CompareResult(split=split, images=int(len(keep)), models=report_models, common_tags=common,
                         per_tag=per_tag, files=files, failed=failed, seconds=time.perf_counter() - t0)


def _r(v: Any) -> Any:
    if v is None:
        return None
    v = float(v)
    return None if np.isnan(v) else round(v, 6)


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_r(v) if isinstance(v, float) else v) for k, v in d.items()}


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def _report_md(rec: dict[str, Any]) -> str:
    models = rec["models"]
    title = "Comparison" if len(models) > 1 else "Evaluation"
    lines = [f"# {title} on the {rec['split']} split of `{rec['data']}`", "",
             f"{rec['images']} images; {len(rec['common_tags'])} tags of the dataset's vocabulary are in every model "
             "and scored below. Each model at its own thresholds (alt-i2v: calibrated per tag; WD14: general "
             "0.35, character 0.85; DeepDanbooru: 0.5).", "",
             "| model | family | mAP | micro F1 | macro F1 | micro P | micro R | tags shared with the data |",
             "|---|---|---|---|---|---|---|---|"]
    for m in models:
        c = m["common"]
        lines.append(f"| {m['name']} | {m['family']} | {_fmt(c['map'])} | {_fmt(c['micro_f1'])} | "
                     f"{_fmt(c['macro_f1'])} | {_fmt(c['micro_precision'])} | {_fmt(c['micro_recall'])} | "
                     f"{m['shared']} |")
    if len(models) > 1:
        lines += ["", "On each model's own shared tags (not the same tags for every model):", "",
                  "| model | tags | mAP | micro F1 | macro F1 |", "|---|---|---|---|---|"]
        for m in models:
            o = m["own_shared"]
            lines.append(f"| {m['name']} | {o['tags']} | {_fmt(o['map'])} | {_fmt(o['micro_f1'])} | "
                         f"{_fmt(o['macro_f1'])} |")
    names = [m["name"] for m in models]
    lines += ["", "## Average precision per shared tag", "", "| tag | images | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for r in rec["per_tag_ap"]:
        lines.append(f"| {r['tag']} | {r['support']} | " + " | ".join(_fmt(r["ap"][n]) for n in names) + " |")
    lines += ["", "## Not scored: tags of the dataset a model does not have", ""]
    for m in models:
        miss = m["not_in_model"]
        lines.append(f"- {m['name']}: {len(miss)}" + (f" ({', '.join(miss[:30])}{', ...' if len(miss) > 30 else ''})"
                                                      if miss else ""))
    if rec["left_out"]:
        lines += ["", f"{len(rec['left_out'])} images could not be read and are left out for every model."]
    return "\n".join(lines) + "\n"


__all__ = ["compare", "CompareResult", "split_images", "score", "model_probabilities"]
