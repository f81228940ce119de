"""Similar-image search latency: exact (chunked matrix product) and approximate (faiss IVF-SQ8 + exact
re-rank) at 100k and 1M x 2048 generated embeddings, with the approximate recall@10 against exact; and
``--large N``: an ivf-pq index (OPQ + PQ codes in memory, float16 vectors memory-mapped from disk for the
re-rank) built in bounded memory from N generated vectors streamed in chunks, with its memory and time per
vector, so the figures for 10M x 2048 follow by formula.

The vectors imitate image embeddings: clusters (same subject) with structured variation inside a cluster
(a 16-d subspace: pose, colours) and small noise; queries are fresh samples of the same distribution, so
their true neighbours are the close members of their cluster. 100k is stored as float32 (800 MB), 1M as
float16 (4 GB; the exact search converts it chunk by chunk, never all at once).

    python scripts/bench_search.py                 # 100k and 1M (about 4.5 GB of RAM at 1M)
    python scripts/bench_search.py --sizes 100000  # quicker

    nice -n 10 python scripts/bench_search.py --large 2000000 --record            # 2M x 2048, ~45 min
    nice -n 10 python scripts/bench_search.py --large 10000000 --dim 128 --record # 10M at width 128
    python scripts/bench_search.py --coverage 10000000   # lists a 10M x 2048 query must visit (no index built)
    python scripts/bench_search.py --coarse 500000       # coarse quantisers over N/167 full-width lists

Exact latency is given for one query at a time and per query in a batch of 64 (how --index/--similar
and a folder of queries use it). The naive way (full scores, full argsort) is measured beside it at
sizes where its full-size temporary is reasonable. Last line:
``RESULT search exact_100k_ms=<single query> recall10=<approx> ratio=<exact/approx at the largest size>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

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


TARGET = {"n": 10_000_000, "dim": 2048, "ram_gib": 4.0, "recall10": 0.95, "query_ms": 10.0, "build_h": 1.0,
          "cores": 16}


def rss_anon_of_loaded(path: Path, queries: np.ndarray) -> tuple[int, int]:
    """Anonymous memory (not the mapped vector file) of a fresh process before and after opening the index
    at ``path`` and answering ``queries``: what the index costs in RAM."""
    import subprocess

    code = ("import sys, numpy as np\n"
            "from alt_i2v.search import SimilarityIndex\n"
            "import faiss; faiss.omp_set_num_threads(1)\n"
            "def anon():\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024\n"
            "a = anon()\n"
            "index = SimilarityIndex.load(sys.argv[1], verify=False)\n"
            "q = np.load(sys.argv[2])\n"
            "index.search_positions(q, 10)\n"
            "print(a, anon())\n")
    qfile = path.parent / (path.name + ".queries.npy")
    np.save(qfile, queries)
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(qfile)], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    qfile.unlink()
    return int(out[0]), int(out[1])


def drop_cached(file: Path) -> None:
    """Ask the kernel to forget ``file``'s cached pages, so the next reads come from the disk."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_large(n: int, dim: int, args: argparse.Namespace) -> dict:
    """Stream ``n`` generated vectors into an ivf-pq index on disk and measure it, one thread throughout."""
    import faiss

    from alt_i2v.search.kernels import _topk, normalize_rows
    from alt_i2v.search.large import build_streaming

    faiss.omp_set_num_threads(1)
    gen = Generator(dim, clusters=max(10, n // 500), seed=0)
    queries = gen.sample(np.random.default_rng(2), args.queries)
    qn = normalize_rows(queries)
    k = 10
    truth = {"s": np.full((len(qn), 0), -np.inf, np.float32), "p": np.full((len(qn), 0), -1, np.int64)}
    spent = {"generate": 0.0, "generate_cpu": 0.0}
    chunk = max(1024, (64 << 20) // (4 * dim))

    def chunks():
        rng = np.random.default_rng(1)
        for s in range(0, n, chunk):
            t, c = time.perf_counter(), time.process_time()
            x = gen.sample(rng, min(chunk, n - s))
            stored = normalize_rows(x).astype(np.float16).astype(np.float32)  # what the index keeps
            cs, cp = _topk(qn @ stored.T, np.arange(s, s + len(x)), k)  # the exact answer, as we go
            truth["s"], truth["p"] = _topk(np.concatenate([truth["s"], cs], 1), np.concatenate([truth["p"], cp], 1), k)
            spent["generate"] += time.perf_counter() - t
            spent["generate_cpu"] += time.process_time() - c
            yield x, None, None

    work = Path(args.workdir) / f"bench_search_{n}x{dim}.index"
    times: dict = {}
    print(f"\n== ivf-pq {n:,} x {dim}: generating and streaming into {work} (one thread)", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    index = build_streaming(work, chunks(), dim=dim, total=n, quiet=args.quiet, timings=times, nprobe=args.nprobe,
                            target_recall=args.target_recall)
    wall = time.perf_counter() - t0
    # on a shared machine wall time counts other processes' turns: the CPU time of this one-thread build
    # is its cost on one core, and the stages are scaled to it
    build_cpu = time.process_time() - c0 - spent["generate_cpu"]
    cpu_share = min(1.0, build_cpu / max(1e-9, wall - spent["generate"]))
    _, truth_p = _topk(truth["s"], truth["p"], k, sort=True)
    p = dict(index.approx_params)
    sec = p.pop("seconds")
    write_s = times["write"] - spent["generate"]
    ivf = faiss.extract_index_ivf(index._approx)
    per_vec_ram = int(ivf.code_size) + 8  # codes (m 4-bit numbers) + the 64-bit id each inverted list keeps
    print(f"(this process had {cpu_share:.0%} of a core while building: the wall times below are scaled to its "
          "CPU time in the figures that follow)")
    print(f"built in {wall:.0f} s wall: generate {spent['generate']:.0f} s (not the index's), write "
          f"{write_s:.0f} s, train {sec['train']:.0f} s on {p['train_size']:,}, add {sec['add']:.0f} s, calibrate "
          f"{sec['calibrate']:.0f} s, save {times['save']:.0f} s; {p}", flush=True)

    before, after = rss_anon_of_loaded(work, qn[:4])
    ram = after - before
    row = {"n": n, "dim": dim, "kind": "ivf-pq", "nlist": p["nlist"], "nprobe": p["nprobe"], "refine": p["refine"],
           "m": p["m"], "width": p["width"], "opq": p["opq"], "train_size": p["train_size"],
           "generate_s": spent["generate"], "cpu_share": cpu_share, "wall_s": wall,
           "write_s": write_s * cpu_share, "train_s": sec["train"] * cpu_share, "add_s": sec["add"] * cpu_share,
           "rotation_s": sec.get("rotation", 0.0) * cpu_share,
           "calibrate_s": sec["calibrate"] * cpu_share, "save_s": times["save"] * cpu_share, "ram_bytes": ram,
           "ram_per_vector": per_vec_ram, "disk_bytes": n * dim * 2}

    index.search_positions(qn, k)  # warm: codes touched, vectors cached
    warm, cpu = [], []
    for i in range(len(qn)):
        c = time.thread_time()
        warm.append(timed(lambda i=i: index.search_positions(qn[i:i + 1], k), 1)[0])
        cpu.append((time.thread_time() - c) * 1000)
    found = np.concatenate([index.search_positions(qn[i:i + 1], k)[1] for i in range(len(qn))])
    row["recall10"] = recall_at(found, truth_p, k)
    row["query_wall_ms"] = statistics.median(warm)
    row["query_ms"] = statistics.median(cpu)  # CPU time of the one thread: its cost on one core
    row["query_p95_ms"] = float(np.percentile(warm, 95))
    vec_file = work / "vectors.f16"
    cold = []
    for i in range(min(30, len(qn))):
        drop_cached(vec_file)
        cold.append(timed(lambda i=i: index.search_positions(qn[i:i + 1], k), 1)[0])
    row["query_cold_ms"] = statistics.median(cold)
    probe = int(p["nprobe"])  # the coarse step alone (its cost grows with the lists)
    row["coarse_ms"] = search_cpu_ms(ivf.quantizer, qn, probe)
    row["coarse_10m_ms"] = coarse_at_10m(ivf, qn, probe)
    t = time.perf_counter()
    index.search_positions(qn[:1], k, approx=False)
    row["exact_ms"] = (time.perf_counter() - t) * 1000
    print(f"recall@10 {row['recall10']:.3f} (re-ranked {p['refine'] * k} candidates, nprobe {p['nprobe']} of "
          f"{p['nlist']}); one query {row['query_ms']:.2f} ms CPU ({row['query_wall_ms']:.2f} ms wall) median, p95 {row['query_p95_ms']:.2f} ms, "
          f"{row['query_cold_ms']:.2f} ms with the vectors' pages dropped from the cache (coarse step "
          f"{row['coarse_ms']:.2f} ms); exact scan "
          f"{row['exact_ms']:.0f} ms (x{row['exact_ms'] / row['query_ms']:.0f})", flush=True)
    print(f"RAM {ram / 2**20:.0f} MiB measured ({per_vec_ram} B a vector: {ivf.code_size} B codes + 8 B id); "
          f"disk {row['disk_bytes'] / 2**30:.2f} GiB of float16 vectors", flush=True)
    row.update(extrapolate(row))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return row


def coarse_at_10m(ivf, queries: np.ndarray, nprobe: int) -> float:
    """Median ms of one coarse search on one core over the lists a 10M index would have: the quantiser
    the build puts there (:func:`.quantisers.pq_coarse`) over jittered copies of this index's centroids."""
    import faiss

    from alt_i2v.search.kinds import pq_lists
    from alt_i2v.search.quantisers import pq_coarse

    cent = faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist)
    coarse = pq_coarse(jittered(cent, pq_lists(TARGET["n"])), faiss.downcast_index(ivf).pq.M)
    return search_cpu_ms(coarse, queries, nprobe)


def search_cpu_ms(index, queries: np.ndarray, k: int) -> float:
    """Median CPU ms of this thread for one ``index.search`` of one query (its cost on one core)."""
    out = []
    for i in range(len(queries)):
        t = time.thread_time()
        index.search(queries[i:i + 1], k)
        out.append((time.thread_time() - t) * 1000)
    return statistics.median(out)


def bench_coverage(n: int, args: argparse.Namespace) -> dict:
    """How many lists an ivf-pq index of ``n`` x 2048 must visit, without building it: the vectors are
    streamed once, keeping the exact top-10 of fresh queries (with their vectors) and the sample the build
    would train on; OPQ and the coarse k-means learn from that sample as in the build; at nprobe p the
    recall is the share of true neighbours whose list is among the query's p nearest. That is the recall
    a built index reaches when its re-rank finds every candidate of the visited lists (so at 2M: see
    docs/search.md), and the lists visited set the query time."""
    import faiss

    from alt_i2v.search.kernels import _topk, normalize_rows
    from alt_i2v.search.kinds import pq_lists, pq_train_rows
    from alt_i2v.search.quantisers import new_ivf_pq, train_ivf

    faiss.omp_set_num_threads(max(1, os.cpu_count() or 1))
    k, dim = 10, args.dim
    gen = Generator(dim, clusters=max(10, n // 500), seed=0)
    q = normalize_rows(gen.sample(np.random.default_rng(2), args.queries))
    nq = len(q)
    nlist = pq_lists(n)
    m = pq_train_rows(nlist, n)
    sample = np.sort(np.random.default_rng(0).choice(n, m, replace=False))
    train = np.empty((m, dim), np.float32)
    filled = 0
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_v = np.zeros((nq, k, dim), np.float32)
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    print(f"\n== lists to visit at {n:,} x {dim} ({nlist:,} lists, sample {m:,}): streaming", flush=True)
    for s in range(0, n, 50_000):
        x = normalize_rows(gen.sample(rng, min(50_000, n - s))).astype(np.float16).astype(np.float32)
        sel = sample[(sample >= s) & (sample < s + len(x))] - s
        train[filled:filled + len(sel)] = x[sel]
        filled += len(sel)
        cs, cp = _topk(q @ x.T, np.arange(len(x)), k)  # this chunk's best, then merged with the kept ones
        best_s, slot = _topk(np.concatenate([best_s, cs], 1), np.arange(2 * k), k)
        best_v = np.take_along_axis(np.concatenate([best_v, x[cp]], 1), slot[:, :, None], 1)
    stream_s = time.perf_counter() - t0
    opq, ivf = new_ivf_pq(dim, nlist)  # the build's quantisers, trained the build's way
    index = train_ivf(opq, ivf, train.__getitem__, m)  # (kept: the ivf below lives inside it)
    ivf = faiss.extract_index_ivf(index)
    del train
    reduce = (lambda a: opq.apply(a)) if opq is not None else (lambda a: a)
    coarse = faiss.IndexFlatL2(ivf.d)  # every list ranked exactly (what a PQ-coded quantiser finds, --coarse)
    coarse.add(faiss.downcast_index(ivf.quantizer).reconstruct_n(0, nlist))
    _, order = coarse.search(reduce(q), nlist)  # every list, nearest first
    _, home = coarse.search(reduce(best_v.reshape(-1, dim)), 1)
    rank = np.empty((nq, nlist), np.int64)
    rank[np.arange(nq)[:, None], order] = np.arange(nlist)[None, :]
    neighbour_rank = np.take_along_axis(rank, home.reshape(nq, k), 1)
    ladder = [p for p in (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048) if p <= nlist]
    recall = {p: float((neighbour_rank < p).mean()) for p in ladder}
    need = next((p for p in range(1, nlist + 1) if (neighbour_rank < p).mean() >= TARGET["recall10"]), nlist)
    row = {"n": n, "dim": dim, "nlist": nlist, "train_size": m, "recall_at": recall, "lists_for_target": need,
           "rows_scanned": need * n / nlist, "stream_s": stream_s, "total_s": time.perf_counter() - t0}
    print("recall@10 by lists visited: " + ", ".join(f"{p}: {r:.3f}" for p, r in recall.items()))
    print(f"recall@10 {TARGET['recall10']} needs {need:,} of {nlist:,} lists: {row['rows_scanned']:,.0f} codes "
          f"scanned a query ({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def bench_coarse(n: int, args: argparse.Namespace) -> dict:
    """Which coarse quantiser finds a vector's list when the lists are many and full width (no index built):
    ~N/167 lists (3 a generated cluster) from flat k-means on 12 rows a list; then, for fresh vectors and
    queries, how often each quantiser returns the list the exact (flat) search does, and its time for one
    query on one core: flat, an HNSW graph of the centroids (efSearch ladder), and 4-bit fast-scan PQ codes
    of the centroids whose best ``k_factor`` x k are re-ranked exactly (faiss IndexRefineFlat). The same
    quantisers are then timed over the list count 10M would have, for the query-time formula."""
    import faiss

    from alt_i2v.search.kernels import normalize_rows
    from alt_i2v.search.kinds import pq_lists
    from alt_i2v.search.quantisers import pq_coarse

    faiss.omp_set_num_threads(max(1, os.cpu_count() or 1))
    dim, nq = args.dim, args.queries
    gen = Generator(dim, clusters=max(10, n // 500), seed=0)
    nlist = pq_lists(n)
    train = normalize_rows(gen.sample(np.random.default_rng(1), 12 * nlist))
    cp = faiss.ClusteringParameters()
    cp.niter, cp.min_points_per_centroid, cp.max_points_per_centroid = 12, 12, 128
    clus, flat = faiss.Clustering(dim, nlist, cp), faiss.IndexFlatL2(dim)
    t0 = time.perf_counter()
    print(f"\n== coarse quantisers over {nlist:,} lists of {n:,} x {dim}: flat k-means on {len(train):,} rows", flush=True)
    clus.train(train, flat)
    del train
    kmeans_s = time.perf_counter() - t0
    cent = faiss.vector_to_array(clus.centroids).reshape(-1, dim)
    vecs = normalize_rows(gen.sample(np.random.default_rng(5), 2000))
    q = normalize_rows(gen.sample(np.random.default_rng(2), nq))
    _, home = flat.search(vecs, 1)
    _, q_lists = flat.search(q, 3)
    faiss.omp_set_num_threads(1)

    def one_at_a_time(index, x, k):
        t = time.perf_counter()
        got = np.stack([index.search(x[i:i + 1], k)[1][0] for i in range(len(x))])
        return got, (time.perf_counter() - t) / len(x) * 1000

    def measure(name, index):
        got, _ = one_at_a_time(index, vecs, 1)
        gq, ms = one_at_a_time(index, q, 3)
        row = {"quantiser": name, "nearest_list": float((got[:, 0] == home[:, 0]).mean()),
               "query_top3": float(np.mean([len(set(a) & set(b)) / 3 for a, b in zip(gq, q_lists)])), "query_ms": ms}
        print(f"  {name:34s} nearest list for {row['nearest_list']:.3f} of the vectors, the queries' 3 nearest "
              f"lists {row['query_top3']:.3f}; {ms:.2f} ms a query (one core)", flush=True)
        return row

    def hnsw(ef, c):
        h = faiss.IndexHNSWFlat(dim, 32)
        h.add(c)
        h.hnsw.efSearch = ef
        return h

    rows = [measure("flat", flat)]
    rows += [measure(f"HNSW32, efSearch {ef}", hnsw(ef, cent)) for ef in (16, 64, 256)]
    rows += [measure(f"PQ 256x4-bit fast scan + refine x{kf}", pq_coarse(cent, 256, kf)) for kf in (4, 16)]
    big = pq_lists(TARGET["n"])  # the lists 10M would have: timed over jittered copies of these centroids
    many = jittered(cent, big)
    at_big = {}
    for name, index in (("flat", None), ("PQ 256x4-bit fast scan + refine x16", pq_coarse(many, 256))):
        if index is None:
            index = faiss.IndexFlatL2(dim)
            index.add(many)
        _, at_big[name] = one_at_a_time(index, q[:50], 3)
        print(f"  over {big:,} lists (10M's): {name:34s} {at_big[name]:.2f} ms a query (one core)", flush=True)
    return {"n": n, "dim": dim, "nlist": nlist, "kmeans_s": kmeans_s, "rows": rows, "lists_10m": big,
            "query_ms_10m": at_big}


def jittered(centroids: np.ndarray, count: int) -> np.ndarray:
    """``count`` centroids made of copies of ``centroids`` moved a little: a coarse quantiser of another
    size to time (10M's list count) without training one."""
    rng = np.random.default_rng(7)
    reps = -(-count // len(centroids))
    return np.concatenate([centroids + rng.standard_normal(centroids.shape, dtype=np.float32) * 0.01
                           for _ in range(reps)])[:count]


def record_coverage(row: dict) -> None:
    """The lists-to-visit row as ``search_lists_<n>_<dim>`` in scripts/results.json."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_all

    results = bench_all.load_results()
    name = f"search_lists_{row['n'] // 1_000_000}m_{row['dim']}"
    measured = (f"recall@10 {TARGET['recall10']} needs {row['lists_for_target']:,} of {row['nlist']:,} lists "
                f"({row['rows_scanned']:,.0f} codes a query); at 128 / 256 / 512 / 1024 lists: "
                + " / ".join(f"{row['recall_at'].get(p, float('nan')):.3f}" for p in (128, 256, 512, 1024)))
    pq2m = next((e for e in results["results"] if e["name"] == "search_pq_2m_2048"), None)
    if pq2m is not None and row["dim"] == TARGET["dim"]:
        measured += f" (the 2M x 2048 row: {pq2m['measured'].split(';')[0].split(': ', 1)[1]})"
    bench_all.record(results, name, measured, None, "10M x 2048: <= 10 ms/query at recall@10 >= 0.95",
                     bench_all.this_device())
    entry = next(e for e in results["results"] if e["name"] == name)
    entry["compares"] = (f"lists an ivf-pq index of {row['n']:,} x {row['dim']} clustered synthetic vectors must "
                         "visit for recall@10 (the coarse quantiser trained as the build does; no index built)")
    bench_all.save_results(results)


def extrapolate(row: dict) -> dict:
    """The 10M x 2048 figures by formula from a measured row (meaningful for a 2048-wide row).

    RAM: fixed part (measured minus the per-vector and per-list parts) + 10M x bytes a vector + the lists 10M
    would have (:func:`pq_lists`) x bytes a list (its float32 centroid and the centroid's PQ code). Query:
    lists grow with N (~167 rows each), so at the same nprobe the rows scanned and the re-rank stay the same
    and only the coarse search over the centroids grows: measured query - its coarse part + the coarse
    search measured over 10M's lists (:func:`coarse_at_10m`); that assumes 10M needs the nprobe this size
    needs (``--coverage 10000000`` checks). Build on 16 cores: write (disk, not divided) + the OPQ rotation
    (fixed) + (add + calibrate) x 10M / N / 16 + the rest of training x (k-means work ratio) / 16, k-means
    work = sample x nlist (:func:`pq_train_rows`: what the build would choose)."""
    from alt_i2v.search.kinds import pq_lists, pq_train_rows

    n, big = row["n"], TARGET["n"]
    per_list = row["width"] * 4 + row["ram_per_vector"] - 8
    fixed = max(0, row["ram_bytes"] - n * row["ram_per_vector"] - row["nlist"] * per_list)
    nlist_big = pq_lists(big)
    ram = fixed + big * row["ram_per_vector"] + nlist_big * per_list
    work = pq_train_rows(nlist_big, big) * nlist_big / (row["train_size"] * row["nlist"])
    rotation = row.get("rotation_s", 0.0)  # OPQ learns from 32,768 rows whatever N: a fixed cost
    build = (row["write_s"] * big / n + rotation + ((row["add_s"] + row["calibrate_s"]) * big / n
                                                    + (row["train_s"] - rotation) * work) / TARGET["cores"])
    query = row["query_ms"] - row["coarse_ms"] + row["coarse_10m_ms"]
    return {"x10m_ram_gib": ram / 2**30, "x10m_query_ms": query, "x10m_build_h": build / 3600,
            "ram_fixed_bytes": fixed, "x10m_lists": nlist_big, "list_bytes": per_list}


def report_large(row: dict) -> None:
    t = TARGET
    ok = {"ram": row["x10m_ram_gib"] <= t["ram_gib"], "recall": row["recall10"] >= t["recall10"],
          "query": row["x10m_query_ms"] <= t["query_ms"], "build": row["x10m_build_h"] <= t["build_h"]}
    print(f"\n10M x {row['dim']} by formula from {row['n']:,} x {row['dim']} (targets for 10M x 2048):")
    print(f"  RAM    {row['ram_fixed_bytes'] / 2**20:.0f} MiB + 10M x {row['ram_per_vector']} B + {row['x10m_lists']:,} "
          f"lists x {row['list_bytes']:,} B = {row['x10m_ram_gib']:.2f} GiB   target <= {t['ram_gib']} GiB   "
          f"{'met' if ok['ram'] else 'NOT met'}")
    print(f"  recall@10 {row['recall10']:.3f} (measured)   target >= {t['recall10']}   {'met' if ok['recall'] else 'NOT met'}")
    print(f"  query  {row['query_ms']:.2f} ms - coarse {row['coarse_ms']:.2f} ms + coarse over {row['x10m_lists']:,} "
          f"lists {row['coarse_10m_ms']:.2f} ms = {row['x10m_query_ms']:.2f} ms on one core   target <= {t['query_ms']} ms   "
          f"{'met' if ok['query'] else 'NOT met'}")
    print("         (assumes 10M needs the nprobe this size needs: --coverage 10000000)")
    print(f"  build  {row['x10m_build_h'] * 60:.1f} min on {t['cores']} cores   target <= {t['build_h'] * 60:.0f} min   "
          f"{'met' if ok['build'] else 'NOT met'}")


def record_large(row: dict) -> None:
    """This run's figures as the ``search_<n>x<dim>`` entry of scripts/results.json."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_all

    results = bench_all.load_results()
    n = row["n"]
    size = f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"
    name = f"search_pq_{size}_{row['dim']}"
    measured = (f"{row['n'] / 1e6:g}M x {row['dim']} measured: recall@10 {row['recall10']:.3f}, {row['query_ms']:.2f} ms "
                f"a query warm / {row['query_cold_ms']:.2f} ms cold (one core), RAM {row['ram_bytes'] / 2**20:.0f} MiB "
                f"({row['ram_per_vector']} B a vector), build {row['train_s']:.0f} s train + "
                f"{(row['write_s'] + row['add_s']) / row['n'] * 1e6:.0f} us a vector (one core)")
    target = "10M x 2048: RAM <= 4 GB, recall@10 >= 0.95, <= 10 ms/query, build <= 1 h (16 cores)"
    if row["dim"] == TARGET["dim"]:
        measured += (f"; 10M x 2048 by formula: RAM {row['x10m_ram_gib']:.2f} GiB, {row['x10m_query_ms']:.1f} ms a query, "
                     f"build {row['x10m_build_h'] * 60:.0f} min on 16 cores")
    bench_all.record(results, name, measured, f"{row['exact_ms'] / row['query_ms']:.0f}x", target,
                     bench_all.this_device())
    entry = next(e for e in results["results"] if e["name"] == name)
    entry["compares"] = (f"ivf-pq (OPQ+PQ codes in RAM, float16 vectors on disk for the re-rank) vs the exact "
                         f"float16 scan, one query on one core; {row['n']:,} x {row['dim']} clustered synthetic "
                         f"vectors streamed in chunks")
    bench_all.save_results(results)
    print(f"recorded {name} in {bench_all.RESULTS_FILE}; python scripts/bench_all.py --readme updates README")



def bench_dedupe(originals: int, args: argparse.Namespace) -> dict:
    """--dedupe on a generated dataset: ``originals`` distinct pictures, a third with their 5 near-copies,
    and some parent/child pairs; precision and recall of the grouping's pairs against the truth."""
    import tempfile

    from alt_i2v.demo.copies import pair_scores, write_copies_dataset
    from alt_i2v.search.dedupe import find_groups

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        data = Path(tmp) / "data"
        t = time.perf_counter()
        truth = write_copies_dataset(data, originals, originals // 3, parent_pairs=max(1, originals // 50), seed=3,
                                     size=256)
        made = time.perf_counter() - t
        t = time.perf_counter()
        report = find_groups(data, quiet=args.quiet)
        took = time.perf_counter() - t
    precision, recall = pair_scores(report["groups"], truth)
    row = {"posts": report["posts"], "true_groups": len(truth), "groups": len(report["groups"]),
           "precision": precision, "recall": recall, "seconds": took, "ms_per_picture": took / report["posts"] * 1000}
    print(f"\n== --dedupe on {report['posts']:,} generated pictures ({len(truth)} true groups: {originals // 3} "
          f"pictures with 5 copies each, {max(1, originals // 50)} parent/child pairs; made in {made:.0f} s)")
    print(f"groups found {row['groups']}, pair precision {precision:.3f}, recall {recall:.3f}; "
          f"{took:.1f} s ({row['ms_per_picture']:.1f} ms a picture)")
    return row


def record_dedupe(row: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_all

    results = bench_all.load_results()
    bench_all.record(results, "search_dedupe",
                     f"precision {row['precision']:.3f}, recall {row['recall']:.3f} over {row['posts']:,} pictures; "
                     f"{row['ms_per_picture']:.1f} ms a picture", None, "precision and recall >= 0.95",
                     bench_all.this_device())
    entry = next(e for e in results["results"] if e["name"] == "search_dedupe")
    entry["compares"] = ("`--dedupe` (DCT signature, no model) on generated pictures and their resized, JPEG q25, "
                         "5%-cropped, mirrored and recoloured copies vs distinct pictures: pairs found vs true pairs")
    bench_all.save_results(results)
    print(f"recorded search_dedupe in {bench_all.RESULTS_FILE}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated index sizes")
    p.add_argument("--queries", type=int, default=100, help="queries for recall and batched latency")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16"])
    p.add_argument("--nprobe", type=int, default=None, help="approximate: lists visited per query")
    p.add_argument("--no-approx", action="store_true")
    p.add_argument("--large", default="", help="comma-separated sizes of ivf-pq runs (streamed, on disk)")
    p.add_argument("--dim", type=int, default=DIM, help="--large: vector width")
    p.add_argument("--target-recall", type=float, default=0.96,
                   help="--large: recall@10 the build calibrates nprobe for, on stored vectors as queries")
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"), help="--large: where the index goes")
    p.add_argument("--keep", action="store_true", help="--large: keep the index on disk")
    p.add_argument("--record", action="store_true",
                   help="--large/--dedupe: write the figures to scripts/results.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--coverage", type=int, default=0, metavar="N",
                   help="lists an ivf-pq index of N vectors must visit for the target recall (no index built)")
    p.add_argument("--coarse", type=int, default=0, metavar="N",
                   help="how well and how fast each coarse quantiser finds the list of N/167 full-width lists")
    p.add_argument("--dedupe", type=int, default=0, metavar="N",
                   help="--dedupe precision/recall on N generated pictures (+ their copies)")
    args = p.parse_args()
    if args.dedupe:
        row = bench_dedupe(args.dedupe, args)
        print(f"RESULT search_dedupe precision={row['precision']:.3f} recall={row['recall']:.3f} "
              f"posts={row['posts']} ms_per_picture={row['ms_per_picture']:.1f} ratio={min(row['precision'], row['recall']):.3f} "
              f"target=precision,recall>=0.95", flush=True)
        if args.record:
            record_dedupe(row)
        return 0
    if args.coarse:
        row = bench_coarse(args.coarse, args)
        pq = next(r for r in row["rows"] if r["quantiser"].endswith("x16"))
        print(f"RESULT search_coarse n={row['n']} nlist={row['nlist']} pq_refine_nearest={pq['nearest_list']:.3f} "
              f"pq_refine_ms={pq['query_ms']:.2f} lists_10m={row['lists_10m']} "
              + " ".join(f"ms_10m_{k.split()[0].lower()}={v:.2f}" for k, v in row["query_ms_10m"].items()), flush=True)
        return 0
    if args.coverage:
        row = bench_coverage(args.coverage, args)
        print(f"RESULT search_lists n={row['n']} dim={row['dim']} nlist={row['nlist']} "
              f"lists_for_recall95={row['lists_for_target']} codes_scanned={row['rows_scanned']:.0f}", flush=True)
        if args.record:
            record_coverage(row)
        return 0
    if args.large:
        for n in [int(float(v)) for v in args.large.split(",") if v.strip()]:
            row = bench_large(n, args.dim, args)
            report_large(row)
            out = Path(args.workdir) / f"bench_search_{n}x{args.dim}.json"
            out.write_text(json.dumps(row, indent=1))
            print(f"RESULT search_large n={n} dim={args.dim} recall10={row['recall10']:.3f} "
                  f"query_ms={row['query_ms']:.2f} ram_mib={row['ram_bytes'] / 2**20:.0f} "
                  f"x10m_ram_gib={row['x10m_ram_gib']:.2f} x10m_query_ms={row['x10m_query_ms']:.1f} "
                  f"x10m_build_min={row['x10m_build_h'] * 60:.0f} ratio={row['exact_ms'] / row['query_ms']:.0f} "
                  f"target=ram<=4GiB,recall10>=0.95,query<=10ms,build<=60min", flush=True)
            if args.record:
                record_large(row)
        return 0
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
