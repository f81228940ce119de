"""The demo run: generated data through vocab -> build -> train (tiny backbone) -> evaluate -> tag ->
similar, offline, printing what each stage did and reusing whatever an earlier run already finished.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.layout import DataDir
from ..data.synthetic import generate_demo_dataset
from ..errors import AltI2VError
from ..fsutil import read_json_object
from ..model.modeldir import ModelDir

# ---------------------------------------------------------------------------------------------------------
# The end-to-end run


@dataclass(frozen=True)
class DemoSettings:
    """One demo size: the data it generates and the training it runs (all passed to the stages)."""

    name: str
    n_images: int
    source_size: int  # pixels of the generated files
    image_size: int  # pixels of the store and the model
    train: dict = field(default_factory=dict)  # train() settings
    min_micro_f1: float = 0.95  # the test score this demo is expected to reach
    seed: int = 0
    show: int = 4  # images tagged on screen


FULL = DemoSettings("full", n_images=3000, source_size=64, image_size=48, min_micro_f1=0.95, train={
    "backbone": "tiny", "weights": None, "filters": (16, 32, 64), "epochs": 8, "batch_size": 32, "lr": 2e-3,
    "zoom": 0.0, "patience": 0})
QUICK = DemoSettings("quick", n_images=800, source_size=64, image_size=32, min_micro_f1=0.8, train={
    "backbone": "tiny", "weights": None, "filters": (16, 32, 64), "epochs": 5, "batch_size": 32, "lr": 3e-3,
    "zoom": 0.0, "patience": 0})


@dataclass
class DemoResult:
    """What a demo run produced: where everything is, the test scores, and what each stage took."""

    out_dir: Path
    data_dir: Path
    model_dir: Path
    quick: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    min_micro_f1: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    reused: list[str] = field(default_factory=list)
    tagged: list[dict[str, Any]] = field(default_factory=list)  # {"file", "predicted", "true"}
    similar: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def micro_f1(self) -> float:
        return float(self.metrics.get("micro_f1", 0.0))

    @property
    def passed(self) -> bool:
        return self.micro_f1 >= self.min_micro_f1

    def summary(self) -> dict[str, Any]:
        m = self.metrics
        rows: dict[str, Any] = {
            "demo": f"{'quick' if self.quick else 'full'} ({self.out_dir})",
            "test micro F1": f"{self.micro_f1:.4f} (expected >= {self.min_micro_f1}: "
                             f"{'yes' if self.passed else 'NO'})",
            "test macro F1 / mAP": f"{m.get('macro_f1', 0):.4f} / {m.get('map', 0):.4f}",
        }
        if self.similar.get("neighbour_jaccard") is not None:
            sim = self.similar
            rows["similar images"] = (f"top-{sim['k']} neighbours share {sim['neighbour_jaccard']:.0%} of their tags "
                                      f"(random pairs: {sim['random_jaccard']:.0%})")
        rows["stages (s)"] = {k: round(v, 1) for k, v in self.stages.items()}
        rows["reused"] = ", ".join(self.reused) or "nothing (first run)"
        rows["seconds"] = round(self.seconds, 1)
        return rows

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("out_dir", "data_dir", "model_dir"):
            out[k] = str(out[k])
        out["stages"] = {k: round(v, 2) for k, v in self.stages.items()}
        out["seconds"] = round(self.seconds, 2)
        out["micro_f1"], out["passed"] = self.micro_f1, self.passed
        return out


def _say(quiet: bool, text: str = "") -> None:
    if not quiet:
        print(text, flush=True)


def _fresh_metrics(model_dir: ModelDir) -> dict | None:
    """Test metrics of the current model.keras, if an earlier run already evaluated it."""
    path = model_dir.reports / "metrics.json"
    try:
        if path.stat().st_mtime < model_dir.model_file.stat().st_mtime:
            return None
        metrics = read_json_object(path, "metrics report")
    except (OSError, AltI2VError):
        return None
    return metrics if metrics.get("split") == "test" and "micro_f1" in metrics else None


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def run_demo(out_dir: str | os.PathLike = "alt-i2v-demo", *, quick: bool = False, quiet: bool = False
             ) -> DemoResult:
    """Generate the demo data in ``out_dir`` and run every stage on it, printing what each did.

    Layout: ``OUT/data`` (dataset, vocab, store), ``OUT/model`` (model directory with curves.png and
    reports/report.md), ``OUT/similar.index`` and ``OUT/demo.json`` (this run's summary); ``--quick`` uses
    ``OUT/quick/`` the same way. Anything an earlier run finished is reused, an interrupted training resumes.
    """
    from ..data.posts import iter_posts, post_image_path
    from ..fsutil import atomic_write_json
    from ..progress import summary
    from ..store import build_store
    from ..data.vocab import Vocab, build_vocab

    cfg = QUICK if quick else FULL
    t_start = time.perf_counter()
    out = Path(out_dir) / "quick" if quick else Path(out_dir)
    data, model_dir = out / "data", out / "model"
    dd, md = DataDir(data), ModelDir(model_dir)
    result = DemoResult(out_dir=out, data_dir=data, model_dir=model_dir, quick=quick, min_micro_f1=cfg.min_micro_f1)
    _say(quiet, f"alt-i2v demo ({cfg.name}): {cfg.n_images} generated illustrations -> vocab -> store -> "
                f"train (tiny CNN, {cfg.image_size}px) -> evaluate -> tags -> similar images, in {out}")

    def stage(name: str, t0: float, reused: bool = False) -> None:
        result.stages[name] = time.perf_counter() - t0
        if reused:
            result.reused.append(name)

    # 1. data
    t0 = time.perf_counter()
    gen = generate_demo_dataset(data, cfg.n_images, seed=cfg.seed, size=cfg.source_size, quiet=quiet)
    stage("generate", t0, gen["reused"])
    counts = gen.get("tag_counts", {})
    summary("1/7 generate", {
        "dataset": f"{data} ({'already there' if gen['reused'] else 'written'})",
        "images": f"{cfg.n_images} ({cfg.source_size}x{cfg.source_size}, seed {cfg.seed})",
        "tags": f"{len(counts)} distinct; most common: " + ", ".join(list(counts)[:6]),
        "rarest": ", ".join(f"{t} ({c})" for t, c in list(counts.items())[-3:]),
        "seconds": round(result.stages["generate"], 1)}, quiet=quiet)

    # 2. vocabulary
    t0 = time.perf_counter()
    vocab_reused = dd.vocab.exists()
    vocab = Vocab.load(data) if vocab_reused else build_vocab(data)
    stage("vocab", t0, vocab_reused)
    cats: dict[str, int] = {}
    for c in vocab.tag_categories:
        cats[c] = cats.get(c, 0) + 1
    summary("2/7 vocab", {"tags": len(vocab), "by category": cats, "written": str(dd.vocab)}, quiet=quiet)

    # 3. store
    t0 = time.perf_counter()
    built = build_store(data, image_size=cfg.image_size, quiet=quiet)
    stage("build", t0, built.stored == 0)
    summary("3/7 build", {"store": str(built.path), "stored now": built.stored, "already stored": built.already,
                          "records per split": built.counts, "seconds": round(result.stages["build"], 1)},
            quiet=quiet)

    # 4. training
    from ..training.run import train

    t0 = time.perf_counter()
    if md.is_finished():
        stage("train", t0, True)
        summary("4/7 train", {"model": f"{model_dir} (already trained; delete it to train again)"}, quiet=quiet)
    else:
        resume = md.config_file.exists()
        trained = train(data, model_dir, resume=resume, quiet=quiet, **cfg.train)
        stage("train", t0)
        summary("4/7 train", trained.summary(), quiet=quiet)

    # 5. evaluation on the test split
    t0 = time.perf_counter()
    metrics = _fresh_metrics(md)
    if metrics is None:
        from ..training.evaluation import evaluate

        evaluated = evaluate(data, model_dir, split="test", quiet=quiet)
        metrics = evaluated.metrics
        stage("evaluate", t0)
        summary("5/7 evaluate", evaluated.summary(), quiet=quiet)
    else:
        stage("evaluate", t0, True)
        summary("5/7 evaluate", {"test micro F1": metrics["micro_f1"], "macro F1": metrics.get("macro_f1"),
                                 "mAP": metrics.get("map"), "report": str(md.reports / "report.md"),
                                 "note": "already evaluated"}, quiet=quiet)
    result.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}

    # 6. tag a few test images
    from ..tagging.tagger import Tagger

    t0 = time.perf_counter()
    tagger = Tagger(model_dir)
    posts = {p["id"]: p for p in iter_posts(data)}
    test_ids = [pid for pid in posts if _split_of(pid) == "test"]
    shown = test_ids[:cfg.show]
    files = [str(post_image_path(posts[pid], data)) for pid in shown]
    predicted = tagger.predict_tags(files)
    _say(quiet, "== 6/7 tags (test images the model never saw; calibrated thresholds) ==")
    for pid, file, pred in zip(shown, files, predicted):
        true = {t for c in vocab.categories for t in posts[pid]["tags"].get(c, ())}
        got = set(pred)
        result.tagged.append({"id": pid, "file": file, "predicted": pred, "true": sorted(true)})
        _say(quiet, f"  {os.path.relpath(file, out)}")
        _say(quiet, "    predicted: " + ", ".join(f"{t} {p:.2f}" for t, p in pred.items()))
        verdict = "all tags right" if got == true else \
            "; ".join(x for x in (f"missed {', '.join(sorted(true - got))}" if true - got else "",
                                  f"extra {', '.join(sorted(got - true))}" if got - true else "") if x)
        _say(quiet, f"    true tags: {len(true)}, {verdict}")
    stage("tag", t0)

    # 7. similar images
    t0 = time.perf_counter()
    result.similar, index_reused = _similar(tagger, data, out / "similar.index", posts, test_ids, shown[0], quiet)
    stage("similar", t0, index_reused)

    result.seconds = time.perf_counter() - t_start
    result.paths = {
        "posts": str(dd.posts), "vocab": str(dd.vocab), "store": str(dd.store),
        "model": str(md.model_file), "thresholds": str(md.thresholds_file),
        "history": str(md.history_file), "curves": str(md.curves_file),
        "metrics": str(md.reports / "metrics.json"), "report": str(md.reports / "report.md"),
        "index": str(out / "similar.index"), "summary": str(out / "demo.json")}
    atomic_write_json(out / "demo.json", {**result.to_json(), "settings": {**asdict(cfg), "train": {
        k: list(v) if isinstance(v, tuple) else v for k, v in cfg.train.items()}}})
    summary("demo done", {**result.summary(), **{k: result.paths[k] for k in
                                                  ("model", "curves", "report", "index", "summary")}}, quiet=quiet)
    if not result.passed:
        _say(quiet, f"note: test micro F1 {result.micro_f1:.4f} is below the {cfg.min_micro_f1} this demo usually "
                    "reaches (a busy machine does not change scores; a changed backbone or settings may)")
    _say(quiet, f"next: alt-i2v --pred {_short(files[0])} --model {_short(model_dir)}")
    return result


def _short(path: str | os.PathLike) -> str:
    """The shorter of a path relative to the working directory and its absolute form."""
    path = os.path.abspath(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return rel if len(rel) < len(path) else path


def _split_of(pid: Any) -> str:
    from ..store import split_of

    return split_of(pid)


def _similar(tagger: Any, data: Path, index_path: Path, posts: dict, test_ids: list, query_id: Any,
             quiet: bool, k: int = 5) -> tuple[dict[str, Any], bool]:
    """Index every stored image (or reuse the index of this model), query one test image, and measure
    how many tags the nearest neighbours of each test image share with it versus random pairs."""
    from ..data.posts import post_image_path
    from ..progress import summary
    from ..search import SimilarityIndex, build_index

    index = None
    if index_path.exists():
        try:
            index = SimilarityIndex.load(index_path)
            if (index.info.get("model") or {}).get("fingerprint") != tagger.fingerprint():
                index = None
        except Exception:  # noqa: BLE001 - a stale or damaged index is simply rebuilt
            index = None
    reused = index is not None
    if index is None:
        index, _ = build_index(tagger, data=data, quiet=quiet)  # from the store: no image is decoded again
        index.save(index_path)

    def tags(pid: Any) -> set:
        t = posts[pid]["tags"]
        return {x for c in tagger.vocab.categories for x in t.get(c, ())}

    query_file = str(post_image_path(posts[query_id], data))
    hits = [(i, s) for i, s in index.search(tagger.embed(query_file), k + 1) if i != query_id][:k]
    _say(quiet, f"== 7/7 similar images (cosine over {len(index)} embeddings) ==")
    _say(quiet, f"  query {os.path.relpath(query_file, data.parent)}: {', '.join(sorted(tags(query_id)))}")
    for rank, (pid, score) in enumerate(hits, 1):
        shared = tags(pid) & tags(query_id)
        _say(quiet, f"  {rank}. {score:.3f}  {os.path.relpath(index.path_at(index.position(pid)), data.parent)}  "
                    f"shares {len(shared)}/{len(tags(query_id))} tags")
    # how good the neighbourhoods are, over the whole test split
    indexed = set(index.ids)
    q_ids = [i for i in test_ids if i in indexed]
    vecs = index.vectors()[[index.position(i) for i in q_ids]].astype(np.float32)
    near = index.search(vecs, k + 1)
    jac = [np.mean([_jaccard(tags(q), tags(i)) for i, _ in row if i != q][:k]) for q, row in zip(q_ids, near)]
    rng = np.random.default_rng(0)
    all_ids = index.ids
    rand = [_jaccard(tags(q), tags(all_ids[int(j)])) for q in q_ids for j in rng.integers(len(all_ids), size=k)]
    out = {"query": query_file, "neighbours": [{"id": i, "cosine": s} for i, s in hits], "k": k,
           "neighbour_jaccard": float(np.mean(jac)), "random_jaccard": float(np.mean(rand)),
           "index": str(index_path), "images": len(index)}
    summary("similar", {"index": f"{index_path} ({'reused' if reused else 'built'}, {len(index)} images)",
                        "neighbour quality": f"top-{k} neighbours of the {len(q_ids)} test images share "
                                             f"{out['neighbour_jaccard']:.0%} of their tags (Jaccard); "
                                             f"random pairs {out['random_jaccard']:.0%}"}, quiet=quiet)
    return out, reused
