"""The scrape loop: pages a query, decides per post (skip with a reason, already present, adopt, download),
stores files through the client and appends ``posts.jsonl`` lines, resumably and never corrupt.

Every image is streamed into a temp file next to its final place, checked against its md5, fsync'ed and
renamed into ``images/<md5[:2]>/<md5>.<ext>``; only then is the post's line appended. A SIGKILL at any
moment leaves a consistent dataset, and running the same command again resumes.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urljoin, urlsplit

from ..data.posts import PostsWriter, id_key, iter_posts
from ..errors import AltI2VError, ImageLoadError, UnsafePathError, UsageError
from ..fsutil import commit, discard, file_digest, fsync_dir, image_relpath, is_md5, normalize_ext, remove_stale_temps
from ..data.layout import DataDir
from .danbooru import PAGE_SIZE, ListItem, PostInfo, pages, parse_post_page, post_record
from .http import DEFAULT_BASE_URL, DanbooruClient, FetchError, check_url, normalize_base_url
from .result import ScrapeResult

SOURCES = ("api", "html")
FILE_SIZES = ("original", "sample")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_REPORTED_SKIPS = 10000


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Outcome:
    kind: str  # stored | repaired | present | skipped | interrupted
    pid: Any = None
    post: dict | None = None
    reason: str = ""
    detail: str = ""
    query: str = ""


@dataclass
class _Job:
    info: PostInfo
    url: str
    md5: str | None  # expected md5; None for a sample (no md5 is published for those)
    ext: str
    query: str
    repair: dict | None = None


def _valid_file(path: Path, md5: str | None) -> bool:
    try:
        if not path.is_file():
            return False
        return md5 is None or file_digest(path, "md5") == md5
    except OSError:
        return False


class _Scrape:
    """One run over the queries: the main thread pages and appends lines; workers fetch and store files."""

    def __init__(self, data_dir: Path, client: DanbooruClient, result: ScrapeResult, *, source: str,
                 file_size: str, max_bytes: int | None, limit: int | None, workers: int, page_size: int,
                 quiet: bool):
        from ..progress import bar

        self.data_dir = data_dir
        self.images = DataDir(data_dir).images
        self.client = client
        self.base_url = client.base_url
        self.result = result
        self.source = source
        self.file_size = file_size
        self.max_bytes = max_bytes
        self.limit = limit
        self.page_size = page_size
        self.quiet = quiet
        self.max_inflight = max(2, workers * 2)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alt-i2v-scrape")
        self.pending: dict[Future, bool] = {}  # future -> counts toward --limit
        self.new_inflight = 0
        self.seen: set[str] = set()
        self.existing: dict[str, dict] = {}
        self.existing_md5: dict[str, dict] = {}
        for post in iter_posts(data_dir):
            self.existing[id_key(post["id"])] = post
            if isinstance(post.get("md5"), str):
                self.existing_md5[post["md5"]] = post
        self.writer = PostsWriter(data_dir)
        if self.writer.removed_tail:
            result.notes.append(f"posts.jsonl: removed an unfinished last line an interrupted run left "
                                f"({len(self.writer.removed_tail)} bytes: {self.writer.removed_tail[:80]!r})")
        self._dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self.bar = bar(total=limit, desc="scrape", unit="post", quiet=quiet)

    # -- bookkeeping in the main thread --------------------------------------------------------------------

    def limit_done(self) -> bool:
        return self.limit is not None and self.result.stored >= self.limit

    def apply(self, out: _Outcome) -> None:
        r = self.result
        if out.kind == "stored":
            assert out.post is not None
            self.writer.append(out.post)
            self.existing[id_key(out.post["id"])] = out.post
            self.existing_md5[out.post["md5"]] = out.post
            r.stored += 1
            r.adopted += out.detail == "adopted"
            r.new_ids.append(out.post["id"])
            self.bar.update(1)
        elif out.kind == "repaired":
            r.repaired += 1
        elif out.kind == "present":
            r.present += 1
        elif out.kind == "skipped":
            r.skipped.append({"id": out.pid, "reason": out.reason, "detail": self.client.scrub(out.detail)[:300],
                              "query": out.query})
            self.bar.set_postfix(skipped=len(r.skipped), refresh=False)

    def _finish(self, fut: Future) -> None:
        counts = self.pending.pop(fut)
        if counts:
            self.new_inflight -= 1
        if fut.cancelled():
            return
        try:
            out = fut.result()
        except OSError as e:  # disk full, permissions: nothing later can succeed either
            self.client.stop.set()
            raise AltI2VError(f"cannot write into {self.images}: {e}") from None
        self.apply(out)

    def wait_room(self, new: bool) -> None:
        """Block until another task may start (bounded in flight, and never past --limit)."""
        while self.pending and (len(self.pending) >= self.max_inflight or
                                (new and self.limit is not None and
                                 self.result.stored + self.new_inflight >= self.limit)):
            self._wait_some()

    def drain(self) -> None:
        while self.pending:
            self._wait_some()

    def _wait_some(self) -> None:
        """Wait a little for running tasks; an interrupt (``stop`` set by the SIGINT handler) ends the run
        here, at a known point, instead of as an exception in the middle of the executor's locking."""
        done, _ = wait(list(self.pending), timeout=0.25, return_when=FIRST_COMPLETED)
        for fut in done:
            self._finish(fut)
        if self.client.stop.is_set():
            raise KeyboardInterrupt

    def abort(self) -> None:
        """After an interrupt: drop tasks not started, keep what finished."""
        for fut in list(self.pending):
            fut.cancel()
        for fut in list(self.pending):
            try:
                wait([fut])
                self._finish(fut)
            except Exception:  # noqa: BLE001 - already failing; keep what finished cleanly
                pass

    def submit(self, fn: Callable[..., _Outcome], *args: Any, new: bool) -> None:
        fut = self.pool.submit(fn, *args)
        self.pending[fut] = new
        if new:
            self.new_inflight += 1

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.writer.close()
        self.bar.close()

    # -- the queries ---------------------------------------------------------------------------------------

    def run(self, queries: list[str]) -> None:
        for query in queries:
            if self.limit_done():
                break
            self.run_query(query)
        self.drain()
        self.result.limit_reached = self.limit_done()

    def run_query(self, query: str) -> None:
        label = "1"
        listed = pages(self.client, query, self.source, self.page_size, self.result.notes)
        try:
            for label, items in listed:
                for item in items:
                    key = id_key(item.id)
                    if key in self.seen:
                        self.result.repeated += 1
                        continue
                    known = key in self.existing
                    if not known:
                        self.wait_room(new=True)
                        if self.limit_done():
                            return
                    self.seen.add(key)
                    if self.source == "api":
                        self.handle_info(item, query)
                    else:
                        self.handle_listed(item, query)
                # the next page is fetched while workers are busy with this one's files
        except FetchError as e:
            if e.reason == "interrupted":
                raise KeyboardInterrupt from None
            detail = self.client.scrub(e.detail)
            self.result.failed_pages.append({"query": query, "page": label, "reason": e.reason, "detail": detail})
            if not self.quiet:
                print(f"alt-i2v: query {query!r}: page {label} failed ({e.reason}: {detail}); "
                      "going on with the next query", file=sys.stderr)
        finally:
            listed.close()

    def handle_info(self, info: PostInfo, query: str) -> None:
        res = self.decide(info, query)
        if isinstance(res, _Job):
            self.wait_room(new=res.repair is None)
            self.submit(self.store_file, res, new=res.repair is None)
        else:
            self.apply(res)

    def handle_listed(self, item: ListItem, query: str) -> None:
        old = self.existing.get(id_key(item.id))
        if old is not None and self.post_file_ok(old):
            self.apply(_Outcome("present", item.id))
            return
        if item.deleted and old is None:
            self.apply(_Outcome("skipped", item.id, reason="deleted", detail="flagged deleted", query=query))
            return
        self.wait_room(new=old is None)
        self.submit(self.html_task, item.id, query, new=old is None)

    # -- decisions (main thread or worker) -----------------------------------------------------------------

    def post_file_ok(self, post: dict) -> bool:
        try:
            path = DataDir(self.data_dir).image_path(post["file"])
        except UnsafePathError:
            return False
        md5 = post.get("md5")
        return _valid_file(path, md5 if is_md5(md5) else None)

    def decide(self, info: PostInfo, query: str) -> _Outcome | _Job:
        """Skip (with a reason), already present, adopt a verified file left by a killed run, or download."""
        def skip(reason: str, detail: str) -> _Outcome:
            return _Outcome("skipped", info.id, reason=reason, detail=detail, query=query)

        if info.deleted:
            return skip("deleted", "the post is deleted")
        if not info.file_url or not info.md5:
            return skip("restricted", "no file URL or md5 (restricted to some accounts, or banned)")
        ext = normalize_ext(info.file_ext)
        if ext is None:
            return skip("not_image", f"file type {str(info.file_ext)[:20]!r} is not an image")
        if not is_md5(info.md5):
            return skip("unsafe", f"md5 {info.md5[:40]!r} is not 32 lowercase hex characters")
        sample = (self.file_size == "sample" and info.sample_url and
                  urljoin(self.base_url, info.sample_url) != urljoin(self.base_url, info.file_url))
        url = urljoin(self.base_url + "/", info.sample_url if sample else info.file_url)
        try:
            check_url(url)
        except FetchError as e:
            return skip("unsafe", e.detail)
        if sample and normalize_ext(Path(urlsplit(url).path).suffix) is None:
            return skip("not_image", f"sample {Path(urlsplit(url).path).name[:40]!r} is not an image")
        if not sample and self.max_bytes and info.file_size and info.file_size > self.max_bytes:
            return skip("too_large", f"{info.file_size} bytes > --max-bytes {self.max_bytes}")

        old = self.existing.get(id_key(info.id))
        if old is not None:
            if self.post_file_ok(old):
                return _Outcome("present", info.id)
            if not sample and old.get("md5") != info.md5:
                return skip("file_changed", f"the stored line names md5 {old.get('md5')}, the server {info.md5}")
            return _Job(info, url, None if sample else info.md5, ext, query, repair=old)
        if not sample:
            twin = self.existing_md5.get(info.md5)
            if twin is not None and self.post_file_ok(twin):
                return _Outcome("present", info.id)
            target = self.data_dir / image_relpath(info.md5, ext)
            if _valid_file(target, info.md5):  # renamed into place by a run killed before its line
                return _Outcome("stored", info.id, post=post_record(info, self.base_url, md5=info.md5, ext=ext),
                                detail="adopted")
        return _Job(info, url, None if sample else info.md5, ext, query)

    # -- worker tasks --------------------------------------------------------------------------------------

    def html_task(self, pid: int, query: str) -> _Outcome:
        page_url = self.client.url(f"/posts/{pid}")
        try:
            info = self.client.get_html(page_url, None, parse=lambda t: parse_post_page(t, page_url, pid))
        except FetchError as e:
            if e.reason == "interrupted":
                return _Outcome("interrupted", pid)
            return _Outcome("skipped", pid, reason="fetch_failed", detail=f"post page: {e}", query=query)
        res = self.decide(info, query)
        return self.store_file(res) if isinstance(res, _Job) else res

    def _ensure_dir(self, path: Path) -> None:
        with self._dirs_lock:
            if path in self._dirs:
                return
            new = not path.is_dir()
            path.mkdir(parents=True, exist_ok=True)
            if new:
                fsync_dir(path.parent)
                fsync_dir(path.parent.parent)
            self._dirs.add(path)

    def store_file(self, job: _Job) -> _Outcome:
        """Download, verify, fsync and rename into ``images/<md5[:2]>/<md5>.<ext>``; the line comes later."""
        info = job.info
        try:
            if job.md5 is not None:
                target = self.data_dir / image_relpath(job.md5, job.ext)
                self._ensure_dir(target.parent)
                got = self.client.download(job.url, target, expected_md5=job.md5, max_bytes=self.max_bytes)
                md5, ext = job.md5, job.ext
            else:
                self._ensure_dir(self.images)
                got = self.client.download(job.url, self.images / "sample", max_bytes=self.max_bytes)
                try:
                    from ..data.imaging import identify

                    ext = identify(str(got.tmp))[0]
                except ImageLoadError as e:
                    discard(got.tmp)
                    return _Outcome("skipped", info.id, reason="invalid_image", detail=str(e), query=job.query)
                md5 = got.md5
                if job.repair is not None and job.repair.get("md5") != md5:
                    discard(got.tmp)
                    return _Outcome("skipped", info.id, reason="file_changed",
                                    detail="the sample differs from the stored one", query=job.query)
                target = self.data_dir / image_relpath(md5, ext)
                self._ensure_dir(target.parent)
            try:
                commit(got.tmp, target)
            except OSError:
                discard(got.tmp)
                raise
        except FetchError as e:
            if e.reason == "interrupted":
                return _Outcome("interrupted", info.id)
            reason = e.reason if e.reason in ("md5_mismatch", "too_large") else "download_failed"
            return _Outcome("skipped", info.id, reason=reason, detail=str(e), query=job.query)
        post = post_record(info, self.base_url, md5=md5, ext=ext,
                           original_md5=info.md5 if job.md5 is None else None)
        return _Outcome("repaired" if job.repair is not None else "stored", info.id, post=post)


@contextmanager
def _sigint_stops(stop: threading.Event, client: DanbooruClient) -> Iterator[None]:
    """While scraping, Ctrl-C sets ``stop`` and cuts active downloads instead of raising wherever the main
    thread happens to be (inside the executor's locks, a KeyboardInterrupt can leave a future locked and
    the run hung); the loops notice ``stop`` and end cleanly. Outside the main thread: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        stop.set()
        client.abort_active()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """One writer of posts.jsonl per data directory at a time (--scrape and --import share the lock)."""
    from ..data.posts import posts_lock

    with posts_lock(data_dir):
        yield


def scrape(data_dir: str | os.PathLike, queries: list[str] | str | None, *, limit: int | None = None,
           base_url: str = DEFAULT_BASE_URL, source: str = "api", rate: float = 1.0, workers: int = 4,
           file_size: str = "original", max_bytes: int | None = DEFAULT_MAX_BYTES, login: str | None = None,
           api_key: str | None = None, quiet: bool = False, tries: int = 5, backoff: float = 1.0,
           timeout: float = 30.0, page_size: int = PAGE_SIZE) -> ScrapeResult:
    """Collect the posts of ``queries`` (worked in order) into ``data_dir``; ``limit`` counts new posts
    stored in this run. Resumes: posts already stored with a valid file are not fetched again.

    ``login``/``api_key`` default to ``$DANBOORU_LOGIN``/``$DANBOORU_API_KEY``; they are sent as HTTP Basic
    auth to ``base_url`` only and never printed or written. ``tries``/``backoff`` bound the retries of one
    request (the wait before try n+1 is ``backoff * 2**n`` plus jitter, or the server's Retry-After).
    Writes ``DATA/reports/scrape_report.json``.
    """
    queries = [queries] if isinstance(queries, str) else list(queries or [])
    queries = [" ".join(q.split()) for q in queries if isinstance(q, str) and q.strip()]
    if not queries:
        raise UsageError("--scrape needs at least one --query (a non-empty tag search)")
    if source not in SOURCES:
        raise UsageError(f"--source must be one of {', '.join(SOURCES)}")
    if file_size not in FILE_SIZES:
        raise UsageError(f"--file-size must be one of {', '.join(FILE_SIZES)}")
    if not (isinstance(rate, (int, float)) and rate > 0 and math.isfinite(rate)):
        raise UsageError("--rate must be a positive number of requests per second (default 1)")
    if workers is None or workers < 1:
        raise UsageError("--workers must be at least 1")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be a positive number of new posts")
    if max_bytes is not None and max_bytes < 1:
        raise UsageError("--max-bytes must be positive")
    if not 1 <= page_size <= PAGE_SIZE:
        raise UsageError(f"page_size must be between 1 and {PAGE_SIZE}")
    login = login or os.environ.get("DANBOORU_LOGIN") or None
    api_key = api_key or os.environ.get("DANBOORU_API_KEY") or None
    if bool(login) != bool(api_key):
        raise UsageError("logging in needs both a login and an API key (DANBOORU_LOGIN and DANBOORU_API_KEY, "
                         "or --login and --api-key)")
    base = normalize_base_url(base_url)
    if urlsplit(base).hostname and urlsplit(base).hostname.endswith("donmai.us") and rate > 2 and not quiet:
        print(f"alt-i2v: warning: --rate {rate:g} is more than 2 requests/s against Danbooru; please keep "
              "it low (see the README on Danbooru's terms)", file=sys.stderr)

    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    result = ScrapeResult(data_dir=str(data), source=source, queries=list(queries), rate_limit=float(rate),
                          limit=limit)
    stop = threading.Event()
    client = DanbooruClient(base, rate=rate, login=login, api_key=api_key, tries=tries, backoff=backoff,
                            timeout=timeout, pool_size=workers + 2, stop=stop)
    t0 = time.monotonic()
    with _exclusive(data):
        result.stale_temps_removed = remove_stale_temps(DataDir(data).images)
        run = _Scrape(data, client, result, source=source, file_size=file_size, max_bytes=max_bytes, limit=limit,
                      workers=workers, page_size=page_size, quiet=quiet)
        try:
            with _sigint_stops(stop, client):
                run.run(queries)
                if stop.is_set():
                    raise KeyboardInterrupt
        except BaseException as e:
            stop.set()
            client.abort_active()
            result.interrupted = isinstance(e, KeyboardInterrupt)
            run.abort()
            raise
        finally:
            run.close()
            client.close()
            result.requests, result.retries, result.bytes = client.requests, client.retries, client.bytes
            result.elapsed = time.monotonic() - t0
            report = {
                "base_url": client.base_url, "source": source,
                "settings": {"limit": limit, "rate": rate, "workers": workers, "file_size": file_size,
                             "max_bytes": max_bytes, "logged_in": bool(login)},
                **{k: v for k, v in result.summary().items() if k not in ("report", "queries")},
                "queries": result.queries,
                "limit_reached": result.limit_reached, "interrupted": result.interrupted,
                "adopted_files": result.adopted, "new_ids": result.new_ids,
                "failed_pages": result.failed_pages, "notes": [client.scrub(n) for n in result.notes],
                "skipped_posts": result.skipped[:MAX_REPORTED_SKIPS],
                "skipped_posts_not_listed": max(0, len(result.skipped) - MAX_REPORTED_SKIPS),
            }
            result.report_path = str(DataDir(data).write_report("scrape_report", report))
    if result.failed_pages and result.stored == 0 and result.present == 0 and not result.skipped:
        first = result.failed_pages[0]
        raise AltI2VError(f"nothing scraped: query {first['query']!r} page {first['page']} failed "
                          f"({first['reason']}: {first['detail']}); check --base-url, the network, the query and "
                          f"the login; details in {result.report_path}")
    return result
