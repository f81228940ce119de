"""Similar-image search latency: exact (chunked matrix product) and approximate (faiss IVF-SQ8 + exact
re-rank) at 100k and 1M x 2048 generated embeddings, with the approximate recall@10 against exact.

The vectors imitate image embeddings: clusters (same subject) with structured variation inside a cluster
(a 16-d subspace: pose, colours) and small noise; queries are fresh samples of the same distribution, so
their true neighbours are the close members of their cluster. 100k is stored as float32 (800 MB), 1M as
float16 (4 GB; the exact search converts it chunk by chunk, never all at once).

    python scripts/bench_search.py                 # 100k and 1M (about 4.5 GB of RAM at 1M)
    python scripts/bench_search.py --sizes 100000  # quicker

Exact latency is given for one query at a time and per query in a batch of 64 (how --index/--similar
and a folder of queries use it). The naive way (full scores, full argsort) is measured beside it at
sizes where its full-size temporary is reasonable. Last line:
``RESULT search exact_100k_ms=<single query> recall10=<approx> ratio=<exact/approx at the largest size>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from alt_i2v.search import SimilarityIndex, faiss_available  # noqa: E402

DIM = 2048


class Generator:
    """Clustered vectors: center[c] + (z @ basis) * spread + uniform noise."""

    def __init__(self, dim: int, clusters: int, seed: int = 0, rank: int = 16, spread: float = 0.2,
                 noise: float = 0.005):
        rng = np.random.default_rng(seed)
        self.dim, self.rank = dim, rank
        self.centers = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.basis = rng.standard_normal((rank, dim), dtype=np.float32) * spread
        self.noise = noise

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        c = rng.integers(0, len(self.centers), n)
        z = rng.standard_normal((n, self.rank), dtype=np.float32)
        x = self.centers[c]
        x += z @ self.basis
        x += rng.integers(-127, 128, (n, self.dim), dtype=np.int8).astype(np.float32) * self.noise
        return x


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def bench(n: int, args: argparse.Namespace) -> dict:
    dtype = args.dtype if args.dtype != "auto" else ("float32" if n * DIM * 4 <= 2 << 30 else "float16")
    gen = Generator(DIM, clusters=max(10, n // 500), seed=0)
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    index = SimilarityIndex(DIM, dtype=dtype)
    chunk = 32768
    for s in range(0, n, chunk):
        index.add(gen.sample(rng, min(chunk, n - s)))
    t_gen = time.perf_counter() - t0
    queries = gen.sample(np.random.default_rng(2), args.queries)
    k = 10
    row = {"n": n, "dtype": dtype, "generate_s": t_gen}
    print(f"\n== {n:,} x {DIM} {dtype} ({index.count * DIM * np.dtype(dtype).itemsize / 2**30:.2f} GiB), "
          f"generated and indexed in {t_gen:.1f} s", flush=True)

    singles = 10 if n <= 200_000 else 2
    index.search_positions(queries[:1], k, approx=False)  # warm
    ms = [timed(lambda i=i: index.search_positions(queries[i:i + 1], k, approx=False), 1)[0]
          for i in range(singles)]
    row["exact_ms"] = statistics.median(ms)
    t = time.perf_counter()
    _, truth = index.search_positions(queries, k, approx=False)  # all queries at once: also ground truth
    row["exact_batch_ms"] = (time.perf_counter() - t) * 1000 / len(queries)
    print(f"exact   one query        : {row['exact_ms']:8.2f} ms  (median of {singles})")
    print(f"exact   batch of {len(queries):3d}      : {row['exact_batch_ms']:8.2f} ms per query")

    if dtype == "float32" and n <= 200_000:
        x = index.vectors()
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        naive = [timed(lambda i=i: np.argsort(-(x @ qn[i]))[:k], 1)[0] for i in range(singles)]
        row["naive_ms"] = statistics.median(naive)
        print(f"naive   full scores+sort : {row['naive_ms']:8.2f} ms  (x{row['naive_ms'] / row['exact_ms']:.2f} "
              "the exact search)")

    if faiss_available() and not args.no_approx:
        t = time.perf_counter()
        index.build_approx(nprobe=args.nprobe)
        row["approx_build_s"] = time.perf_counter() - t
        index.search_positions(queries[:1], k, approx=True)
        ms = [timed(lambda i=i: index.search_positions(queries[i:i + 1], k, approx=True), 1)[0]
              for i in range(min(50, len(queries)))]
        row["approx_ms"] = statistics.median(ms)
        _, found = index.search_positions(queries, k, approx=True)
        row["recall10"] = recall_at(found, truth, k)
        p = index.approx_params
        print(f"approx  one query        : {row['approx_ms']:8.2f} ms  (IVF-SQ8 nlist={p['nlist']} "
              f"nprobe={p['nprobe']} refine={p['refine']}, built in {row['approx_build_s']:.1f} s)")
        print(f"approx  recall@10        : {row['recall10']:8.3f}  over {len(queries)} queries  "
              f"(x{row['exact_ms'] / row['approx_ms']:.1f} faster than exact)")
    elif not args.no_approx:
        print("approx  skipped: faiss is not installed (pip install 'alt-i2v[faiss]')")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated index sizes")
    p.add_argument("--queries", type=int, default=100, help="queries for recall and batched latency")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16"])
    p.add_argument("--nprobe", type=int, default=None, help="approximate: lists visited per query")
    p.add_argument("--no-approx", action="store_true")
    args = p.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    t0 = time.perf_counter()
    rows = [bench(n, args) for n in sizes]
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    by_n = {r["n"]: r for r in rows}
    base = by_n.get(100_000, rows[0])
    last = rows[-1]
    recall = min((r["recall10"] for r in rows if "recall10" in r), default=float("nan"))
    ratio = last["exact_ms"] / last["approx_ms"] if "approx_ms" in last else float("nan")
    tag = "exact_100k_ms" if base["n"] == 100_000 else f"exact_{base['n']}_ms"
    print(f"RESULT search {tag}={base['exact_ms']:.2f} exact_batch_ms={base['exact_batch_ms']:.2f} "
          f"recall10={recall:.3f} ratio={ratio:.1f} target=exact_100k_ms<20,recall10>=0.95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
