"""Similar-image search: an index of L2-normalised embeddings, exact by default, approximate with faiss.

Exact search is a matrix product of the stored vectors (float32, or float16 for half the memory) with the
queries, done chunk by chunk with a running top-k (:mod:`.kernels`), so 1M x 2048 never needs a full-size
temporary. The optional approximate backends (``pip install alt-i2v[faiss]``) are faiss IVF indexes (L2 on
the unit vectors, which ranks like cosine) whose candidates are re-ranked with the exact vectors:

- ``ivf-sq8``: 8-bit scalar quantisation (d bytes a vector), the vectors in memory;
- ``ivf-pq``: ~N/167 full-width lists (many: a coarse quantiser on PQ codes of their centroids), an OPQ
  rotation of wide embeddings and 4-bit product quantisation scanned by faiss's fast-scan kernels (m/2
  bytes, 128 at 2048), the float16 vectors memory-mapped from disk: RAM holds the codes and the disk holds
  the rest. :mod:`.large` builds one of those in bounded memory.

Removing an id leaves its row in place, marked removed (its codes leave the faiss index); a rebuild
reclaims the space. :mod:`.files` writes and reads the index directory.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AltI2VError
from .files import DTYPES, IndexFileError, _import_faiss, load_index, save_index
from .kernels import _F16_SCALE, _as_f32, _f16_topk, _topk, normalize_rows
from .kinds import PQ_MIN, pq_lists, pq_train_rows, resolve_kind
from .quantisers import new_ivf_pq, new_ivf_sq8, train_ivf

_CHUNK_BYTES = 64 << 20  # largest temporary of an exact search (scores, or float16 rows made float32)
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
        self._removed: set[int] = set()  # positions whose id was removed (rows kept until a rebuild)
        self.count = 0  # rows, removed ones included

    # ---------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, embeddings: np.ndarray, ids: Sequence | None = None, *, paths: Sequence[str] | None = None,
              dtype: str | None = None, approx: bool = False, kind: str | None = None, info: dict | None = None,
              **approx_kw: Any) -> "SimilarityIndex":
        """A new index of ``embeddings`` (N, D); ``ids`` default to 0..N-1. ``kind`` "exact" (default),
        "ivf-sq8" (also ``approx=True``), "ivf-pq" or "auto" (:func:`.kinds.choose_kind`) trains a faiss backend
        (``nlist``, ``nprobe``, ``refine`` may be given). ``dtype`` defaults to float16 for ivf-pq (its
        re-rank vectors), float32 otherwise."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
        kind = resolve_kind(kind or ("ivf-sq8" if approx else "exact"), emb.shape[0], emb.shape[1])
        index = cls(emb.shape[1], dtype=dtype or ("float16" if kind == "ivf-pq" else "float32"), info=info)
        if ids is None:
            index._ids = None
        index.add(emb, ids, paths=paths)
        if kind != "exact":
            index.build_approx(kind=kind, **approx_kw)
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
                rows = np.ascontiguousarray(block[s:s + step], dtype=np.float32)
                # explicit ids: after a removal faiss's own count is no longer the next row's position
                self._approx.add_with_ids(rows, np.arange(self.count + s, self.count + s + len(rows), dtype=np.int64))
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
            self._id_pos = {i: k for k, i in enumerate(self._ids or []) if k not in self._removed}
        return self._id_pos

    def remove(self, ids: Sequence) -> int:
        """Remove ``ids`` (KeyError naming the first unknown one, nothing removed then): their rows stay
        in place, never returned again, and their codes leave the approximate index. Returns how many."""
        ids = [_check_id(i) for i in ids]
        missing = [i for i in ids if not self._has(i)]
        if missing:
            raise KeyError(f"not in the index: {missing[:5]}")
        pos = sorted({self.position(i) for i in ids})
        if self._approx is not None and pos:
            self._approx.remove_ids(np.asarray(pos, dtype=np.int64))
        self._removed.update(pos)
        if self._ids is not None:
            index_of = self._positions()
            for i in ids:
                index_of.pop(i, None)
        return len(pos)

    def _has(self, id_: Any) -> bool:
        try:
            self.position(id_)
        except KeyError:
            return False
        return True

    @property
    def removed(self) -> list[int]:
        """Positions of removed rows (sorted)."""
        return sorted(self._removed)

    # ---------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        """Vectors that can be found (rows less removed ones)."""
        return self.count - len(self._removed)

    @property
    def kind(self) -> str:
        """"exact", "ivf-sq8" or "ivf-pq"."""
        return str(self.approx_params["kind"]).lower() if self.approx_params else "exact"

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
        """Row of an id (KeyError if absent or removed)."""
        if self._ids is None:
            if isinstance(id_, int) and 0 <= id_ < self.count and id_ not in self._removed:
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
        want = min(int(k), len(self))
        if want == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        k = min(want + len(self._removed), self.count)  # removed rows may take places: ask for more
        use_approx = self._approx is not None if approx is None else bool(approx)
        if use_approx:
            if self._approx is None:
                raise AltI2VError("this index has no approximate backend; build it with approx=True "
                                  "(--approx) or search with approx=False")
            scores, pos = self._search_approx(q, k)
        else:
            scores, pos = self._search_exact(q, k)
        if self._removed:
            scores, pos = self._drop_removed(scores, pos, want)
        np.clip(scores, -1.0, 1.0, out=scores)  # rounding can put a self-match a hair above 1
        return scores, pos

    def _drop_removed(self, scores: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` per row that are not removed (rows are sorted best first)."""
        gone = np.isin(pos, np.fromiter(self._removed, np.int64, len(self._removed)))
        order = np.argsort(gone, axis=1, kind="stable")[:, :k]  # kept ones first, order unchanged
        s, p = np.take_along_axis(scores, order, 1), np.take_along_axis(pos, order, 1)
        dropped = np.take_along_axis(gone, order, 1)
        s[dropped], p[dropped] = -np.inf, -1
        return np.ascontiguousarray(s), np.ascontiguousarray(p)

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
        kk = min(self.count, max(k, 10) * refine)  # a short k still re-ranks as many as k=10 would
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
    def build_approx(self, nlist: int | None = None, nprobe: int | None = None, refine: int | None = None,
                     train_size: int | None = None, target_recall: float = 0.95, seed: int = 0,
                     kind: str = "ivf-sq8", progress: Any = None) -> None:
        """Train a faiss IVF index on a sample, fill it, then measure its recall.

        ``kind`` "ivf-sq8" (8-bit scalar quantisation) or "ivf-pq" (OPQ + product quantisation, see
        :func:`.kinds.pq_shape`). ``nlist`` inverted lists (default ~sqrt(N)/4 for ivf-sq8, N/167 for ivf-pq);
        ``nprobe`` lists visited per query (default: the smallest that reaches ``target_recall`` recall@10
        against exact search, measured on stored vectors used as queries, see :meth:`calibrate`);
        ``refine``: candidates per wanted neighbour re-ranked with the exact vectors (4, 10 for ivf-pq);
        ``train_size``: the sample the quantisers learn from. Rows are read a chunk at a time (a
        memory-mapped block is never read whole); ``progress(rows)`` is called as they are added. The
        measured recall is kept in ``approx_params["recall10"]``.
        """
        _import_faiss()  # a clear error before any work when faiss is missing
        n = self.count
        if n == 0:
            raise ValueError("add vectors before building the approximate index")
        if kind not in ("ivf-sq8", "ivf-pq"):
            raise ValueError(f"approximate kind must be ivf-sq8 or ivf-pq, got {kind!r}")
        params: dict[str, Any] = {"backend": "faiss", "kind": kind.upper(), "metric": "l2"}
        opq = None
        if kind == "ivf-sq8":
            nlist = int(nlist or max(1, min(4096, round(math.sqrt(n) / 4))))
            nlist = max(1, min(nlist, n // 8 or 1))
            ivf = new_ivf_sq8(self.dim, nlist)
            m = min(n, int(train_size or max(nlist * 128, 20_000)))
            refine = int(refine or 4)
        else:
            if n < PQ_MIN:
                raise ValueError(f"an ivf-pq index needs at least {PQ_MIN} vectors to train its quantisers, "
                                 f"this one has {n}: use exact search (--index-type exact)")
            nlist = max(1, min(int(nlist or pq_lists(n)), n // 39 or 1))
            opq, ivf = new_ivf_pq(self.dim, nlist)
            m = min(n, int(train_size or pq_train_rows(nlist, n)))  # full width: ~5.5 GiB at 10M x 2048
            refine = int(refine or 10)
            params.update(width=ivf.d, m=ivf.pq.M, nbits=4, fastscan=True, opq=opq is not None)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        t0 = time.perf_counter()
        parts: dict = {}
        index = train_ivf(opq, ivf, lambda sel: self._rows(sample[sel]), len(sample), seed=seed, timings=parts)
        t1 = time.perf_counter()
        step = max(1, _CHUNK_BYTES // (4 * self.dim))
        offset = 0
        for block in self._blocks:
            for s in range(0, len(block), step):
                rows = _as_f32(block[s:s + step])
                index.add_with_ids(rows, np.arange(offset + s, offset + s + len(rows), dtype=np.int64))
                if progress is not None:
                    progress(len(rows))
            offset += len(block)
        if self._removed:
            index.remove_ids(np.asarray(sorted(self._removed), dtype=np.int64))
        self._approx = index
        t2 = time.perf_counter()
        self.approx_params = {**params, "nlist": nlist, "nprobe": 1, "refine": refine, "train_size": int(m)}
        self.calibrate(target_recall=target_recall, nprobe=nprobe, seed=seed)
        self.approx_params["seconds"] = {"train": round(t1 - t0, 2), **parts, "add": round(t2 - t1, 2),
                                         "calibrate": round(time.perf_counter() - t2, 2)}

    def _ivf(self):
        """The IVF part of the faiss index (under the OPQ transform of an ivf-pq index)."""
        faiss = _import_faiss()
        return faiss.extract_index_ivf(self._approx)

    def calibrate(self, target_recall: float = 0.95, nprobe: int | None = None, k: int = 10,
                  queries: int = 64, seed: int = 0) -> float:
        """Measure the approximate recall@k against exact search, using ``queries`` stored vectors as
        queries (their own row left out of both answers). With ``nprobe`` None, pick the smallest nprobe
        of a 1, 2, 3, 4, 6, 8, 12, ... ladder that reaches ``target_recall``. Returns the recall."""
        if self._approx is None:
            raise AltI2VError("this index has no approximate backend")
        live = np.setdiff1d(np.arange(self.count), np.fromiter(self._removed, np.int64, len(self._removed)))
        n = len(live)
        m = min(queries, n)
        rows = np.sort(np.random.default_rng(seed + 1).choice(live, size=m, replace=False))
        q = self._rows(rows)
        kk = min(k + 1, n)
        _, truth = self.search_positions(q, kk, approx=False)
        want = [[p for p in t if p != r][:k] for t, r in zip(truth, rows)]

        ivf = self._ivf()

        def recall(probe: int) -> float:
            ivf.nprobe = probe
            _, found = self.search_positions(q, kk, approx=True)
            got = [[p for p in f if p != r][:k] for f, r in zip(found, rows)]
            return float(np.mean([len(set(g) & set(w)) / max(1, len(w)) for g, w in zip(got, want)]))

        nlist = int(ivf.nlist)
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
        if measured is None or ivf.nprobe != chosen:
            measured = recall(chosen)
        ivf.nprobe = chosen
        self.approx_params.update(nprobe=chosen, recall10=round(measured, 4), recall_queries=m)
        return measured

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per approximate query: higher is slower and more accurate."""
        if self._approx is None:
            raise AltI2VError("this index has no approximate backend")
        self._ivf().nprobe = int(nprobe)
        self.approx_params["nprobe"] = int(nprobe)

    def drop_approx(self) -> None:
        self._approx = None
        self.approx_params = None

    # ---------------------------------------------------------------------------------------------- disk
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index directory atomically (a temp directory renamed into place)."""
        return save_index(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True, mmap: bool = False) -> "SimilarityIndex":
        """Read an index directory. ``verify`` checks every file's sha256 (one pass over the data);
        ``mmap`` maps the vectors read-only instead of reading them into memory."""
        return load_index(cls, path, verify=verify, mmap=mmap)
