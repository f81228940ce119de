"""Using a trained model directory: tags with probabilities, embeddings, and the ``--pred`` / ``--embed``
command lines (folder captioning included).

Every input goes through :func:`alt_i2v.imaging.load_image_config` with the image settings the model was
trained with, so prediction sees exactly the pixels the build stored. Images are decoded on threads while
the previous batch is in the model; a bad image costs only its own result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from .config import CONFIG_FILE, MODEL_FILE, THRESHOLDS_FILE, ImageConfig, resolve_workers
from .errors import AltI2VError, ImageLoadError, UsageError
from .fsutil import IMAGE_SUFFIXES, file_digest
from .imaging import describe, load_image_config
from .vocab import Vocab

DEFAULT_BATCH_SIZE = 64
DEFAULT_THRESHOLD = 0.5  # only when a model directory has no thresholds.json


class BatchImageError(AltI2VError):
    """Some images of a list could not be used. The others' results are kept in ``results`` (failed
    slots hold None, or NaN rows for embeddings); ``failures`` is ``[(index, ImageLoadError), ...]``."""

    def __init__(self, failures: list[tuple[int, ImageLoadError]], total: int, results: Any):
        self.failures = failures
        self.results = results
        shown = "; ".join(f"[{i}] {e}" for i, e in failures[:3]) + ("; ..." if len(failures) > 3 else "")
        super().__init__(f"{len(failures)} of {total} images could not be read: {shown}. The other results are "
                         "in this error's .results; errors='return' puts each error in its place instead")


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    return not hasattr(images, "__iter__")


def as_list(images: Any) -> tuple[list, bool]:
    """``(sources, single)``: a path, PIL image, array or bytes is one image; a list, tuple, iterable or
    4-D array (N, H, W, C) is a batch."""
    if _is_single(images):
        return [images], True
    return list(images), False


def list_images(paths: Sequence[str | os.PathLike], recursive: bool = False) -> list[str]:
    """Files to tag: folders expand to their image files (sorted; sub-folders with ``recursive``), files
    are kept as given whatever their extension, and missing paths are kept so they fail one by one."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            out.extend(str(f) for f in sorted(found, key=lambda f: str(f))
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
                       and not any(part.startswith(".") for part in f.relative_to(path).parts[:-1]))
        else:
            out.append(os.fspath(p))
    return out


# ---------------------------------------------------------------------------------------------------------
# Thresholds


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


def _check_prob(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise UsageError(f"{what} must be in [0, 1], got {v}")
    return v


# ---------------------------------------------------------------------------------------------------------
# Tagger


class Tagger:
    """A model directory loaded once: ``.predict_tags(images)``, ``.embed(images)``, ``.vocab``.

    Loads ``model.keras`` with safe_mode (no pickle, no lambdas), ``vocab.json``, ``config.json`` (image
    settings) and ``thresholds.json`` (per-tag thresholds calibrated on the validation split).
    """

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int | None = None, workers: int | None = None):
        from .model import load_model

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise AltI2VError(f"{self.model_dir}: no such model directory; train one with "
                              "`alt-i2v --train --data DIR --model DIR`")
        self.config = _read_json(self.model_dir / CONFIG_FILE, "model configuration", required=True)
        self.vocab = Vocab.load(self.model_dir)
        want = self.config.get("vocab_sha256")
        if want and want != self.vocab.sha256:
            raise AltI2VError(f"{self.model_dir}: vocab.json does not match the one the model was trained with "
                              "(sha256 differs); restore the model directory's own vocab.json")
        self.image_config = _image_config(self.config)
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
        if self.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        self.workers = resolve_workers(workers)
        self.model = load_model(self.model_dir)
        n_out = int(self.model.outputs[0].shape[-1])
        if n_out != len(self.vocab):
            raise AltI2VError(f"{self.model_dir}: the model has {n_out} outputs but vocab.json {len(self.vocab)} "
                              "tags; the directory mixes files of different runs")
        self._names = np.asarray(self.vocab.names, dtype=object)
        self._categories = np.asarray(self.vocab.tag_categories, dtype=object)
        self.thresholds, self.global_threshold, self.calibrated = self._load_thresholds()
        self._embed_model = None
        self._lock = threading.Lock()
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------------------------------ metadata
    def _load_thresholds(self) -> tuple[np.ndarray, float, bool]:
        doc = _read_json(self.model_dir / THRESHOLDS_FILE, "thresholds", required=False)
        if doc is None:
            warnings.warn(f"{self.model_dir}: no {THRESHOLDS_FILE} (training did not finish calibrating?); "
                          f"using {DEFAULT_THRESHOLD} for every tag", UserWarning, stacklevel=3)
            return np.full(len(self.vocab), DEFAULT_THRESHOLD, np.float32), DEFAULT_THRESHOLD, False
        from .evaluate import check_thresholds, thresholds_vector

        check_thresholds(doc, str(self.model_dir / THRESHOLDS_FILE))
        g = float(doc.get("global", DEFAULT_THRESHOLD))
        return thresholds_vector({"global": g, "tags": doc.get("tags") or {}}, self.vocab.names), g, True

    @property
    def embedding_dim(self) -> int:
        from .model import embedding_dim

        return embedding_dim(self.model)

    @property
    def tag_categories(self) -> dict[str, str]:
        return dict(zip(self.vocab.names, self.vocab.tag_categories))

    def fingerprint(self) -> str:
        """sha256 of model.keras: tells whether embeddings came from these exact weights."""
        if self._fingerprint is None:
            self._fingerprint = file_digest(self.model_dir / MODEL_FILE)
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        """What an index or embedding file records about the model that made it."""
        return {"path": str(self.model_dir.resolve()), "fingerprint": self.fingerprint(),
                "embedding_dim": self.embedding_dim, "vocab_sha256": self.vocab.sha256,
                "image": self.image_config.get_config()}

    def thresholds_for(self, threshold: Any = None) -> np.ndarray:
        """Per-tag thresholds (T,) for ``threshold``: None = calibrated; a float for every tag; a dict by
        category (``{"general": 0.4, "character": 0.8}``), by tag name, or ``"default"`` for the rest
        (tag names beat categories, categories beat ``default``; what none names stays calibrated)."""
        threshold = parse_threshold(threshold)
        if threshold is None:
            return self.thresholds.copy()
        if not isinstance(threshold, dict):
            return np.full(len(self.vocab), _check_prob(threshold, "threshold"), np.float32)
        out = self.thresholds.copy()
        cats = set(self.vocab.tag_categories) | set(self.vocab.categories)
        index = self.vocab.index
        unknown = [k for k in threshold if k not in cats and k not in index and k not in ("default", "*")]
        if unknown:
            raise UsageError(f"threshold keys {unknown} are neither a category of this model "
                             f"({', '.join(sorted(cats))}), a tag of its vocabulary, nor 'default'")
        for key in ("default", "*"):
            if key in threshold:
                out[:] = _check_prob(threshold[key], f"threshold {key}")
        for key, value in threshold.items():
            if key in cats:
                out[self._categories == key] = _check_prob(value, f"threshold {key}")
        for key, value in threshold.items():
            if key in index and key not in cats:
                out[index[key]] = _check_prob(value, f"threshold {key}")
        return out

    # ------------------------------------------------------------------------------------------ forward
    def _forward(self, model: Any, batch: np.ndarray) -> Any:
        from .model import predict_batch

        with self._lock, warnings.catch_warnings():
            # Keras' TF backend converts outputs with np.array(tensor), which NumPy 2 flags; harmless
            warnings.simplefilter("ignore", DeprecationWarning)
            return predict_batch(model, batch, self.batch_size)

    def _embedder(self) -> Any:
        if self._embed_model is None:
            from .model import embedding_model

            self._embed_model = embedding_model(self.model)
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
        The next batch is decoded on threads while ``fn`` runs."""
        n, bs = len(sources), self.batch_size
        if n == 0:
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
        for start, loaded, ok, probs in self.iter_batches(sources, lambda b: self._forward(self.model, b)):
            for x in loaded:
                if isinstance(x, ImageLoadError):
                    raise x
            out[start:start + len(loaded)] = probs
        return out[0] if single else out

    def tags_from_probs(self, probs: np.ndarray, thresholds: np.ndarray, top_k: int | None = None
                        ) -> dict[str, float]:
        """``{tag: probability}`` of one probability row, above ``thresholds``, most probable first."""
        idx = np.flatnonzero(probs >= thresholds)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        if top_k is not None:
            idx = idx[:top_k]
        return {str(self._names[i]): float(probs[i]) for i in idx}

    def iter_predict(self, sources: Sequence[Any], threshold: Any = None, top_k: int | None = None
                     ) -> Iterator[tuple[int, dict[str, float] | ImageLoadError]]:
        """Stream ``(position, tags or ImageLoadError)`` in input order, one batch at a time."""
        thr = self.thresholds_for(threshold)
        top_k = _check_top_k(top_k)
        for start, loaded, ok, probs in self.iter_batches(sources, lambda b: self._forward(self.model, b)):
            row = {i: r for r, i in enumerate(ok)}
            for i, x in enumerate(loaded):
                yield start + i, (x if i not in row else self.tags_from_probs(probs[row[i]], thr, top_k))

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
        from .progress import bar

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


def _check_errors(errors: str) -> None:
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")


def _check_top_k(top_k: Any) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise UsageError(f"top_k must be a positive integer, got {top_k!r}")
    return int(top_k)


def _read_json(path: Path, what: str, *, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise AltI2VError(f"{path}: missing {what}; this is not a complete model directory (train one with "
                              "--train, or finish an interrupted run with --train --resume)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AltI2VError(f"{path}: damaged {what} ({e})") from None


def _image_config(config: Mapping[str, Any]) -> ImageConfig:
    image = config.get("image")
    if isinstance(image, dict) and image.get("image_size"):
        return ImageConfig.from_config(image)
    model = config.get("model") or {}
    size = model.get("image_size") or config.get("image_size")
    if not size:
        raise AltI2VError("config.json records no image size; the model directory is incomplete")
    return ImageConfig(image_size=int(size), resize=str(config.get("resize", "pad")))


# ---------------------------------------------------------------------------------------------------------
# Module-level one-liners, sharing the last loaded Tagger

_cache: dict[str, Any] = {"key": None, "tagger": None}
_cache_lock = threading.Lock()


def get_tagger(model: Any = None, *, batch_size: int | None = None, workers: int | None = None) -> Tagger:
    """A Tagger for ``model`` (a directory or a Tagger); the last one loaded is reused while its
    model.keras is unchanged. ``model=None`` means that last one."""
    if isinstance(model, Tagger):
        return model
    with _cache_lock:
        cached = _cache["tagger"]
        if model is None:
            if cached is None:
                raise UsageError("no model loaded yet: pass model='path/to/model_dir'")
            return cached
        path = Path(model)
        try:
            stamp = (path / MODEL_FILE).stat().st_mtime_ns
        except OSError:
            stamp = None
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


# ---------------------------------------------------------------------------------------------------------
# Command line


def _emit(progress: Any, text: str, file: Any = None) -> None:
    """Print a line without breaking a progress bar drawn on stderr."""
    file = file or sys.stdout
    write = getattr(progress, "write", None)
    if callable(write) and not getattr(progress, "disable", True):
        write(text, file=file)
    else:
        print(text, file=file, flush=True)


def run_pred(args: argparse.Namespace) -> int:
    """``--pred FILES/DIRS --model DIR``: print tags (text/json/caption) and/or write caption files."""
    from .captions import (DEFAULT_CAPTION_MODE, DEFAULT_TAG_STYLE, caption_conflicts, caption_path,
                           format_caption, format_tag, parse_tag_list, select_tags, write_caption)
    from .progress import bar, summary

    if not args.model:
        raise UsageError("--pred needs --model DIR (a trained model directory)")
    if not args.write_captions:
        for opt in ("caption_mode",):
            if getattr(args, opt, None):
                raise UsageError(f"--{opt.replace('_', '-')} applies only with --write-captions")
    if args.max_tags is not None and args.max_tags < 0:
        raise UsageError("--max-tags must be >= 0")
    threshold = parse_threshold(args.threshold)
    top_k = _check_top_k(args.top_k)
    exclude = parse_tag_list(args.exclude)
    style = args.tag_style or DEFAULT_TAG_STYLE
    escape = not args.no_escape
    mode = args.caption_mode or DEFAULT_CAPTION_MODE
    fmt = args.format or ("text" if not args.write_captions else None)

    folders = [p for p in args.pred if Path(p).is_dir()]
    files = list_images(args.pred, recursive=bool(args.recursive))
    if not files:
        raise AltI2VError(f"no images found in {', '.join(args.pred)}" +
                          ("" if args.recursive else " (use --recursive for sub-folders)"))
    tagger = get_tagger(args.model, batch_size=args.batch_size, workers=args.workers)
    tagger.thresholds_for(threshold)  # a bad --threshold fails before any work
    categories = tagger.tag_categories
    conflicts = {img for group in caption_conflicts(files).values() for img in group} \
        if args.write_captions else set()

    counts = {"tagged": 0, "failed": 0, "written": 0, "overwritten": 0, "appended": 0, "unchanged": 0,
              "skipped": 0}
    failed: list[str] = []
    single_file = len(files) == 1 and not folders
    progress = bar(total=len(files), desc="tag", unit="img", quiet=args.quiet or not folders)
    try:
        for i, result in tagger.iter_predict(files, threshold, top_k):
            file = files[i]
            progress.update(1)
            if isinstance(result, ImageLoadError):
                counts["failed"] += 1
                failed.append(file)
                if fmt == "json":
                    _emit(progress, json.dumps({"file": file, "error": str(result), "reason": result.reason},
                                               ensure_ascii=False))
                _emit(progress, f"alt-i2v: skipped {result}", sys.stderr)
                continue
            counts["tagged"] += 1
            if fmt == "json":
                _emit(progress, json.dumps({"file": file, "tags": result}, ensure_ascii=False))
            elif fmt == "caption":
                line = format_caption(result, categories, style=style, escape=escape, exclude=exclude,
                                      max_tags=args.max_tags)
                _emit(progress, line if single_file else f"{file}\t{line}")
            elif fmt == "text":
                lines = [file] + [f"  {p:.3f}  {t}" for t, p in result.items()]
                if not result:
                    lines.append("  (no tag above its threshold)")
                _emit(progress, "\n".join(lines))
            if args.write_captions:
                if file in conflicts:
                    counts["failed"] += 1
                    failed.append(file)
                    _emit(progress, f"alt-i2v: not captioned {file}: another image would share "
                                    f"{caption_path(file).name}; rename one of them", sys.stderr)
                    continue
                names = select_tags(result, categories, exclude=exclude, max_tags=args.max_tags)
                try:
                    what = write_caption(file, [format_tag(t, style, escape) for t in names], mode)
                except OSError as e:
                    counts["failed"] += 1
                    failed.append(file)
                    _emit(progress, f"alt-i2v: cannot write {caption_path(file)}: {e}", sys.stderr)
                    continue
                counts[what] += 1
    finally:
        progress.close()
    if args.write_captions or folders:
        rows = {"images": len(files), "tagged": counts["tagged"], "failed": counts["failed"]}
        if args.write_captions:
            rows.update({"captions written": counts["written"] + counts["overwritten"],
                         "appended": counts["appended"], "unchanged": counts["unchanged"],
                         "skipped (caption exists)": counts["skipped"], "caption mode": mode})
            if counts["skipped"] and mode == "skip":
                rows["hint"] = "--caption-mode append adds new tags, overwrite replaces the file"
        summary("pred", rows, quiet=args.quiet, file=sys.stderr if fmt else None)
    return 1 if failed else 0


def run_embed(args: argparse.Namespace) -> int:
    """``--embed FILES/DIRS --model DIR --out FILE.npy``: embeddings plus ``FILE.ids.json`` (the paths)."""
    import io

    from .fsutil import atomic_write_bytes, atomic_write_json
    from .progress import summary

    if not args.model:
        raise UsageError("--embed needs --model DIR")
    if not args.out:
        raise UsageError("--embed needs --out FILE.npy")
    out = Path(args.out)
    if out.suffix.lower() != ".npy":
        out = out.with_name(out.name + ".npy")
    ids_file = out.with_name(out.name[:-4] + ".ids.json")
    files = list_images(args.embed, recursive=bool(args.recursive))
    if not files:
        raise AltI2VError(f"no images found in {', '.join(args.embed)}")
    tagger = get_tagger(args.model, batch_size=args.batch_size, workers=args.workers)
    emb, ok, failures = tagger.embed_files(files, quiet=args.quiet)
    for f in failures:
        print(f"alt-i2v: skipped {f['error']}", file=sys.stderr)
    buf = io.BytesIO()
    np.save(buf, emb.astype(np.float32), allow_pickle=False)
    atomic_write_bytes(out, buf.getvalue())
    atomic_write_json(ids_file, {"version": 1, "count": int(len(emb)), "dim": int(emb.shape[1]),
                                 "normalized": True, "model": str(tagger.model_dir.resolve()),
                                 "ids": [files[i] for i in ok], "failed": failures})
    summary("embed", {"embeddings": f"{len(emb)} x {emb.shape[1]} float32 (L2-normalised)", "file": str(out),
                      "ids": str(ids_file), "failed": len(failures)}, quiet=args.quiet)
    return 1 if failures else 0


__all__ = ["Tagger", "predict_tags", "extract_embeddings", "get_tagger", "clear_cache", "BatchImageError",
           "list_images", "parse_threshold", "as_list", "run_pred", "run_embed", "IMAGE_SUFFIXES"]
