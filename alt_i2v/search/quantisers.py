"""The faiss parts of an approximate index, untrained and trained: one place for their settings, used by
:meth:`.index.SimilarityIndex.build_approx` and by the list-coverage measurement of scripts/bench_search.py."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .files import _import_faiss
from .kinds import FLAT_LISTS, OPQ_WIDTH, pq_shape

COARSE_K_FACTOR = 16  # the PQ-coded coarse quantiser re-ranks its best 16 x nprobe centroids exactly


def new_ivf_sq8(dim: int, nlist: int) -> Any:
    """An untrained IVF index with 8-bit scalar-quantised vectors. L2 on unit vectors ranks like cosine, and
    its k-means cells keep neighbours together better than inner-product cells (measured: recall@10 0.99
    vs 0.91 at the same nprobe)."""
    faiss = _import_faiss()
    return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                         faiss.METRIC_L2)


def _ivf_pq_fastscan(quantizer: Any, width: int, nlist: int, msub: int) -> Any:
    """An untrained IVF with 4-bit fast-scan PQ codes of ``msub`` sub-quantisers over ``quantizer``."""
    faiss = _import_faiss()
    ivf = faiss.IndexIVFPQFastScan(quantizer, width, nlist, msub, 4)
    ivf.pq.cp.niter = 12
    ivf.pq.cp.max_points_per_centroid = 64
    return ivf


def new_ivf_pq(dim: int, nlist: int) -> tuple[Any, Any]:
    """The untrained parts of an ivf-pq index of ``dim``-wide vectors: ``(opq or None, ivf)``. 4-bit codes
    scanned 32 at a time with SIMD lookups (faiss "fast scan"): 4-6x faster than 8-bit PQ at the same recall,
    which the re-rank of 10·k candidates restores (docs/search.md); OPQ (a learned rotation, so PQ's
    sub-spaces carry equal energy) for vectors wider than :data:`.kinds.OPQ_WIDTH`. The coarse quantiser is
    flat; :func:`train_ivf` puts in a PQ-coded one when the lists are many."""
    faiss = _import_faiss()
    width, msub = pq_shape(dim)
    ivf = _ivf_pq_fastscan(faiss.IndexFlatL2(width), width, nlist, msub)
    opq = None
    if dim > OPQ_WIDTH:
        opq = faiss.OPQMatrix(dim, msub, width)
        opq.niter, opq.niter_pq, opq.niter_pq_0 = 6, 4, 10
        opq.max_train_points = 32768
    return opq, ivf


def pq_coarse(centroids: np.ndarray, m: int, k_factor: int = COARSE_K_FACTOR) -> Any:
    """A coarse quantiser over many full-width centroids: their 4-bit fast-scan PQ codes, scanned for the
    best ``k_factor`` x k, re-ranked with the float32 centroids (faiss IndexRefineFlat). Flat search
    reads every centroid (60k x 2048 x 4 B = 0.5 GB a query at 10M: 46 ms); an HNSW graph over centroids
    this wide misses the nearest one for 4-30% of the vectors; this finds it for all of them in 0.6 ms
    (measured by scripts/bench_search.py, docs/search.md)."""
    faiss = _import_faiss()
    d = centroids.shape[1]
    base = faiss.IndexPQFastScan(d, m, 4)
    base.train(centroids)
    coarse = faiss.IndexRefineFlat(base)
    coarse.add(centroids)
    coarse.k_factor = int(k_factor)
    return coarse


def train_ivf(opq: Any, ivf: Any, read: Any, count: int, seed: int = 0, timings: dict | None = None) -> Any:
    """Train ``opq`` (or None) and then ``ivf`` on a sample of ``count`` rows, ``read(positions)`` giving
    float32 rows of the sample (sorted positions, read 65,536 at a time, so a memory-mapped block is read in
    runs); returns the faiss index to fill. The rotation learns from 32,768 of the rows, the lists (flat
    k-means) and codes from all of them, rotated. Above :data:`.kinds.FLAT_LISTS` lists the coarse
    quantiser becomes :func:`pq_coarse` over the k-means centroids. ``timings`` receives the seconds of the
    rotation (a fixed cost) and of the lists and codes (which grow with the sample times the lists)."""
    faiss = _import_faiss()
    t0 = time.perf_counter()
    cp = ivf.cp
    cp.niter = 12
    cp.seed = seed
    cp.max_points_per_centroid = 128
    cp.min_points_per_centroid = 12  # faiss warns below its 39 otherwise; 12 is the ivf-pq sample
    if opq is not None:
        pq4 = faiss.ProductQuantizer(ivf.d, ivf.pq.M, 4)  # the rotation learns for the 4-bit codes it prepares
        opq.pq = pq4
        opq.train(read(np.linspace(0, count - 1, min(count, 32768)).astype(np.int64)))
        opq.pq = None
    t1 = time.perf_counter()
    train = np.empty((count, ivf.d), np.float32)
    for s in range(0, count, 65536):
        rows = read(np.arange(s, min(s + 65536, count)))
        train[s:s + 65536] = rows if opq is None else opq.apply(rows)
    if ivf.nlist > FLAT_LISTS:
        clus = faiss.Clustering(ivf.d, int(ivf.nlist), cp)
        clus.train(train, faiss.IndexFlatL2(ivf.d))
        centroids = faiss.vector_to_array(clus.centroids).reshape(-1, ivf.d)
        # the same IVF over the PQ-coded quantiser, which already holds the lists: ivf.train skips k-means
        ivf = _ivf_pq_fastscan(pq_coarse(centroids, ivf.pq.M), ivf.d, int(ivf.nlist), ivf.pq.M)
        train = train[np.linspace(0, count - 1, min(count, 65536)).astype(np.int64)]
    ivf.train(train)
    if timings is not None:
        timings.update(rotation=round(t1 - t0, 2), lists=round(time.perf_counter() - t1, 2))
    return ivf if opq is None else faiss.IndexPreTransform(opq, ivf)
