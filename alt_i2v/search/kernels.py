"""The exact-search kernels: a running top-k, and the float16 scan that widens half floats with integer
operations (NumPy's own float16 -> float32 cast is scalar and about 10x slower than the matrix product)."""

from __future__ import annotations

import numpy as np

from ..config import resolve_workers


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
