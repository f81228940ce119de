"""The faiss parts of an approximate index, untrained and trained: one place for their settings, used by
:meth:`.index.SimilarityIndex.build_approx` and by the list-coverage measurement of scripts/bench_search.py."""

from __future__ import annotations

from typing import Any

import numpy as np

from .files import _import_faiss
from .kinds import pq_shape


def new_ivf_sq8(dim: int, nlist: int) -> Any:
    """An untrained IVF index with 8-bit scalar-quantised vectors. L2 on unit vectors ranks like cosine, and
    its k-means cells keep neighbours together better than inner-product cells (measured: recall@10 0.99
    vs 0.91 at the same nprobe)."""
    faiss = _import_faiss()
    return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                         faiss.METRIC_L2)


def new_ivf_pq(dim: int, nlist: int) -> tuple[Any, Any]:
    """The untrained parts of an ivf-pq index of ``dim``-wide vectors: ``(opq or None, ivf)``. 4-bit codes
    scanned 32 at a time with SIMD lookups (faiss "fast scan"): 4-6x faster than 8-bit PQ at the same recall,
    which the re-rank of 10·k candidates restores (docs/search.md); OPQ (a learned rotation + reduction, so
    PQ's sub-spaces carry equal energy) for vectors wider than :data:`.kinds.PQ_WIDTH`."""
    faiss = _import_faiss()
    width, msub = pq_shape(dim)
    ivf = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(width), width, nlist, msub, 4)
    ivf.pq.cp.niter = 12
    ivf.pq.cp.max_points_per_centroid = 64
    opq = None
    if width < dim:
        opq = faiss.OPQMatrix(dim, msub, width)
        opq.niter, opq.niter_pq, opq.niter_pq_0 = 6, 4, 10
        opq.max_train_points = 32768
    return opq, ivf


def train_ivf(opq: Any, ivf: Any, read: Any, count: int, seed: int = 0) -> Any:
    """Train ``opq`` (or None) and then ``ivf`` on a sample of ``count`` rows, ``read(positions)`` giving
    float32 rows of the sample (sorted positions, read 65,536 at a time, so a memory-mapped block is read in
    runs); returns the faiss index to fill. The rotation learns from 32,768 of the rows, the lists and codes
    from the rows after it, so the sample never exists at full width."""
    faiss = _import_faiss()
    ivf.cp.niter = 12
    ivf.cp.seed = seed
    ivf.cp.max_points_per_centroid = 128
    ivf.cp.min_points_per_centroid = 24  # faiss warns below its 39 otherwise; 24 is the ivf-pq sample
    if opq is not None:
        opq.train(read(np.linspace(0, count - 1, min(count, 32768)).astype(np.int64)))
    train = np.empty((count, ivf.d), np.float32)
    for s in range(0, count, 65536):
        rows = read(np.arange(s, min(s + 65536, count)))
        train[s:s + 65536] = rows if opq is None else opq.apply(rows)
    ivf.train(train)
    return ivf if opq is None else faiss.IndexPreTransform(opq, ivf)
