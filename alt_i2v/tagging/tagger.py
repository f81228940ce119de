"""Using a model: tags with probabilities and embeddings, one model loaded once. The model is an alt-i2v
model directory, a WD14 tagger folder or a DeepDanbooru project (:mod:`alt_i2v.ready` tells them apart),
behind one interface.

Every input goes through :func:`alt_i2v.data.imaging.load_image_config` with the image settings the model was
trained with, so prediction sees exactly the pixels the build stored. Images are decoded while the previous
batch is in the model (by worker processes for many files, else threads); a bad image costs only its own
result.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..config import resolve_workers
from ..errors import AltI2VError, ImageLoadError, UsageError
from ..fsutil import IMAGE_SUFFIXES, file_digest
from ..data.imaging import DecodePool, describe, load_image_config
from ..model.modeldir import ModelDir
from .inputs import BatchImageError, _check_errors, as_list, check_top_k, list_images
from ..model.thresholds import (DEFAULT_THRESHOLD, MCUT, check_probability, parse_threshold, resolve_mcut,
                                thresholds_vector)

DEFAULT_BATCH_SIZE = 64
PROCESS_DECODE_MIN = 256  # files from which --pred / predict_tags decode in worker processes, not threads,
PROCESS_DECODE_WORKERS = 4  # ... given this many workers: on 2-3 cores threads decode faster (bench_predict)


# ---------------------------------------------------------------------------------------------------------
# Tagger


class Tagger:
    """A model loaded once: ``.predict_tags(images)``, ``.embed(images)``, ``.vocab``, ``.family``.

    An alt-i2v model directory loads ``model.keras`` with safe_mode (no pickle, no lambdas), and through
    :class:`ModelDir` the ``vocab.json``, ``config.json`` (image settings) and ``thresholds.json`` (per-tag
    thresholds calibrated on the validation split); ``predictor`` is what its predictions run: the network,
    or the mean over each picture and its mirror image where the model's ``tta`` says so. A WD14 folder
    runs ``model.onnx`` on onnxruntime, a DeepDanbooru project its Keras network; both take their tags and
    categories from their own files and their family's default thresholds per category, and report their
    rating outputs apart from the tags (:meth:`ratings_from_probs`).
    """

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int | None = None, workers: int | None = None):
        from ..ready import ALT_I2V, detect

        self.model_dir = Path(model_dir)
        ModelDir(model_dir).require()
        self.family = detect(model_dir)
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
        if self.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        self.workers = resolve_workers(workers)
        self.onnx = None  # the onnxruntime runner of a WD14 model (self.model is then None)
        self.tta = "none"  # an alt-i2v model's test-time augmentation (config.json): self.predictor runs it
        if self.family == ALT_I2V:
            self._load_own()
        else:
            self._load_ready()
        n_out = int(self.onnx.num_tags if self.onnx is not None else self.model.outputs[0].shape[-1])
        if n_out != len(self.vocab):
            raise AltI2VError(f"{self.model_dir}: the model has {n_out} outputs but vocab.json {len(self.vocab)} "
                              "tags; the directory mixes files of different runs")
        self._names = np.asarray(self.vocab.names, dtype=object)
        self._categories = np.asarray(self.vocab.tag_categories, dtype=object)
        # ratings of a ready model are reported apart from its tags
        self._tag_mask = ~(self._categories == "rating") if self.family != ALT_I2V else \
            np.ones(len(self.vocab), bool)
        self._embed_model = None
        self._lock = threading.Lock()
        self._fingerprint: str | None = None

    def _load_own(self) -> None:
        from ..model.build import with_tta
        from ..model.modeldir import load_model

        self.files = ModelDir(self.model_dir).read()
        self.config = self.files.config
        self.vocab = self.files.vocab
        self.image_config = self.files.image
        self.weights_file = self.files.dir.model_file
        self.model = load_model(self.model_dir)
        self.tta = self.files.tta
        self.predictor = with_tta(self.model, self.tta)
        thresholds = self.files.thresholds
        self.calibrated = thresholds is not None
        self.global_threshold = thresholds["global"] if thresholds else DEFAULT_THRESHOLD
        self.thresholds = thresholds_vector(thresholds, self.vocab.names)
        self.threshold_source = "calibrated" if thresholds else f"{DEFAULT_THRESHOLD} (no thresholds.json)"

    def _load_ready(self) -> None:
        from ..ready import WD14, read_ready

        ready = read_ready(self.model_dir)
        self.files = ready
        self.vocab = ready.vocab
        self.image_config = ready.image
        self.weights_file = ready.weights
        self.config = {"family": self.family, "weights": ready.weights.name,
                       **{k: v for k, v in ready.info.items() if k != "proto"}}
        net = ready.runner()
        self.onnx, self.model = (net, None) if self.family == WD14 else (None, net)
        self.predictor = self.model
        by_category = ready.thresholds
        self.calibrated = False
        self.global_threshold = float(by_category["general"])
        self.thresholds = np.array([by_category.get(c, DEFAULT_THRESHOLD) for c in self.vocab.tag_categories],
                                   np.float32)
        self.threshold_source = ", ".join(f"{c} {v}" for c, v in by_category.items()) + f" ({self.family} default)"

    # ------------------------------------------------------------------------------------------ metadata
    @property
    def embedding_dim(self) -> int:
        from ..model.build import embedding_dim

        if self.onnx is not None:
            return self.onnx.embedding_dim
        return embedding_dim(self.model)

    @property
    def tag_categories(self) -> dict[str, str]:
        return dict(zip(self.vocab.names, self.vocab.tag_categories))

    def fingerprint(self) -> str:
        """sha256 of the weights file (model.keras, model.onnx or the .h5): tells whether embeddings came
        from these exact weights."""
        if self._fingerprint is None:
            self._fingerprint = file_digest(self.weights_file)
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        """What an index or embedding file records about the model that made it."""
        return {"path": str(self.model_dir.resolve()), "fingerprint": self.fingerprint(),
                "embedding_dim": self.embedding_dim, "vocab_sha256": self.vocab.sha256,
                "image": self.image_config.get_config()}

    def thresholds_for(self, threshold: Any = None) -> np.ndarray:
        """Per-tag thresholds (T,) for ``threshold``: None = calibrated (a ready model: its family's default
        per category); a float for every tag; ``"mcut"`` for MCut in every category but ratings; a dict by
        category (``{"general": 0.4, "character": "mcut"}``), by tag name, or ``"default"`` for the rest
        (tag names beat categories, categories beat ``default``; what none names stays calibrated). MCut
        entries hold :data:`~alt_i2v.model.thresholds.MCUT` until :meth:`row_thresholds` resolves them
        for an image."""
        threshold = parse_threshold(threshold)
        if threshold is None:
            return self.thresholds.copy()
        if isinstance(threshold, str):
            out = self.thresholds.copy()
            out[self._categories != "rating"] = check_probability(threshold, "threshold", mcut=True)
            return out
        if not isinstance(threshold, dict):
            return np.full(len(self.vocab), check_probability(threshold, "threshold"), np.float32)
        out = self.thresholds.copy()
        cats = set(self.vocab.tag_categories) | set(self.vocab.categories)
        index = self.vocab.index
        unknown = [k for k in threshold if k not in cats and k not in index and k not in ("default", "*")]
        if unknown:
            raise UsageError(f"threshold keys {unknown} are neither a category of this model "
                             f"({', '.join(sorted(cats))}), a tag of its vocabulary, nor 'default'")
        for key in ("default", "*"):
            if key in threshold:
                out[:] = check_probability(threshold[key], f"threshold {key}", mcut=True)
        for key, value in threshold.items():
            if key in cats:
                out[self._categories == key] = check_probability(value, f"threshold {key}", mcut=True)
        for key, value in threshold.items():
            if key in index and key not in cats:
                out[index[key]] = check_probability(value, f"threshold {key}")
        return out

    # ------------------------------------------------------------------------------------------ forward
    def _forward(self, model: Any, batch: np.ndarray) -> Any:
        from ..model.build import predict_batch

        if self.onnx is not None:  # onnxruntime: probabilities and the head's input in one run
            with self._lock:
                probs, emb = self.onnx.run(np.asarray(batch))
            if isinstance(model, str):
                self.onnx.require_embedding()
                return probs, emb
            return probs
        with self._lock, warnings.catch_warnings():
            # Keras' TF backend converts outputs with np.array(tensor), which NumPy 2 flags; harmless
            warnings.simplefilter("ignore", DeprecationWarning)
            return predict_batch(model, batch, self.batch_size)

    def _embedder(self) -> Any:
        if self.onnx is not None:
            return "embed"
        if self._embed_model is None:
            from ..model.build import embedding_model, with_tta

            self._embed_model = with_tta(embedding_model(self.model), self.tta)
        return self._embed_model

    def _load(self, source: Any) -> np.ndarray | ImageLoadError:
        try:
            return load_image_config(source, self.image_config)
        except ImageLoadError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a decoder bug costs this image, never the batch
            return ImageLoadError("error", f"{describe(source)}: {type(e).__name__}: {e}")

    def iter_batches(self, sources: Sequence[Any], fn: Callable[[np.ndarray], Any]
                     ) -> Iterator[tuple[int, list, list[int], Any]]:
        """Yield ``(start, loaded, ok, outputs)`` per batch: ``loaded`` holds arrays or ImageLoadError,
        ``ok`` the positions (in the batch) that reached the model, ``outputs`` = ``fn(stacked ok images)``.
        The next batches are decoded while ``fn`` runs: by worker processes for many files
        (:class:`~alt_i2v.data.imaging.DecodePool`), else on threads."""
        n, bs = len(sources), self.batch_size
        if n == 0:
            return
        if n > bs and self.onnx is None:  # many batches: pad the short ones so a Keras step compiles once
            # (onnxruntime compiles nothing per shape: padding would only add work)
            run = fn

            def fn(batch: np.ndarray) -> Any:
                k = len(batch)
                if k == bs:
                    return run(batch)
                return run(np.concatenate([batch, np.zeros((bs - k,) + batch.shape[1:], batch.dtype)]))[:k]

        if self.workers >= PROCESS_DECODE_WORKERS and n >= PROCESS_DECODE_MIN and \
                all(isinstance(s, (str, os.PathLike)) for s in sources):
            with DecodePool(self.image_config, min(self.workers, math.ceil(n / 8))) as pool:
                for start, loaded in zip(range(0, n, bs), pool.batches(sources, bs)):
                    ok = [i for i, x in enumerate(loaded) if isinstance(x, np.ndarray)]
                    yield start, loaded, ok, (fn(np.stack([loaded[i] for i in ok])) if ok else None)
            return
        loader = ThreadPoolExecutor(max_workers=max(1, self.workers))
        prefetch = ThreadPoolExecutor(max_workers=1)
        try:
            def load(start: int) -> list:
                part = sources[start:start + bs]
                return list(loader.map(self._load, part)) if len(part) > 1 else [self._load(part[0])]

            future = prefetch.submit(load, 0)
            for start in range(0, n, bs):
                loaded = future.result()
                if start + bs < n:
                    future = prefetch.submit(load, start + bs)
                ok = [i for i, x in enumerate(loaded) if isinstance(x, np.ndarray)]
                out = fn(np.stack([loaded[i] for i in ok])) if ok else None
                yield start, loaded, ok, out
        finally:
            prefetch.shutdown(wait=True, cancel_futures=True)
            loader.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ tags
    def probabilities(self, images: Any) -> np.ndarray:
        """Raw sigmoid outputs (N, T) float32 of a batch that must load (an ImageLoadError otherwise)."""
        sources, single = as_list(images)
        out = np.empty((len(sources), len(self.vocab)), np.float32)
        for start, loaded, ok, probs in self.iter_probabilities(sources):
            for x in loaded:
                if isinstance(x, ImageLoadError):
                    raise x
            out[start:start + len(loaded)] = probs
        return out[0] if single else out

    def probabilities_of_arrays(self, images: np.ndarray) -> np.ndarray:
        """Raw sigmoid outputs (N, T) float32 of already loaded uint8 images (N, S, S, 3): the forward
        pass of :meth:`probabilities` without the loading (the web server decodes uploads itself)."""
        return np.asarray(self._forward(self.predictor, np.asarray(images)), dtype=np.float32)

    def row_thresholds(self, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        """``thresholds`` with MCut entries resolved for the probabilities ``probs`` ((T,) or (N, T))."""
        return resolve_mcut(probs, thresholds, self._categories)

    def thresholds_matrix(self, probs: np.ndarray, threshold: Any = None) -> np.ndarray:
        """Thresholds (N, T) of the probability rows ``probs`` for ``threshold`` (MCut resolved per row)."""
        thr = self.row_thresholds(probs, self.thresholds_for(threshold))
        return np.broadcast_to(thr, np.shape(probs)).astype(np.float32)

    def tags_from_probs(self, probs: np.ndarray, thresholds: np.ndarray, top_k: int | None = None
                        ) -> dict[str, float]:
        """``{tag: probability}`` of one probability row, above ``thresholds`` (MCut resolved here), most
        probable first; a ready model's ratings are not tags (:meth:`ratings_from_probs`)."""
        if (np.asarray(thresholds) == MCUT).any():
            thresholds = self.row_thresholds(probs, thresholds)
        idx = np.flatnonzero((probs >= thresholds) & self._tag_mask)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        if top_k is not None:
            idx = idx[:top_k]
        return {str(self._names[i]): float(probs[i]) for i in idx}

    def ratings_from_probs(self, probs: np.ndarray) -> dict[str, float]:
        """``{rating: probability}`` of one probability row, most probable first; empty for a model whose
        ratings (if any) are tags like the others (alt-i2v models learn ``rating:g`` ... as tags)."""
        idx = np.flatnonzero(~self._tag_mask)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        return {str(self._names[i]): float(probs[i]) for i in idx}

    def iter_probabilities(self, sources: Sequence[Any]) -> Iterator[tuple[int, list, list[int], np.ndarray]]:
        """:meth:`iter_batches` with the model's probabilities (len(ok), T) as the outputs."""
        return self.iter_batches(sources, lambda b: self._forward(self.predictor, b))

    def iter_predict(self, sources: Sequence[Any], threshold: Any = None, top_k: int | None = None, *,
                     with_ratings: bool = False) -> Iterator[tuple]:
        """Stream ``(position, tags or ImageLoadError)`` in input order, one batch at a time; with
        ``with_ratings``, ``(position, tags or error, ratings)`` (:meth:`ratings_from_probs`, {} on error)."""
        thr = self.thresholds_for(threshold)
        top_k = check_top_k(top_k)
        for start, loaded, ok, probs in self.iter_probabilities(sources):
            row = {i: r for r, i in enumerate(ok)}
            for i, x in enumerate(loaded):
                tags = x if i not in row else self.tags_from_probs(probs[row[i]], thr, top_k)
                if with_ratings:
                    yield start + i, tags, ({} if i not in row else self.ratings_from_probs(probs[row[i]]))
                else:
                    yield start + i, tags

    def predict_tags(self, images: Any, threshold: Any = None, top_k: int | None = None, *,
                     errors: str = "raise") -> dict[str, float] | list:
        """Tags of one image (a dict ``{tag: probability}``, most probable first) or of a list (a list of
        dicts). ``threshold``: None = calibrated per tag, a float, or a dict per category/tag; ``top_k``:
        at most k tags. A single bad image raises its ImageLoadError; in a list, ``errors="raise"`` raises
        a BatchImageError after the rest is done (their results on it), ``"return"`` leaves the
        ImageLoadError in its slot."""
        _check_errors(errors)
        sources, single = as_list(images)
        results: list = [None] * len(sources)
        for i, r in self.iter_predict(sources, threshold, top_k):
            results[i] = r
        if single:
            if isinstance(results[0], ImageLoadError):
                raise results[0]
            return results[0]
        failures = [(i, r) for i, r in enumerate(results) if isinstance(r, ImageLoadError)]
        if failures and errors == "raise":
            raise BatchImageError(failures, len(sources), [None if isinstance(r, ImageLoadError) else r
                                                           for r in results])
        return results

    # ------------------------------------------------------------------------------------------ embeddings
    def embed_arrays(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D) of already loaded uint8 images (N, S, S, 3)."""
        out = []
        for s in range(0, len(images), self.batch_size):
            out.append(self._embed_batch(np.asarray(images[s:s + self.batch_size])))
        return np.concatenate(out) if out else np.empty((0, self.embedding_dim), np.float32)

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        _, emb = self._forward(self._embedder(), batch)
        emb = np.asarray(emb, dtype=np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, 1e-12)

    def embed(self, images: Any, *, errors: str = "raise") -> np.ndarray:
        """L2-normalised float32 embeddings: (D,) for one image, (N, D) for a list. A single bad image
        raises its ImageLoadError; in a list, ``errors="raise"`` raises BatchImageError (``.results`` is
        the array with NaN rows for the failures), ``"return"`` returns that array."""
        _check_errors(errors)
        sources, single = as_list(images)
        out = np.full((len(sources), self.embedding_dim), np.nan, np.float32)
        failures = []
        for start, loaded, ok, emb in self.iter_batches(sources, self._embed_batch):
            for r, i in enumerate(ok):
                out[start + i] = emb[r]
            failures += [(start + i, x) for i, x in enumerate(loaded) if isinstance(x, ImageLoadError)]
        if single:
            if failures:
                raise failures[0][1]
            return out[0]
        if failures and errors == "raise":
            raise BatchImageError(failures, len(sources), out)
        return out

    def embed_files(self, files: Sequence[str], *, quiet: bool = False, desc: str = "embed"
                    ) -> tuple[np.ndarray, list[int], list[dict]]:
        """Embeddings of files with a progress bar: ``(embeddings of the good ones, their positions,
        failures [{"file", "reason", "error"}])``."""
        from ..progress import bar

        rows, ok_pos, failures = [], [], []
        progress = bar(total=len(files), desc=desc, unit="img", quiet=quiet)
        try:
            for start, loaded, ok, emb in self.iter_batches(list(files), self._embed_batch):
                if ok:
                    rows.append(emb)
                    ok_pos += [start + i for i in ok]
                failures += [{"file": str(files[start + i]), "reason": x.reason, "error": str(x)}
                             for i, x in enumerate(loaded) if isinstance(x, ImageLoadError)]
                progress.update(len(loaded))
        finally:
            progress.close()
        emb = np.concatenate(rows) if rows else np.empty((0, self.embedding_dim), np.float32)
        return emb, ok_pos, failures


# ---------------------------------------------------------------------------------------------------------
# Module-level one-liners, sharing the last loaded Tagger

_cache: dict[str, Any] = {"key": None, "tagger": None}
_cache_lock = threading.Lock()


def get_tagger(model: Any = None, *, batch_size: int | None = None, workers: int | None = None) -> Tagger:
    """A Tagger for ``model`` (a model directory of any family, or a Tagger); the last one loaded is reused
    while its weights file is unchanged. ``model=None`` means that last one."""
    if isinstance(model, Tagger):
        return model
    with _cache_lock:
        cached = _cache["tagger"]
        if model is None:
            if cached is None:
                raise UsageError("no model loaded yet: pass model='path/to/model_dir'")
            return cached
        path = Path(model)
        stamp = _weights_stamp(path)
        key = (str(path.resolve()), stamp)
        if cached is not None and _cache["key"] == key:
            if batch_size:
                cached.batch_size = int(batch_size)
            if workers:
                cached.workers = resolve_workers(workers)
            return cached
        tagger = Tagger(path, batch_size=batch_size, workers=workers)
        _cache.update(key=key, tagger=tagger)
        return tagger


def _weights_stamp(path: Path) -> int | None:
    """mtime of the model's weights file (any family), so a retrained or replaced model is loaded again."""
    candidates = [ModelDir(path).model_file, path / "model.onnx", *sorted(path.glob("model-*.h5"))]
    for file in candidates:
        try:
            return file.stat().st_mtime_ns
        except OSError:
            continue
    return None


def clear_cache() -> None:
    """Forget the cached Tagger (frees its model)."""
    with _cache_lock:
        _cache.update(key=None, tagger=None)


def predict_tags(images: Any, model: Any = None, threshold: Any = None, top_k: int | None = None, *,
                 errors: str = "raise") -> dict[str, float] | list:
    """Tags of one image (``{tag: probability}``, most probable first) or a list of them; see
    :meth:`Tagger.predict_tags`. ``model`` is a model directory (loaded once and cached) or a Tagger."""
    return get_tagger(model).predict_tags(images, threshold=threshold, top_k=top_k, errors=errors)


def extract_embeddings(images: Any, model: Any = None, *, errors: str = "raise") -> np.ndarray:
    """L2-normalised float32 embeddings ((D,) for one image, (N, D) for a list); see :meth:`Tagger.embed`."""
    return get_tagger(model).embed(images, errors=errors)


__all__ = ["Tagger", "predict_tags", "extract_embeddings", "get_tagger", "clear_cache", "BatchImageError",
           "list_images", "parse_threshold", "as_list", "IMAGE_SUFFIXES"]
