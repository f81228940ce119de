"""Which index type for which size (``--index-type auto``) and the shape of an ivf-pq index."""

from __future__ import annotations

KINDS = ("exact", "ivf-sq8", "ivf-pq")
OPQ_WIDTH = 1024  # ivf-pq: wider embeddings get an OPQ rotation, so that PQ's sub-spaces carry equal energy
PQ_MIN = 1000  # fewer vectors cannot train 256 centroids per sub-quantiser
ROWS_PER_LIST = 167  # ivf-pq: ~3 lists for a group of 500 near neighbours (docs/search.md)
FLAT_LISTS = 1024  # ivf-pq with more lists: coarse quantiser on PQ codes of the centroids (quantisers.py)


def choose_kind(count: int, dim: int) -> str:
    """``--index-type auto``: exact while the float32 vectors fit in 1 GiB (131k at 2048), ivf-sq8 (vectors
    + codes in memory) up to 4 GiB of them (524k at 2048), ivf-pq (codes in memory, vectors on disk) above."""
    size = int(count) * int(dim) * 4
    if size <= 1 << 30:
        return "exact"
    return "ivf-sq8" if size <= 4 << 30 else "ivf-pq"


def pq_shape(dim: int) -> tuple[int, int]:
    """``(width, m)`` of an ivf-pq index: the width its lists and codes work in (the embedding's own: a
    reduction hides from the coarse quantiser what separates groups of neighbours, docs/search.md) and the
    number of 4-bit sub-quantisers: the largest divisor of the width up to width/4 and 256."""
    width = int(dim)
    m = max(x for x in range(1, max(1, width // 4) + 1) if width % x == 0 and x <= 256)
    return width, m


def pq_lists(count: int) -> int:
    """Inverted lists of an ivf-pq index of ``count`` vectors: one per ROWS_PER_LIST rows (at most 65,536).
    A list should hold part of one group of near neighbours, not pieces of several: on 2M x 2048 clustered
    vectors (4,000 groups) recall@10 0.95 needed 47 of 5,657 lists (4 sqrt(N)) but 3 of 12,000. The coarse
    search then grows with N, which the PQ-coded coarse quantiser keeps cheap (0.6 ms over 60k lists)."""
    return max(1, min(int(count) // ROWS_PER_LIST, 65536))


def pq_train_rows(nlist: int, count: int) -> int:
    """Rows the quantisers of an ivf-pq index learn from: 12 a list, at least 65,536 (all when fewer)."""
    return min(int(count), max(12 * int(nlist), 65536))


def resolve_kind(kind: str, count: int, dim: int) -> str:
    """``kind`` checked, "auto" made concrete by :func:`choose_kind`."""
    if kind == "auto":
        return choose_kind(count, dim)
    if kind not in KINDS:
        raise ValueError(f"index type must be auto or one of {KINDS}, got {kind!r}")
    return kind
