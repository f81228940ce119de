"""Which index type for which size (``--index-type auto``) and the shape of an ivf-pq index."""

from __future__ import annotations

import math

KINDS = ("exact", "ivf-sq8", "ivf-pq")
PQ_WIDTH = 1024  # ivf-pq: wider embeddings are reduced to this by the OPQ transform (256 lost the ranking:
# on 100k x 2048 vectors of 4,000 clusters recall@10 with every list visited was 0.36 at 256, 1.0 at 1024)
PQ_MIN = 1000  # fewer vectors cannot train 256 centroids per sub-quantiser


def choose_kind(count: int, dim: int) -> str:
    """``--index-type auto``: exact while the float32 vectors fit in 1 GiB (131k at 2048), ivf-sq8 (vectors
    + codes in memory) up to 4 GiB of them (524k at 2048), ivf-pq (codes in memory, vectors on disk) above."""
    size = int(count) * int(dim) * 4
    if size <= 1 << 30:
        return "exact"
    return "ivf-sq8" if size <= 4 << 30 else "ivf-pq"


def pq_shape(dim: int) -> tuple[int, int]:
    """``(width, m)`` of an ivf-pq index: the OPQ output width (``dim`` up to PQ_WIDTH, else PQ_WIDTH) and
    the number of sub-quantisers (1 byte each): the largest divisor of the width up to width/4 and 256."""
    width = min(int(dim), PQ_WIDTH)
    m = max(x for x in range(1, max(1, width // 4) + 1) if width % x == 0 and x <= 256)
    return width, m


def pq_lists(count: int) -> int:
    """Inverted lists of an ivf-pq index of ``count`` vectors: ~4 sqrt(N) (at most 65,536, at least 39 rows a
    list). On 200k x 2048 clustered vectors recall@10 was 1.0 at nprobe 8 of 1,788 lists against 0.93 at
    nprobe 8 of 447 (sqrt(N)); the extra coarse distances cost less than the rows no longer scanned."""
    count = int(count)
    return max(1, min(round(4 * math.sqrt(count)), 65536, count // 39 or 1))


def pq_train_rows(nlist: int, count: int) -> int:
    """Rows the quantisers of an ivf-pq index learn from: 24 a list, at least 65,536 (all when fewer)."""
    return min(int(count), max(24 * int(nlist), 65536))


def resolve_kind(kind: str, count: int, dim: int) -> str:
    """``kind`` checked, "auto" made concrete by :func:`choose_kind`."""
    if kind == "auto":
        return choose_kind(count, dim)
    if kind not in KINDS:
        raise ValueError(f"index type must be auto or one of {KINDS}, got {kind!r}")
    return kind
