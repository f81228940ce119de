"""An ivf-pq index of more embeddings than fit in memory, built in bounded memory.

The embeddings arrive in chunks (an iterator, e.g. a model embedding a dataset batch by batch); each chunk
is normalised and appended to the float16 file the finished index maps for re-ranking, so no more than
one chunk is ever in memory. The quantisers (OPQ, coarse k-means, PQ) learn from a sample of rows read
back from that file, then every row is encoded a chunk at a time. Memory: the sample (``train_size`` x
dim x 4 bytes, 65,536 rows = 512 MiB at 2048) while training, then the codes (``m`` + 8 bytes a vector).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..fsutil import temp_path
from ..progress import bar
from .files import RAW_FILE, save_index
from .index import SimilarityIndex, _check_id
from .kernels import normalize_rows

Chunk = tuple[np.ndarray, "Sequence | None", "Sequence[str] | None"]


def build_streaming(path: str | os.PathLike, chunks: Iterable[Chunk], *, dim: int, info: dict | None = None,
                    total: int | None = None, quiet: bool = True, timings: dict | None = None,
                    **approx_kw: Any) -> SimilarityIndex:
    """Write an ivf-pq index of ``chunks`` (``(embeddings, ids or None, paths or None)`` each) to ``path``
    atomically and return it opened (vectors memory-mapped). ``approx_kw`` go to
    :meth:`SimilarityIndex.build_approx` (nlist, nprobe, refine, train_size, target_recall, seed).
    ``timings`` (a dict) receives the seconds of each stage: write, train_add, save."""
    path = Path(path)
    stage = temp_path(path)
    stage.mkdir(parents=True)
    times = timings if timings is not None else {}
    try:
        t = time.perf_counter()
        index = _stage_vectors(stage / RAW_FILE, chunks, dim, info, total, quiet)
        times["write"] = time.perf_counter() - t
        t = time.perf_counter()
        with bar(total=index.count, desc="encode", unit="vec", quiet=quiet) as progress:
            index.build_approx(kind="ivf-pq", progress=progress.update, **approx_kw)
        times["train_add"] = time.perf_counter() - t
        t = time.perf_counter()
        save_index(index, path)
        times["save"] = time.perf_counter() - t
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return SimilarityIndex.load(path)


def _stage_vectors(file: Path, chunks: Iterable[Chunk], dim: int, info: dict | None, total: int | None,
                   quiet: bool) -> SimilarityIndex:
    """Append every chunk's unit float16 rows to ``file``; an index whose one block maps that file."""
    ids: list = []
    paths: list[str] = []
    positional = True
    count = 0
    with open(file, "wb") as f, bar(total=total, desc="vectors", unit="vec", quiet=quiet) as progress:
        for emb, chunk_ids, chunk_paths in chunks:
            emb = np.asarray(emb)
            if emb.ndim != 2 or emb.shape[1] != dim:
                raise ValueError(f"embeddings must have shape (N, {dim}), got {emb.shape}")
            n = len(emb)
            if chunk_ids is not None:
                chunk_ids = [_check_id(i) for i in chunk_ids]
                if len(chunk_ids) != n:
                    raise ValueError(f"{len(chunk_ids)} ids for {n} embeddings")
                if positional and count:
                    raise ValueError("give ids for every chunk or for none")
                positional = False
                ids.extend(chunk_ids)
            elif not positional:
                raise ValueError("give ids for every chunk or for none")
            if chunk_paths is not None:
                if len(chunk_paths) != n or len(paths) != count:
                    raise ValueError("give a path for every embedding or for none")
                paths.extend(str(p) for p in chunk_paths)
            f.write(memoryview(normalize_rows(emb).astype(np.float16)).cast("B"))
            count += n
            progress.update(n)
    if count == 0:
        raise ValueError("no embeddings to index")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate ids")
    if paths and len(paths) != count:
        raise ValueError("give a path for every embedding or for none")
    index = SimilarityIndex(dim, dtype="float16", info=info)
    index._blocks = [np.memmap(file, dtype=np.float16, mode="r", shape=(count, dim))]
    index._ids = None if positional else ids
    index._paths = paths or None
    index.count = count
    index._staged = file
    return index
