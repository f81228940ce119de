"""Web server speed: ``POST /api/tags`` with 8 concurrent HTTP clients against a real uvicorn server on
127.0.0.1, next to calling ``predict_tags`` in-process one image at a time (what a script does), on the
demo's model and the demo's own pictures, side by side in one run.

The clients run in their own process (as real ones would), so they do not compete with the server for
Python's GIL. Requests/s and p50/p95 latency for both; the ratio is the server's requests/s over in-process calls/s:
above 1, batching the concurrent uploads into one forward pass (the engine thread) pays for HTTP,
multipart and JSON. The engine's mean batch size is reported too. Both sides are measured in turn,
three rounds, and the median round is reported (the figures swing with other load on a shared machine).

    python scripts/bench_serve.py [--demo DIR] [--requests 400] [--clients 8] [--rounds 3]

Runs ``--demo --quick`` into a temporary directory unless ``--demo DIR`` holds one already.
Last line: ``RESULT serve rps=<x> p50_ms=<x> p95_ms=<x> inproc_rps=<x> ratio=<x> target=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def in_process(images: list[bytes], model: Path) -> tuple[float, list[float]]:
    """``predict_tags(image, threshold=0.0)`` one upload after another: calls/s and each call's time."""
    from alt_i2v.tagging.tagger import predict_tags

    for data in images[:8]:  # compile the batch-1 predict function first, as the server warm-up does
        predict_tags(data, model=model, threshold=0.0)
    times = []
    t0 = time.perf_counter()
    for data in images:
        t = time.perf_counter()
        predict_tags(data, model=model, threshold=0.0)
        times.append(time.perf_counter() - t)
    return len(images) / (time.perf_counter() - t0), times


def _client_load(images: list[bytes], url: str, clients: int, out: Any) -> None:
    """In a separate process (so the clients do not share the server's GIL): ``clients`` threads, each
    with its own keep-alive connection, send every image once after a warm-up."""
    import requests

    local = threading.local()

    def send(data: bytes) -> float:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        t = time.perf_counter()
        r = session.post(url + "api/tags", files={"file": ("x.png", data)}, timeout=120)
        r.raise_for_status()
        r.json()
        return time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=clients) as ex:
        list(ex.map(send, images[: clients * 4]))  # warm-up: connections and every padded batch shape
        t0 = time.perf_counter()
        times = list(ex.map(send, images))
        elapsed = time.perf_counter() - t0
    out.put((len(images) / elapsed, times))


def over_http(images: list[bytes], url: str, clients: int) -> tuple[float, list[float]]:
    """Requests/s and each request's time, from a client process."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client_load, args=(images, url, clients, out))
    proc.start()
    result = out.get(timeout=600)
    proc.join(60)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", help="a --demo directory to reuse (default: run --demo --quick in a temp dir)")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="measurements of both sides; the median round is reported")
    args = ap.parse_args()

    import requests

    from alt_i2v.data.posts import iter_posts, post_image_path
    from alt_i2v.demo import run_demo
    from alt_i2v.serve import create_app
    from alt_i2v.serve.server import running

    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(args.demo or tmp)
        run = demo / "quick"
        if not (run / "model" / "thresholds.json").exists():
            print(f"running the quick demo into {demo} ...", flush=True)
            run_demo(demo, quick=True, quiet=True)
        posts = list(iter_posts(run / "data"))
        files = [post_image_path(p, run / "data") for p in posts]
        images = [files[i % len(files)].read_bytes() for i in range(args.requests)]
        model = run / "model"

        app = create_app(model)
        rounds = []
        with running(app) as url:
            for _ in range(args.rounds):  # alternated, so a busy moment of the machine hits both sides
                inproc_rps, inproc_times = in_process(images, model)
                rps, times = over_http(images, url, args.clients)
                rounds.append((rps / inproc_rps, rps, times, inproc_rps, inproc_times))
            engine = requests.get(url + "api/health", timeout=10).json()["engine"]
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: server {r[1]:.1f} req/s, in-process {r[3]:.1f} calls/s, ratio {r[0]:.2f}")
    ratio, rps, times, inproc_rps, inproc_times = sorted(rounds, key=lambda r: r[0])[len(rounds) // 2]
    p50, p95 = percentiles(times)
    ip50, ip95 = percentiles(inproc_times)
    print(f"median round: {len(images)} demo pictures ({np.mean([len(x) for x in images]) / 1024:.1f} KiB on average), "
          f"model {model}")
    print(f"{'':34s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s}")
    print(f"{'predict_tags in-process, serial':34s} {inproc_rps:8.1f} {ip50:8.2f} {ip95:8.2f}")
    print(f"{f'POST /api/tags, {args.clients} clients':34s} {rps:8.1f} {p50:8.2f} {p95:8.2f}")
    print(f"engine: {engine['batches']} forward passes for {engine['images']} images "
          f"(mean batch {engine['mean_batch']}, largest {engine['largest_batch']})")
    print(f"RESULT serve rps={rps:.1f} p50_ms={p50:.2f} p95_ms={p95:.2f} inproc_rps={inproc_rps:.1f} "
          f"mean_batch={engine['mean_batch']} ratio={ratio:.2f} target=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
