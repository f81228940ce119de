"""Benchmark the scraper's politeness budget: how much of the configured request rate it actually uses.

A fake Danbooru (tests/fake_danbooru.py) answers every request after 50 ms. The scraper runs with a rate
limit of R requests/s; the server logs when each request arrives, so the achieved rate is measured where
it matters. Side by side, the naive polite loop (one request, then sleep 1/R) shows what latency costs
when it is not overlapped. A second run injects faults (503s, a truncated body, a dropped connection, a
malformed JSON page) to show that the only requests beyond the minimum are the retries they force.

    python scripts/bench_scrape.py [--posts 150] [--rate 20] [--latency 0.05] [--workers 4]

Last line: ``RESULT scrape rate_ratio=<x> ratio=<x> target=0.9``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fake_danbooru import FakeDanbooru, make_posts  # noqa: E402

from alt_i2v.scraper import USER_AGENT, scrape  # noqa: E402


def achieved_rate(srv: FakeDanbooru) -> float:
    """Requests per second between the first and the last arrival at the server."""
    ts = sorted(r.t for r in srv.requests())
    return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 else 0.0


def run_scraper(srv: FakeDanbooru, data: Path, args, page_size: int) -> tuple[float, int, int]:
    srv.reset_log()
    res = scrape(data, "bench", base_url=srv.base_url, rate=args.rate, workers=args.workers, quiet=True,
                 page_size=page_size)
    pages = -(-args.posts // page_size) + (1 if args.posts % page_size == 0 else 0)
    minimum = pages + args.posts
    assert res.stored == args.posts, res.summary()
    return achieved_rate(srv), srv.count(), minimum


def run_naive(srv: FakeDanbooru, n: int, rate: float) -> float:
    """The obvious polite loop: request, then sleep 1/rate (latency is not overlapped)."""
    srv.reset_log()
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    paths = [srv.file_path(p) for p in srv.posts[:n]]
    for path in paths:
        s.get(srv.base_url + path, timeout=10).raise_for_status()
        time.sleep(1.0 / rate)
    s.close()
    return achieved_rate(srv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=int, default=150)
    ap.add_argument("--rate", type=float, default=20.0, help="configured limit, requests/s")
    ap.add_argument("--latency", type=float, default=0.05, help="server latency per request, seconds")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--naive-requests", type=int, default=50)
    args = ap.parse_args()

    posts = make_posts(args.posts, extra_tags=["bench"], size=(32, 32))
    with FakeDanbooru(posts, latency=args.latency) as srv, tempfile.TemporaryDirectory() as tmp:
        print(f"fake Danbooru: {args.posts} posts, {args.latency * 1000:.0f} ms latency; limit {args.rate:g} "
              f"requests/s, {args.workers} workers", flush=True)
        naive = run_naive(srv, min(args.naive_requests, args.posts), args.rate)
        print(f"naive loop (request, sleep 1/rate)   : {naive:6.2f} req/s = {naive / args.rate:.2f} of the limit",
              flush=True)

        rate, total, minimum = run_scraper(srv, Path(tmp) / "clean", args, page_size=200)
        ratio = rate / args.rate
        print(f"alt-i2v scraper                      : {rate:6.2f} req/s = {ratio:.2f} of the limit; "
              f"{total} requests, {total - minimum} beyond the minimum ({minimum})", flush=True)

        faults = [srv.add_fault("503", srv.file_path(posts[10]), times=2),
                  srv.add_fault("truncate", srv.file_path(posts[20])),
                  srv.add_fault("reset", srv.file_path(posts[30])),
                  srv.add_fault("malformed", "/posts.json", page=f"b{srv.posts[49].id}")]
        f_rate, f_total, f_min = run_scraper(srv, Path(tmp) / "faults", args, page_size=50)
        injected = sum(f.hits for f in faults)
        print(f"alt-i2v scraper, {injected} injected faults   : {f_rate:6.2f} req/s = {f_rate / args.rate:.2f} of the "
              f"limit; {f_total} requests, {f_total - f_min} beyond the minimum ({f_min}) = the retries",
              flush=True)
        print(f"speed-up over the naive loop at the same limit: {rate / naive:.2f}x")
    print(f"RESULT scrape rate_ratio={ratio:.3f} ratio={ratio:.3f} target=0.9")
    return 0


if __name__ == "__main__":
    sys.exit(main())
