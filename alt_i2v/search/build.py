"""Making and opening an index with a model: embed a dataset (through its store when it holds the model's
pixels) or an image folder, and open an index with the very model that built it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import AltI2VError, UsageError
from .files import IndexFileError
from .index import SimilarityIndex
from .kinds import resolve_kind


def store_chunks(tagger: Any, data_dir: str | os.PathLike, failures: list, *, skip: Any = (), quiet: bool = True,
                 batch_size: int | None = None) -> tuple[int, Iterator[tuple[np.ndarray, list, list[str]]]] | None:
    """Embeddings of a dataset's stored images, read from DATA/store without decoding, a batch at a time:
    ``(count, chunks)``, chunks yielding ``(embeddings, post ids, image paths)``; posts whose id is in
    ``skip`` are left out, and store records that did not decode are appended to ``failures``. None when
    the store is missing or was built with other image settings than the model's (its pixels would not be
    what the model expects)."""
    from ..data.layout import DataDir, store_matches
    from ..data.posts import id_key, iter_posts, post_image_path
    from ..store import open_store

    data = Path(data_dir)
    if not DataDir(data).store.is_dir():
        return None
    with open_store(data) as store:
        if not store_matches(tagger.image_config, store):
            return None
    by_key = {id_key(post["id"]).encode(): post for post in iter_posts(data) if post["id"] not in skip}
    with open_store(data) as store:
        keys = [k for k in store.ids() if k in by_key]

    def chunks() -> Iterator[tuple[np.ndarray, list, list[str]]]:
        from ..progress import bar

        bs = int(batch_size or tagger.batch_size)
        step = bs * max(1, 8192 // bs)
        with open_store(data) as store, bar(total=len(keys), desc="index", unit="img", quiet=quiet) as progress:
            for c in range(0, len(keys), step):
                embs, ids, paths = [], [], []
                for s in range(c, min(c + step, len(keys)), bs):
                    part = keys[s:min(s + bs, c + step)]
                    images, _ = store.get_batch(part)
                    embs.append(tagger.embed_arrays(images))
                    for k in part:
                        if k in store.bad:  # left out of the batch: it did not decode
                            continue
                        ids.append(by_key[k]["id"])
                        paths.append(str(post_image_path(by_key[k], data)))
                    progress.update(len(part))
                if ids:
                    yield np.concatenate(embs), ids, paths
            failures.extend({"file": b["key"], "reason": "bad_record",
                             "error": f"store record {b['key']}: {b['reason']}"} for b in store.bad_report())

    return len(keys), chunks()


def embed_store(tagger: Any, data_dir: str | os.PathLike, *, quiet: bool = True, batch_size: int | None = None
                ) -> tuple[np.ndarray, list, list[str], list[dict]] | None:
    """Every stored image of a dataset at once (see :func:`store_chunks`): ``(embeddings, post ids, image
    paths, failures)``, or None when the store does not fit the model."""
    failures: list[dict] = []
    found = store_chunks(tagger, data_dir, failures, quiet=quiet, batch_size=batch_size)
    if found is None:
        return None
    parts = list(found[1])
    emb = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, tagger.embedding_dim), np.float32)
    return emb, [i for p in parts for i in p[1]], [f for p in parts for f in p[2]], failures


def file_chunks(tagger: Any, files: Sequence, ids: Sequence, failures: list, *, quiet: bool = True,
                step: int = 8192) -> Iterator[tuple[np.ndarray, list, list[str]]]:
    """Embeddings of image files ``step`` at a time: ``(embeddings, ids, paths)`` of those that decoded;
    the others are appended to ``failures``."""
    from ..progress import bar

    with bar(total=len(files), desc="index", unit="img", quiet=quiet) as progress:
        for s in range(0, len(files), step):
            part = [str(f) for f in files[s:s + step]]
            emb, ok, fails = tagger.embed_files(part, quiet=True, desc="index")
            failures.extend(fails)
            progress.update(len(part))
            if ok:
                yield emb, [ids[s + i] for i in ok], [part[i] for i in ok]


def _sources(tagger: Any, data: Path | None, images: Path | None, recursive: bool, failures: list, skip: Any,
             quiet: bool) -> tuple[int, Iterator, dict]:
    """``(count, chunks, source)`` of a dataset (its store when it fits the model, else its files) or of
    an image folder (ids: the resolved paths), leaving out ids in ``skip``."""
    from ..data.posts import iter_posts, post_image_path
    from ..tagging.inputs import list_images

    if data is not None:
        if not data.is_dir():
            raise AltI2VError(f"{data}: no such dataset directory")
        source = {"data": str(data.resolve())}
        found = store_chunks(tagger, data, failures, skip=skip, quiet=quiet)
        if found is not None:
            return found[0], found[1], source
        posts = [p for p in iter_posts(data) if p["id"] not in skip]
        files = [post_image_path(p, data) for p in posts]
        return len(files), file_chunks(tagger, files, [p["id"] for p in posts], failures, quiet=quiet), source
    files = list_images([images], recursive=recursive)
    if not files:
        raise AltI2VError(f"{images}: no images found" + ("" if recursive else " (use --recursive for sub-folders)"))
    paths = [str(Path(f).resolve()) for f in files]
    keep = [i for i, p in enumerate(paths) if p not in skip]
    return (len(keep), file_chunks(tagger, [paths[i] for i in keep], [paths[i] for i in keep], failures, quiet=quiet),
            {"images": str(Path(images).resolve())})


def build_index(tagger: Any, *, data: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                recursive: bool = False, approx: bool = False, kind: str | None = None,
                out: str | os.PathLike | None = None, quiet: bool = True) -> tuple["SimilarityIndex", list[dict]]:
    """An index of a dataset (``data``: its store when it matches the model, else its image files) or of an
    image folder (``images``), embedded by ``tagger`` a chunk at a time. ``kind``: "exact", "ivf-sq8"
    (also ``approx=True``), "ivf-pq" or "auto" (by size, :func:`.kinds.choose_kind`). With ``out`` the
    index is written there (an ivf-pq index always is: it streams to disk, and needs ``out``). Returns
    ``(index, failures)``, failures as ``[{"file", "reason", "error"}]``; the index records the model and
    the source in ``info``."""
    if (data is None) == (images is None):
        raise UsageError("build an index from exactly one of a dataset directory or an image folder")
    failures: list[dict] = []
    count, chunks, source = _sources(tagger, Path(data) if data is not None else None,
                                     Path(images) if images is not None else None, recursive, failures, (), quiet)
    dim = int(tagger.embedding_dim)
    kind = resolve_kind(kind or ("ivf-sq8" if approx else "auto"), count, dim)
    info = {"model": tagger.identity(), "source": source}
    if kind == "ivf-pq":
        if out is None:
            raise UsageError("an ivf-pq index is written to disk as it is built: give --out INDEX")
        from .large import build_streaming

        try:
            return build_streaming(out, chunks, dim=dim, info=info, total=count, quiet=quiet), failures
        except ValueError as e:
            if "no embeddings" in str(e):
                raise AltI2VError("no image could be embedded; nothing to index") from None
            raise
    index = SimilarityIndex(dim, info=info)
    for emb, ids, paths in chunks:
        index.add(emb, ids, paths=paths)
    if index.count == 0:
        raise AltI2VError("no image could be embedded; nothing to index")
    if kind != "exact":
        index.build_approx(kind=kind)
    if out is not None:
        index.save(out)
    return index, failures


def add_to_index(tagger: Any, index: "SimilarityIndex", out: str | os.PathLike, *,
                 data: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                 recursive: bool = False, quiet: bool = True) -> tuple[int, list[dict]]:
    """Embed the images of ``data`` or ``images`` that ``index`` does not hold yet, add them (codes into the
    approximate index as they are, no retraining) and write the index to ``out`` (an ivf-pq index's vector
    file grows in place). Returns ``(added, failures)``."""
    if (data is None) == (images is None):
        raise UsageError("add from exactly one of a dataset directory or an image folder")
    failures: list[dict] = []
    present = set(index.ids)  # removed ids included: a removal is not undone by the next --add
    _, chunks, _ = _sources(tagger, Path(data) if data is not None else None,
                            Path(images) if images is not None else None, recursive, failures, present, quiet)
    added = 0
    for emb, ids, paths in chunks:
        index.add(emb, ids, paths=paths if index.paths is not None or index.count == 0 else None)
        added += len(ids)
    if added:
        index.save(out)
    return added, failures


def open_index(index_path: str | os.PathLike, model: str | os.PathLike | None = None) -> tuple["SimilarityIndex", Any]:
    """An index and the Tagger that embeds its queries: ``model`` or the model the index records, checked
    to be the very model (weights fingerprint, embedding size) the index was built with."""
    from ..model.modeldir import ModelDir
    from ..tagging.tagger import get_tagger

    index = SimilarityIndex.load(index_path)
    model_info = index.info.get("model") or {}
    model = model or model_info.get("path")
    if not model:
        raise UsageError("the index does not name its model; give --model DIR")
    if not ModelDir(model).root.is_dir():
        raise AltI2VError(f"{model}: the model this index was built with is not there; give --model DIR")
    tagger = get_tagger(model)
    ident = tagger.identity()
    if model_info and (ident.get("fingerprint") != model_info.get("fingerprint")
                       or ident.get("embedding_dim") != index.dim):
        raise IndexFileError(f"{index_path} was built with a different model ({model_info.get('path')}); its "
                             "neighbours would be meaningless: give the right --model or rebuild the index")
    if tagger.embedding_dim != index.dim:
        raise IndexFileError(f"the model gives {tagger.embedding_dim}-d embeddings, the index holds {index.dim}-d")
    return index, tagger
