"""Benchmark --build against the naive way, and a sharded build against a one-shard build, side by side.

Naive: single process, PIL open + full decode + resize, one LevelDB put per record.
alt-i2v: JPEG draft decoding, a process pool (--workers, default all cores), WriteBatch.
Sharded: ``--shards N`` (default: one per core), each shard decoded and written by its own process.
Prints images/s for each and their ratios: ``RESULT build ... target=4`` (against naive, 2 cores) and
``RESULT build_sharded ... target=1`` (a sharded build is no slower than a one-shard build).

``--processes 1,4,16`` also builds with 1, 4 and 16 shard processes (one shard each) and reports the
scaling (``RESULT build_scaling ... target=10``: on 16 cores, at least 10x the one-process rate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alt_i2v.store import build_store, encode_record  # noqa: E402
from alt_i2v.data.vocab import build_vocab  # noqa: E402


def make_jpegs(data: Path, n: int, seed: int = 0) -> None:
    """``n`` 1200x1600 illustration-sized JPEGs with smooth content (realistic file sizes)."""
    import hashlib

    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        small = rng.integers(0, 255, (16, 12, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((1200, 1600), Image.Resampling.BICUBIC)
        path = data / "tmp.jpg"
        img.save(path, "JPEG", quality=90)
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        final = data / "images" / md5[:2] / f"{md5}.jpg"
        final.parent.mkdir(parents=True, exist_ok=True)
        path.replace(final)
        lines.append(json.dumps({"id": i, "md5": md5, "file_ext": "jpg", "tags": {"general": [f"tag{i % 10}"]}}))
    (data / "posts.jsonl").write_text("\n".join(lines) + "\n")


def naive_build(data: Path, size: int) -> int:
    """The straightforward way: decode every file fully, resize, one put per record, one process."""
    import plyvel

    from alt_i2v.data.posts import read_posts

    db = plyvel.DB(str(data / "naive_store"), create_if_missing=True)
    n = 0
    for post in read_posts(data).posts:
        img = Image.open(data / post["file"]).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        db.put(str(post["id"]).encode(), encode_record(post["id"], np.asarray(img), [0], "train"))
        n += 1
    db.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="number of 1200x1600 JPEGs (default 300)")
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--workers", type=int, default=0, help="build workers (default: all cores)")
    ap.add_argument("--shards", type=int, default=0, help="shards of the sharded build (default: cores)")
    ap.add_argument("--processes", default="", help="comma-separated process counts to report, e.g. 1,4,16")
    args = ap.parse_args()
    from alt_i2v.config import resolve_workers

    cores = resolve_workers(args.workers)
    shards = args.shards or max(2, cores)
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        t = time.perf_counter()
        make_jpegs(tmp, args.n)
        print(f"generated {args.n} JPEGs 1200x1600 in {time.perf_counter() - t:.1f}s; {cores} cores")
        build_vocab(tmp)
        t = time.perf_counter()
        n = naive_build(tmp, args.size)
        naive = n / (time.perf_counter() - t)
        one, sharded = [], []
        for _ in range(2):  # alternate, so both see the same machine load
            t = time.perf_counter()
            result = build_store(tmp, image_size=args.size, workers=args.workers, quiet=True, rebuild=True)
            one.append(result.stored / (time.perf_counter() - t))
            t = time.perf_counter()
            result = build_store(tmp, image_size=args.size, workers=args.workers, quiet=True, rebuild=True,
                                 shards=shards)
            sharded.append(result.stored / (time.perf_counter() - t))
        fast, shard_rate = max(one), max(sharded)
        ratio = fast / naive
        print(f"naive (PIL full decode, put per record, 1 process): {naive:8.1f} img/s")
        print(f"alt-i2v --build, one shard (decoding pool + writer): {fast:8.1f} img/s")
        print(f"alt-i2v --build --shards {shards} (a process per shard): {shard_rate:8.1f} img/s "
              f"({shard_rate / fast:.2f}x the one-shard build)")
        print(f"ratio: {ratio:.2f}x (target >= 4x on 2 cores)")
        print(f"RESULT build build_img_s={fast:.1f} naive_img_s={naive:.1f} ratio={ratio:.2f} target=4")
        print(f"RESULT build_sharded shards={shards} sharded_img_s={shard_rate:.1f} one_shard_img_s={fast:.1f} "
              f"ratio={shard_rate / fast:.2f} target=1")
        counts = [int(c) for c in args.processes.split(",") if c.strip()]
        if counts:
            rates = {}
            for c in counts:
                t = time.perf_counter()
                result = build_store(tmp, image_size=args.size, workers=c, quiet=True, rebuild=True,
                                     shards=c if c > 1 else None)
                rates[c] = result.stored / (time.perf_counter() - t)
                print(f"  {c:3d} processes: {rates[c]:8.1f} img/s ({rates[c] / rates[counts[0]]:.1f}x)")
            top = max(counts)
            print(f"RESULT build_scaling processes={top} img_s={rates[top]:.1f} one={rates[counts[0]]:.1f} "
                  f"ratio={rates[top] / rates[counts[0]]:.1f} target=10")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
