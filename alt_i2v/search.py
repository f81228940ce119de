"""Similar-image search: an index of L2-normalised embeddings, exact by default, approximate with faiss.

Exact search is a matrix product of the stored vectors (float32, or float16 for half the memory) with the
queries, done chunk by chunk with a running top-k, so 1M x 2048 never needs a full-size temporary. The
optional approximate backend (``pip install alt-i2v[faiss]``) is an IVF index with 8-bit scalar
quantisation (L2 on the unit vectors, which ranks like cosine) whose candidates are re-ranked with the
exact vectors.

On disk an index is a directory (no pickle anywhere)::

    INDEX/index.json     header: format, version, dim, count, dtype, files with sha256 and size, approx, info
    INDEX/vectors.npy    (count, dim) float32|float16, C order, read with allow_pickle=False
    INDEX/ids.json       {"ids": [...] | null (= 0..count-1), "paths": [...] | null}
    INDEX/approx.faiss   optional, faiss's own binary serialisation of the approximate index

A file whose size or sha256 differs from the header, a newer format version, or arrays that disagree with
the header are a clear :class:`IndexFileError` naming the file and what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import resolve_workers
from .errors import AltI2VError, UsageError
from .fsutil import file_digest, fsync_dir

INDEX_FORMAT = "alt-i2v-similarity-index"
INDEX_VERSION = 1
HEADER_FILE = "index.json"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.json"
APPROX_FILE = "approx.faiss"
DTYPES = ("float32", "float16")
_CHUNK_BYTES = 64 << 20  # largest temporary of an exact search (scores, or float16 rows made float32)
_IO_CHUNK = 16 << 20


class IndexFileError(AltI2VError):
    """An index on disk is damaged, incomplete, of a newer version, or does not fit what uses it."""


def faiss_available() -> bool:
    """Whether the optional approximate backend can be used (``pip install alt-i2v[faiss]``)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise AltI2VError("the approximate index needs faiss: pip install 'alt-i2v[faiss]' (faiss-cpu), "
                          "or leave out --approx / approx=True to use exact search") from None
    return faiss


def normalize_rows(x: np.ndarray, *, what: str = "embeddings") -> np.ndarray:
    """float32 copy of ``x`` (N, D) with unit L2 rows; zero or non-finite rows are an error."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{what} rows {bad[:5].tolist()} contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = np.flatnonzero(norms[:, 0] == 0)
        raise ValueError(f"{what} rows {bad[:5].tolist()} are all zeros and have no direction")
    return x / norms


def _check_id(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"ids must be strings or integers (JSON), got {type(value).__name__}: {value!r}")
    return value


class SimilarityIndex:
    """Nearest neighbours by cosine similarity over L2-normalised vectors.

    ``dtype`` "float32" (default, fastest exact search) or "float16" (half the memory; the exact search
    converts chunk by chunk). ``info`` is free JSON kept in the header (the CLI records the model there).
    """

    def __init__(self, dim: int, *, dtype: str = "float32", info: dict | None = None):
        if str(np.dtype(dtype)) not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if int(dim) < 1:
            raise ValueError("dim must be >= 1")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.info: dict = dict(info or {})
        self._blocks: list[np.ndarray] = []
        self._ids: list | None = []  # None: ids are positions 0..count-1
        self._paths: list | None = None
        self._id_pos: dict | None = None
        self._approx = None  # faiss index or None
        self.approx_params: dict | None = None
        self.count = 0

    # ---------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, embeddings: np.ndarray, ids: Sequence | None = None, *, paths: Sequence[str] | None = None,
              dtype: str = "float32", approx: bool = False, info: dict | None = None,
              **approx_kw: Any) -> "SimilarityIndex":
        """A new index of ``embeddings`` (N, D); ``ids`` default to 0..N-1. ``approx=True`` also trains the
        faiss backend (``nlist``, ``nprobe``, ``refine`` may be given)."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
        index = cls(emb.shape[1], dtype=dtype, info=info)
        if ids is None:
            index._ids = None
        index.add(emb, ids, paths=paths)
        if approx:
            index.build_approx(**approx_kw)
        return index

    def add(self, embeddings: np.ndarray, ids: Sequence | None = None, *,
            paths: Sequence[str] | None = None) -> None:
        """Append vectors (normalised here); ids must be new. An index built without ids keeps positions."""
        emb = np.asarray(embeddings)
        if emb.ndim == 1:
            emb = emb[None, :]
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (N, {self.dim}), got {emb.shape}")
        n = emb.shape[0]
        if n == 0:
            return
        positional = (self._ids is None) if self.count else ids is None
        if ids is None:
            if not positional:
                raise ValueError("this index has explicit ids; give ids for the new vectors too")
        else:
            ids = [_check_id(i) for i in ids]
            if len(ids) != n:
                raise ValueError(f"{len(ids)} ids for {n} embeddings")
            if positional:
                if ids != list(range(self.count, self.count + n)):
                    raise ValueError(f"this index uses positions as ids; add without ids (or with "
                                     f"{self.count}..{self.count + n - 1})")
                ids = None
            else:
                pos = self._positions()
                dup = [i for i in ids if i in pos]
                if dup or len(set(ids)) != len(ids):
                    raise ValueError(f"duplicate ids: {(dup or [i for i in ids if ids.count(i) > 1])[:5]}")
        if paths is not None:
            paths = [str(p) for p in paths]
            if len(paths) != n:
                raise ValueError(f"{len(paths)} paths for {n} embeddings")
        if (paths is None) != (self._paths is None) and self.count:
            raise ValueError("give paths for every vector or for none")
        # normalise and store in chunks, so a float16 index never holds a float32 copy of everything
        block = np.empty((n, self.dim), dtype=self.dtype)
        step = max(1, _CHUNK_BYTES // (4 * self.dim))
        for s in range(0, n, step):
            block[s:s + step] = normalize_rows(emb[s:s + step])
        if self._approx is not None:
            for s in range(0, n, step):
                self._approx.add(np.ascontiguousarray(block[s:s + step], dtype=np.float32))
        self._blocks.append(block)
        if positional:
            self._ids = None
        else:
            start = self.count
            if self._ids is None:
                self._ids = []
            self._ids.extend(ids)
            if self._id_pos is not None:
                self._id_pos.update((i, start + k) for k, i in enumerate(ids))
        if paths is not None:
            self._paths = (self._paths or []) + paths
        self.count += n

    def _positions(self) -> dict:
        if self._id_pos is None:
            self._id_pos = {i: k for k, i in enumerate(self._ids or [])}
        return self._id_pos

    # ---------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return self.count

    @property
    def ids(self) -> list:
        return list(range(self.count)) if self._ids is None else list(self._ids)

    @property
    def paths(self) -> list[str] | None:
        return None if self._paths is None else list(self._paths)

    def id_at(self, position: int) -> Any:
        return position if self._ids is None else self._ids[position]

    def path_at(self, position: int) -> str | None:
        return None if self._paths is None else self._paths[position]

    def position(self, id_: Any) -> int:
        """Row of an id (KeyError if absent)."""
        if self._ids is None:
            if isinstance(id_, int) and 0 <= id_ < self.count:
                return id_
            raise KeyError(id_)
        return self._positions()[id_]

    def vectors(self) -> np.ndarray:
        """All stored vectors as one (count, dim) array (concatenates blocks: a full-size copy)."""
        if len(self._blocks) != 1:
            self._blocks = [np.concatenate(self._blocks)] if self._blocks else [np.empty((0, self.dim),
                                                                                         self.dtype)]
        return self._blocks[0]

    def _rows(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at global ``positions`` (any shape of ints)."""
        flat = np.asarray(positions, dtype=np.int64).ravel()
        out = np.empty((flat.size, self.dim), dtype=np.float32)
        starts = np.cumsum([0] + [len(b) for b in self._blocks])
        which = np.searchsorted(starts, flat, side="right") - 1
        for b in np.unique(which):
            sel = which == b
            out[sel] = _as_f32(self._blocks[b][flat[sel] - starts[b]])
        return out.reshape(*np.shape(positions), self.dim)

    @property
    def has_approx(self) -> bool:
        return self._approx is not None

    # ---------------------------------------------------------------------------------------------- search
    def search(self, query: np.ndarray, k: int = 10, *, approx: bool | None = None
               ) -> list[tuple[Any, float]] | list[list[tuple[Any, float]]]:
        """Nearest ``k`` as ``[(id, cosine), ...]`` best first for one query (D,), or a list of such lists
        for a batch (Q, D). ``approx`` None uses the approximate backend when the index has one."""
        q = np.asarray(query)
        single = q.ndim == 1
        scores, pos = self.search_positions(q[None, :] if single else q, k, approx=approx)
        out = [[(self.id_at(int(p)), float(s)) for s, p in zip(srow, prow) if p >= 0]
               for srow, prow in zip(scores, pos)]
        return out[0] if single else out

    def search_positions(self, queries: np.ndarray, k: int = 10, *, approx: bool | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Low level: ``(scores, positions)`` both (Q, k'), k' = min(k, count), best first."""
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexFileError(f"queries must have shape (Q, {self.dim}) to match this index, got {q.shape}; "
                                 "was the index built with a different model?")
        if k < 1:
            raise ValueError("k must be >= 1")
        q = normalize_rows(q, what="queries")
        k = min(int(k), self.count)
        if k == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        use_approx = self._approx is not None if approx is None else bool(approx)
        if use_approx:
            if self._approx is None:
                raise AltI2VError("this index has no approximate backend; build it with approx=True "
                                  "(--approx) or search with approx=False")
            scores, pos = self._search_approx(q, k)
        else:
            scores, pos = self._search_exact(q, k)
        np.clip(scores, -1.0, 1.0, out=scores)  # rounding can put a self-match a hair above 1
        return scores, pos

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nq = len(q)
        best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
        best_p = np.full((nq, 0), -1, dtype=np.int64)
        if self.dtype == np.float16:
            qt = np.ascontiguousarray(q.T * np.float32(_F16_SCALE))  # undoes the 2^-112 of the bit trick
            parts = []
            offset = 0
            for b, block in enumerate(self._blocks):
                parts.append(_f16_topk(block, qt, k, offset, self._block_nonneg(b)))
                offset += len(block)
            return _topk(np.concatenate([p[0] for p in parts], axis=1),
                         np.concatenate([p[1] for p in parts], axis=1), k, sort=True)
        qt = np.ascontiguousarray(q.T)  # (D, Q)
        rows = max(256, _CHUNK_BYTES // (4 * nq))  # bounded scores temporary (rows x Q)
        offset = 0
        for block in self._blocks:
            for s in range(0, len(block), rows):
                part = block[s:s + rows]  # a view of the block, no copy of it
                scores = (part @ qt[:, 0])[:, None] if nq == 1 else part @ qt  # (n, Q); gemv for one query
                cand_s, cand_p = _topk(scores.T, np.arange(len(scores)) + offset + s, k)
                best_s = np.concatenate([best_s, cand_s], axis=1)
                best_p = np.concatenate([best_p, cand_p], axis=1)
                if best_s.shape[1] > 4 * k:
                    best_s, best_p = _topk(best_s, best_p, k)
            offset += len(block)
        return _topk(best_s, best_p, k, sort=True)

    def _block_nonneg(self, b: int) -> bool:
        """Whether block ``b`` has no negative value (ReLU embeddings): its scan skips the sign bits."""
        cache = getattr(self, "_nonneg", None)
        if cache is None or len(cache) != len(self._blocks):
            cache = self._nonneg = [None] * len(self._blocks)
        if cache[b] is None:
            block = self._blocks[b]
            cache[b] = bool(len(block) == 0 or block.view(np.int16).min() >= 0)
        return cache[b]

    def _search_approx(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        refine = int((self.approx_params or {}).get("refine", 4))
        kk = min(self.count, max(k * refine, k))
        step = max(1, _CHUNK_BYTES // (4 * kk * self.dim))  # queries per group: bounded re-rank rows
        if len(q) > step:
            parts = [self._search_approx(q[s:s + step], k) for s in range(0, len(q), step)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        _, cand = self._approx.search(np.ascontiguousarray(q, dtype=np.float32), kk)
        cand = np.asarray(cand, dtype=np.int64)
        valid = cand >= 0
        safe = np.where(valid, cand, 0)
        rows = self._rows(safe)  # (Q, kk, D) exact vectors: re-rank the candidates
        scores = np.einsum("qkd,qd->qk", rows, q).astype(np.float32)
        scores[~valid] = -np.inf
        s, p = _topk(scores, safe, k, sort=True)
        p[~np.isfinite(s)] = -1
        return s, p

    # ---------------------------------------------------------------------------------------------- approx
    def build_approx(self, nlist: int | None = None, nprobe: int | None = None, refine: int = 4,
                     train_size: int | None = None, target_recall: float = 0.95, seed: int = 0) -> None:
        """Train and fill a faiss IVF index with 8-bit scalar quantisation, then measure its recall.

        ``nlist`` inverted lists (default ~sqrt(N)/4); ``nprobe`` lists visited per query (default: the
        smallest that reaches ``target_recall`` recall@10 against exact search, measured on stored vectors
        used as queries, see :meth:`calibrate`); ``refine``: candidates per wanted neighbour re-ranked
        with the exact vectors. The measured recall is kept in ``approx_params["recall10"]``.
        """
        faiss = _import_faiss()
        n = self.count
        if n == 0:
            raise ValueError("add vectors before building the approximate index")
        nlist = int(nlist or max(1, min(4096, round(math.sqrt(n) / 4))))
        nlist = max(1, min(nlist, n // 8 or 1))
        # L2 on unit vectors ranks like cosine, and its k-means cells keep neighbours together better
        # than inner-product cells (measured: recall@10 0.99 vs 0.91 at the same nprobe)
        quantizer = faiss.IndexFlatL2(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_L2)
        index.cp.niter = 12
        index.cp.seed = seed
        index.cp.max_points_per_centroid = 128
        m = min(n, int(train_size or max(nlist * 128, 20_000)))
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        index.train(np.ascontiguousarray(self._rows(sample)))
        step = max(1, _CHUNK_BYTES // (4 * self.dim))
        for block in self._blocks:
            for s in range(0, len(block), step):
                index.add(_as_f32(block[s:s + step]))
        self._approx = index
        self.approx_params = {"backend": "faiss", "kind": "IVF-SQ8", "nlist": nlist, "nprobe": 1,
                              "refine": int(refine), "metric": "l2"}
        self.calibrate(target_recall=target_recall, nprobe=nprobe, seed=seed)

    def calibrate(self, target_recall: float = 0.95, nprobe: int | None = None, k: int = 10,
                  queries: int = 64, seed: int = 0) -> float:
        """Measure the approximate recall@k against exact search, using ``queries`` stored vectors as
        queries (their own row left out of both answers). With ``nprobe`` None, pick the smallest nprobe
        of a 1, 2, 3, 4, 6, 8, 12, ... ladder that reaches ``target_recall``. Returns the recall."""
        if self._approx is None:
            raise AltI2VError("this index has no approximate backend")
        n = self.count
        m = min(queries, n)
        rows = np.sort(np.random.default_rng(seed + 1).choice(n, size=m, replace=False))
        q = self._rows(rows)
        kk = min(k + 1, n)
        _, truth = self._search_exact(q, kk)
        want = [[p for p in t if p != r][:k] for t, r in zip(truth, rows)]

        def recall(probe: int) -> float:
            self._approx.nprobe = probe
            _, found = self._search_approx(q, kk)
            got = [[p for p in f if p != r][:k] for f, r in zip(found, rows)]
            return float(np.mean([len(set(g) & set(w)) / max(1, len(w)) for g, w in zip(got, want)]))

        nlist = int(self._approx.nlist)
        if nprobe is not None:
            chosen, measured = min(int(nprobe), nlist), None
        else:
            ladder = sorted({min(nlist, v) for e in range(0, 24) for v in (2 ** e, 3 * 2 ** e // 2)} | {nlist})
            chosen, measured = nlist, None
            for probe in ladder:
                measured = recall(probe)
                if measured >= target_recall:
                    chosen = probe
                    break
        if measured is None or self._approx.nprobe != chosen:
            measured = recall(chosen)
        self._approx.nprobe = chosen
        self.approx_params.update(nprobe=chosen, recall10=round(measured, 4), recall_queries=m)
        return measured

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per approximate query: higher is slower and more accurate."""
        if self._approx is None:
            raise AltI2VError("this index has no approximate backend")
        self._approx.nprobe = int(nprobe)
        self.approx_params["nprobe"] = int(nprobe)

    def drop_approx(self) -> None:
        self._approx = None
        self.approx_params = None

    # ---------------------------------------------------------------------------------------------- disk
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index directory atomically (a temp directory renamed into place)."""
        path = Path(path)
        if path.exists() and not (path / HEADER_FILE).is_file():
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            else:
                raise UsageError(f"{path} exists and is not an alt-i2v index; choose another --out path")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = {VECTORS_FILE: self._write_vectors(tmp / VECTORS_FILE)}
            ids_doc = {"ids": self._ids, "paths": self._paths}
            files[IDS_FILE] = _write_file(tmp / IDS_FILE, json.dumps(ids_doc, ensure_ascii=False).encode())
            if self._approx is not None:
                faiss = _import_faiss()
                blob = faiss.serialize_index(self._approx)
                files[APPROX_FILE] = _write_file(tmp / APPROX_FILE, memoryview(np.ascontiguousarray(blob)))
            header = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "dim": self.dim, "count": self.count,
                      "dtype": str(self.dtype), "metric": "cosine", "normalized": True,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
                      "approx": self.approx_params, "info": self.info}
            _write_file(tmp / HEADER_FILE, (json.dumps(header, indent=2, ensure_ascii=False) + "\n").encode())
            fsync_dir(tmp)
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _write_vectors(self, file: Path) -> dict:
        """Stream the blocks into one .npy (no full-size copy), hashing the bytes as they are written."""
        import io

        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                    "fortran_order": False, "shape": (self.count, self.dim)})
        h = hashlib.sha256(head.getvalue())
        size = len(head.getvalue())
        with open(file, "wb") as f:
            f.write(head.getvalue())
            step = max(1, _IO_CHUNK // (self.dtype.itemsize * self.dim))
            for block in self._blocks:
                for s in range(0, len(block), step):
                    mv = memoryview(np.ascontiguousarray(block[s:s + step])).cast("B")
                    f.write(mv)
                    h.update(mv)
                    size += mv.nbytes
            f.flush()
            os.fsync(f.fileno())
        return {"sha256": h.hexdigest(), "bytes": size}

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True, mmap: bool = False) -> "SimilarityIndex":
        """Read an index directory. ``verify`` checks every file's sha256 (one pass over the data);
        ``mmap`` maps the vectors read-only instead of reading them into memory."""
        path = Path(path)
        header_file = path / HEADER_FILE
        if not path.exists():
            raise IndexFileError(f"{path}: no such index; build one with `alt-i2v --index --model DIR "
                                 f"--images DIR --out {path}`")
        if not header_file.is_file():
            raise IndexFileError(f"{path}: not an alt-i2v index (no {HEADER_FILE})")
        try:
            header = json.loads(header_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexFileError(f"{header_file}: damaged header, not valid JSON ({e}); rebuild the index") from None
        if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
            raise IndexFileError(f"{header_file}: not an alt-i2v similarity index header")
        if int(header.get("version", 0)) > INDEX_VERSION:
            raise IndexFileError(f"{path}: index format version {header.get('version')} is newer than this "
                                 f"alt-i2v reads ({INDEX_VERSION}); upgrade alt-i2v or rebuild the index")
        try:
            dim, count, dtype = int(header["dim"]), int(header["count"]), str(header["dtype"])
            files = dict(header["files"])
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFileError(f"{header_file}: header lacks {e}; rebuild the index") from None
        if dtype not in DTYPES:
            raise IndexFileError(f"{header_file}: unsupported dtype {dtype!r}")
        for name in (VECTORS_FILE, IDS_FILE) + ((APPROX_FILE,) if header.get("approx") else ()):
            _check_file(path, name, files.get(name), verify=verify and name != VECTORS_FILE)
        vectors = _read_vectors(path / VECTORS_FILE, files[VECTORS_FILE], (count, dim), np.dtype(dtype),
                                verify=verify, mmap=mmap)
        try:
            ids_doc = json.loads((path / IDS_FILE).read_text(encoding="utf-8"))
            ids, paths = ids_doc.get("ids"), ids_doc.get("paths")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise IndexFileError(f"{path / IDS_FILE}: damaged ({e}); rebuild the index") from None
        for name, lst in (("ids", ids), ("paths", paths)):
            if lst is not None and (not isinstance(lst, list) or len(lst) != count):
                raise IndexFileError(f"{path / IDS_FILE}: {name} has {len(lst) if isinstance(lst, list) else '?'} "
                                     f"entries for {count} vectors; the index is inconsistent, rebuild it")
        index = cls(dim, dtype=dtype, info=header.get("info") or {})
        index._blocks = [vectors]
        index._ids = ids
        index._paths = paths
        index.count = count
        if header.get("approx"):
            index.approx_params = dict(header["approx"])
            if faiss_available():
                faiss = _import_faiss()
                blob = np.fromfile(path / APPROX_FILE, dtype=np.uint8)
                try:
                    index._approx = faiss.deserialize_index(blob)
                except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError with its own text
                    raise IndexFileError(f"{path / APPROX_FILE}: faiss cannot read it ({e}); rebuild the index") from None
                if index._approx.d != dim or index._approx.ntotal != count:
                    raise IndexFileError(f"{path / APPROX_FILE}: holds {index._approx.ntotal} x {index._approx.d}, "
                                         f"the index {count} x {dim}; rebuild the index")
                index._approx.nprobe = int(index.approx_params.get("nprobe", 1))
            else:
                print("alt-i2v: note: faiss is not installed, so this index is searched exactly "
                      "(pip install 'alt-i2v[faiss]' for the approximate backend)", file=sys.stderr)
                index.approx_params = None
        return index


def _topk(scores: np.ndarray, pos: np.ndarray, k: int, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` largest scores and their positions (sorted descending when ``sort``); ``pos``
    may be one row of positions shared by every row of ``scores``."""
    pos = np.asarray(pos)
    if pos.ndim == 1:
        pos = np.broadcast_to(pos, scores.shape)
    n = scores.shape[1]
    if n > k:
        part = np.argpartition(scores, n - k, axis=1)[:, n - k:]
        scores = np.take_along_axis(scores, part, axis=1)
        pos = np.take_along_axis(np.asarray(pos), part, axis=1)
    if sort:
        order = np.argsort(-scores, axis=1, kind="stable")
        scores = np.take_along_axis(scores, order, axis=1)
        pos = np.take_along_axis(np.asarray(pos), order, axis=1)
    return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(pos, dtype=np.int64)


_F16_SCALE = 2.0 ** 112
_F16_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF as int32
_F16_ROWS = 128  # rows widened at a time: the float32 copy stays in cache and BLAS stays single-threaded
_F16_GROUP = 64  # chunks whose scores are collected before one top-k


def _f16_topk(block: np.ndarray, qt: np.ndarray, k: int, base: int, nonneg: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of a float16 block against ``qt`` (D, Q), ranges of rows on one thread per core.

    NumPy's float16 -> float32 cast is scalar and ~10x slower than the matrix product, so rows are widened
    with integer operations instead: ``(h & 0x7fff) << 13 | (h & 0x8000) << 16`` is the float32 whose
    value is ``h * 2**-112`` for every finite half (subnormals and zero included); ``qt`` carries 2**112.
    With ``h`` sign-extended to int32 that is ``(h << 13) & 0x8FFFFFFF`` (just ``h << 13`` when no value
    is negative).
    """
    n = len(block)
    span = _F16_ROWS * _F16_GROUP
    threads = min(resolve_workers(0), max(1, n // span))
    if threads <= 1:
        return _f16_scan(block, qt, k, base, nonneg)
    bounds = [round(n * i / threads) for i in range(threads + 1)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as ex:
        parts = list(ex.map(lambda i: _f16_scan(block[bounds[i]:bounds[i + 1]], qt, k, base + bounds[i], nonneg),
                            range(threads)))
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)


def _f16_scan(block: np.ndarray, qt: np.ndarray, k: int, base: int, nonneg: bool) -> tuple[np.ndarray, np.ndarray]:
    dim, nq = qt.shape
    rows = _F16_ROWS
    span = rows * _F16_GROUP
    h = block.view(np.int16)
    w = np.empty((rows, dim), np.int32)
    f = w.view(np.float32)
    scores = np.empty((min(span, max(len(block), 1)), nq), np.float32)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_p = np.full((nq, 0), -1, dtype=np.int64)
    for g in range(0, len(block), span):
        end = min(g + span, len(block))
        for s in range(g, end, rows):
            m = min(rows, end - s)
            ww = w[:m]
            ww[...] = h[s:s + m]  # sign-extending widen: a negative half becomes 0xFFFF8000 | bits
            ww <<= 13
            if not nonneg:
                ww &= _F16_MASK  # keep the sign as bit 31, drop the three copies of it below
            np.matmul(f[:m], qt, out=scores[s - g:s - g + m])
        cand_s, cand_p = _topk(scores[:end - g].T, np.arange(g, end) + base, k)
        best_s = np.concatenate([best_s, cand_s], axis=1)
        best_p = np.concatenate([best_p, cand_p], axis=1)
        if best_s.shape[1] > 4 * k:
            best_s, best_p = _topk(best_s, best_p, k)
    return best_s, best_p


def _as_f32(rows: np.ndarray) -> np.ndarray:
    """A float32 copy of float32/float16 rows (float16 through the integer widening of :func:`_f16_topk`)."""
    if rows.dtype != np.float16:
        return np.ascontiguousarray(rows, dtype=np.float32)
    w = rows.view(np.int16).astype(np.int32)
    w <<= 13
    w &= _F16_MASK
    out = w.view(np.float32)
    out *= np.float32(_F16_SCALE)
    return out


def _write_file(file: Path, data: bytes | memoryview) -> dict:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": memoryview(data).nbytes}


def _check_file(root: Path, name: str, entry: Any, *, verify: bool) -> None:
    file = root / name
    if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
        raise IndexFileError(f"{root / HEADER_FILE}: no checksum entry for {name}; rebuild the index")
    if not file.is_file():
        raise IndexFileError(f"{file}: missing; the index is incomplete, rebuild it")
    size = file.stat().st_size
    if size != int(entry["bytes"]):
        raise IndexFileError(f"{file}: {size} bytes, the header says {entry['bytes']}: the index is damaged "
                             "(truncated or overwritten); rebuild it")
    if verify:
        if file_digest(file, chunk=_IO_CHUNK) != entry["sha256"]:
            raise IndexFileError(f"{file}: checksum mismatch, the index is damaged; rebuild it")


def _read_vectors(file: Path, entry: dict, shape: tuple, dtype: np.dtype, *, verify: bool,
                  mmap: bool) -> np.ndarray:
    """Read vectors.npy (no pickle), hashing the bytes in the same pass, and check shape and dtype."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                fshape, fortran, fdtype = np.lib.format.read_array_header_1_0(f)
            else:
                fshape, fortran, fdtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise IndexFileError(f"{file}: not a readable .npy file ({e}); the index is damaged, rebuild it") from None
    if tuple(fshape) != tuple(shape) or fdtype != dtype or fortran or fdtype.hasobject:
        raise IndexFileError(f"{file}: holds {fdtype} {tuple(fshape)}, the header says {dtype} {tuple(shape)}: "
                             "the files do not belong together; rebuild the index")
    if mmap:
        if verify:
            _check_file(file.parent, file.name, entry, verify=True)
        return np.load(file, mmap_mode="r", allow_pickle=False)
    out = np.empty(shape, dtype=dtype)
    h = hashlib.sha256()
    with open(file, "rb") as f:
        h.update(f.read(offset))
        mv = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < mv.nbytes:
            n = f.readinto(mv[done:done + _IO_CHUNK])
            if not n:
                raise IndexFileError(f"{file}: truncated; the index is damaged, rebuild it")
            if verify:
                h.update(mv[done:done + n])
            done += n
    if verify and h.hexdigest() != entry.get("sha256"):
        raise IndexFileError(f"{file}: checksum mismatch, the index is damaged; rebuild it")
    return out


# -------------------------------------------------------------------------------------------------------------
# Command line


def _index_images_from_data(tagger: Any, data: Path, args: argparse.Namespace, bs: int
                            ) -> tuple[np.ndarray, list, list[str], list[dict]]:
    """Embeddings of a dataset: from its store when it matches the model's image settings (no decoding),
    else from the image files through the same loader."""
    from .dataset import id_key, iter_posts, post_image_path
    from .progress import bar
    from .store import STORE_DIR, Store

    cfg = tagger.image_config
    store_ok = (data / STORE_DIR).is_dir()
    if store_ok:
        store = Store(data)
        try:
            if store.image_size == cfg.image_size and store.resize == cfg.resize:
                by_key = {}
                for post in iter_posts(data):
                    by_key[id_key(post["id"]).encode()] = post
                keys = [k for k in store.ids() if k in by_key]
                embs, ids, paths = [], [], []
                progress = bar(total=len(keys), desc="index", unit="img", quiet=args.quiet)
                for s in range(0, len(keys), bs):
                    part = keys[s:s + bs]
                    images, _ = store.get_batch(part)
                    embs.append(tagger.embed_arrays(images))
                    for k in part:
                        if k in store.bad:  # left out of the batch: it did not decode
                            continue
                        post = by_key[k]
                        ids.append(post["id"])
                        paths.append(str(post_image_path(post, data)))
                    progress.update(len(part))
                progress.close()
                return (np.concatenate(embs) if embs else np.empty((0, tagger.embedding_dim), np.float32),
                        ids, paths, [{"file": b["key"], "reason": "bad_record", "error": f"store record {b['key']}: {b['reason']}"}
                                     for b in store.bad_report()])
        finally:
            store.close()
    posts = list(iter_posts(data))
    files = [post_image_path(p, data) for p in posts]
    emb, ok, failures = tagger.embed_files(files, quiet=args.quiet, desc="index")
    ids = [posts[i]["id"] for i in ok]
    return emb, ids, [str(files[i]) for i in ok], failures


def run_index(args: argparse.Namespace) -> int:
    """``--index --model DIR (--data DIR | --images DIR) --out INDEX [--approx]``."""
    from .progress import summary
    from .tagger import get_tagger, list_images

    model = args.model
    if not model:
        raise UsageError("--index needs --model DIR (the model whose embeddings are indexed)")
    if bool(args.data) == bool(args.images):
        raise UsageError("--index needs exactly one of --data DIR (a dataset) or --images DIR (a folder)")
    if not args.out:
        raise UsageError("--index needs --out INDEX (a directory to create)")
    if args.approx and not faiss_available():
        raise UsageError("--approx needs faiss: pip install 'alt-i2v[faiss]'")
    t0 = time.perf_counter()
    tagger = get_tagger(model, batch_size=args.batch_size, workers=args.workers)
    bs = tagger.batch_size
    if args.data:
        data = Path(args.data)
        if not data.is_dir():
            raise AltI2VError(f"{data}: no such dataset directory")
        emb, ids, paths, failures = _index_images_from_data(tagger, data, args, bs)
        source = {"data": str(data.resolve())}
    else:
        files = list_images([args.images], recursive=bool(args.recursive))
        if not files:
            raise AltI2VError(f"{args.images}: no images found" + ("" if args.recursive else
                                                                  " (use --recursive for sub-folders)"))
        emb, ok, failures = tagger.embed_files(files, quiet=args.quiet, desc="index")
        paths = [str(Path(files[i]).resolve()) for i in ok]
        ids = list(paths)
        source = {"images": str(Path(args.images).resolve())}
    for f in failures:
        print(f"alt-i2v: skipped {f['error']}", file=sys.stderr)
    if len(emb) == 0:
        raise AltI2VError("no image could be embedded; nothing to index")
    info = {"model": tagger.identity(), "source": source}
    index = SimilarityIndex.build(emb, ids, paths=paths, info=info, approx=bool(args.approx))
    out = index.save(args.out)
    summary("index", {"index": str(out), "images": len(index), "failed": len(failures), "dim": index.dim,
                      "approximate": index.approx_params or "no (exact search)",
                      "seconds": round(time.perf_counter() - t0, 1)}, quiet=args.quiet)
    return 1 if failures else 0


def run_similar(args: argparse.Namespace) -> int:
    """``--similar FILE --index INDEX [--top-k 10] [--model DIR]``: nearest images with cosine scores."""
    from .tagger import get_tagger

    if not args.index:
        raise UsageError("--similar needs --index INDEX (made by --index)")
    index = SimilarityIndex.load(args.index)
    model_info = index.info.get("model") or {}
    model = args.model or model_info.get("path")
    if not model:
        raise UsageError("the index does not name its model; give --model DIR")
    if not Path(model).exists():
        raise AltI2VError(f"{model}: the model this index was built with is not there; give --model DIR")
    tagger = get_tagger(model)
    ident = tagger.identity()
    if model_info and (ident.get("fingerprint") != model_info.get("fingerprint")
                       or ident.get("embedding_dim") != index.dim):
        raise IndexFileError(f"{args.index} was built with a different model ({model_info.get('path')}); its "
                             "neighbours would be meaningless: give the right --model or rebuild the index")
    if tagger.embedding_dim != index.dim:
        raise IndexFileError(f"the model gives {tagger.embedding_dim}-d embeddings, the index holds {index.dim}-d")
    query = tagger.embed(args.similar)
    k = args.top_k or 10
    scores, pos = index.search_positions(query[None, :], k)
    print(f"nearest to {args.similar} ({len(index)} indexed, "
          f"{'approximate' if index.has_approx else 'exact'} search, cosine):")
    for rank, (s, p) in enumerate(zip(scores[0], pos[0]), 1):
        if p < 0:
            continue
        ident_ = index.id_at(int(p))
        path = index.path_at(int(p))
        label = path if path is not None and str(ident_) == path else \
            (f"{ident_}  {path}" if path is not None else str(ident_))
        print(f"{rank:3d}  {s:.4f}  {label}")
    return 0


__all__ = ["SimilarityIndex", "IndexFileError", "normalize_rows", "faiss_available", "run_index", "run_similar",
           "INDEX_FORMAT", "INDEX_VERSION"]
