"""Making and opening an index with a model: embed a dataset (through its store when it holds the model's
pixels) or an image folder, and open an index with the very model that built it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AltI2VError, UsageError
from .files import IndexFileError
from .index import SimilarityIndex


def embed_store(tagger: Any, data_dir: str | os.PathLike, *, quiet: bool = True, batch_size: int | None = None
                ) -> tuple[np.ndarray, list, list[str], list[dict]] | None:
    """Embeddings of every stored image of a dataset, read from DATA/store without decoding:
    ``(embeddings, post ids, image paths, failures)`` (failures: store records that did not decode), or
    None when the store is missing or was built with other image settings than the model's (its pixels
    would not be what the model expects)."""
    from ..data.posts import id_key, iter_posts, post_image_path
    from ..data.layout import DataDir, store_matches
    from ..progress import bar
    from ..store import open_store

    data = Path(data_dir)
    if not DataDir(data).store.is_dir():
        return None
    bs = int(batch_size or tagger.batch_size)
    with open_store(data) as store:
        if not store_matches(tagger.image_config, store):
            return None
        by_key = {id_key(post["id"]).encode(): post for post in iter_posts(data)}
        keys = [k for k in store.ids() if k in by_key]
        embs, ids, paths = [], [], []
        with bar(total=len(keys), desc="index", unit="img", quiet=quiet) as progress:
            for s in range(0, len(keys), bs):
                part = keys[s:s + bs]
                images, _ = store.get_batch(part)
                embs.append(tagger.embed_arrays(images))
                for k in part:
                    if k in store.bad:  # left out of the batch: it did not decode
                        continue
                    ids.append(by_key[k]["id"])
                    paths.append(str(post_image_path(by_key[k], data)))
                progress.update(len(part))
        failures = [{"file": b["key"], "reason": "bad_record", "error": f"store record {b['key']}: {b['reason']}"}
                    for b in store.bad_report()]
    emb = np.concatenate(embs) if embs else np.empty((0, tagger.embedding_dim), np.float32)
    return emb, ids, paths, failures


def build_index(tagger: Any, *, data: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                recursive: bool = False, approx: bool = False, quiet: bool = True
                ) -> tuple["SimilarityIndex", list[dict]]:
    """An index of a dataset (``data``: its store when it matches the model, else its image files) or of an
    image folder (``images``), embedded by ``tagger``. Returns ``(index, failures)``, failures as
    ``[{"file", "reason", "error"}]``; the index records the model and the source in ``info``."""
    from ..data.posts import iter_posts, post_image_path
    from ..tagging.tagger import list_images

    if (data is None) == (images is None):
        raise UsageError("build an index from exactly one of a dataset directory or an image folder")
    failures: list[dict] = []
    if data is not None:
        data = Path(data)
        if not data.is_dir():
            raise AltI2VError(f"{data}: no such dataset directory")
        found = embed_store(tagger, data, quiet=quiet)
        if found is not None:
            emb, ids, paths, failures = found
        else:
            posts = list(iter_posts(data))
            files = [post_image_path(p, data) for p in posts]
            emb, ok, failures = tagger.embed_files(files, quiet=quiet, desc="index")
            ids, paths = [posts[i]["id"] for i in ok], [str(files[i]) for i in ok]
        source = {"data": str(data.resolve())}
    else:
        files = list_images([images], recursive=recursive)
        if not files:
            raise AltI2VError(f"{images}: no images found" +
                              ("" if recursive else " (use --recursive for sub-folders)"))
        emb, ok, failures = tagger.embed_files(files, quiet=quiet, desc="index")
        paths = [str(Path(files[i]).resolve()) for i in ok]
        ids = list(paths)
        source = {"images": str(Path(images).resolve())}
    if len(emb) == 0:
        raise AltI2VError("no image could be embedded; nothing to index")
    info = {"model": tagger.identity(), "source": source}
    return SimilarityIndex.build(emb, ids, paths=paths, info=info, approx=approx), failures


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
