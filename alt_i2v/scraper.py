"""Danbooru scraper: posts and images into the dataset directory, politely, resumably, never corrupt.

One :class:`DanbooruClient` owns the HTTP session: an honest User-Agent, one rate limit shared by every
request (API pages, HTML pages and images), retries with exponential backoff and jitter on 429/5xx and
connection errors (``Retry-After`` honoured, for every thread), and a bounded number of tries after which
the item is skipped and reported. A body shorter than its Content-Length, or a page that does not parse,
is retried and never used.

Posts come from the JSON API (``/posts.json``, paged with the ``page=b<id>`` cursor) or, with
``source="html"``, from the HTML post list and post pages; both give identical ``posts.jsonl`` lines.
Every image is streamed into a temp file next to its final place, checked against its md5, fsync'ed and
renamed into ``images/<md5[:2]>/<md5>.<ext>``; only then is the post's line appended. A SIGKILL at any
moment leaves a consistent dataset, and running the same command again resumes.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from . import __version__
from .dataset import CATEGORIES, RATINGS, PostsWriter, check_post_id, id_key, iter_posts, normalize_tag
from .errors import AltI2VError, ImageLoadError, UnsafePathError, UsageError
from .fsutil import file_digest, fsync_dir, image_relpath, is_md5, normalize_ext, remove_stale_temps, safe_join

DEFAULT_BASE_URL = "https://danbooru.donmai.us"
PROJECT_URL = "https://github.com/alt-i2v/alt-i2v"
USER_AGENT = f"alt-i2v/{__version__} (+{PROJECT_URL})"
SOURCES = ("api", "html")
FILE_SIZES = ("original", "sample")
PAGE_SIZE = 200                    # Danbooru's largest page
MAX_NUMBERED_PAGE = 1000           # Danbooru refuses numbered pages beyond this; the b<id> cursor has no limit
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_PAGE_BYTES = 32 * 1024 * 1024
RETRY_STATUS = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
TAG_TYPES = {"0": "general", "1": "artist", "3": "copyright", "4": "character", "5": "meta"}
CHUNK = 64 * 1024
MAX_REPORTED_SKIPS = 10000
_MD5_NAME = re.compile(r"([0-9a-f]{32})\.([A-Za-z0-9]+)$")
_SECRET_PARAM = re.compile(r"(?i)\b(api_key|login|password_hash|password)=[^&\s'\"]+")


# ---------------------------------------------------------------------------------------------------------
# Errors


class FetchError(AltI2VError):
    """A request that did not give a usable answer within its tries. ``reason`` is a short stable code
    (``http_404``, ``truncated``, ``malformed_json``, ``connection``, ``md5_mismatch``, ``too_large``...)."""

    def __init__(self, reason: str, detail: str = "", status: int | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status


class PageFormatError(ValueError):
    """A page arrived whole but is not what was asked for (not the expected JSON shape, unknown HTML)."""


class _Retry(Exception):
    """Internal: this attempt failed in a way worth another try (``limit`` caps tries of this reason)."""

    def __init__(self, reason: str, detail: str = "", *, limit: int | None = None,
                 retry_after: float | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail
        self.limit = limit
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------------------
# Rate limit


class RateLimiter:
    """Spaced slots shared by all threads: request starts are at least ``1/rate`` seconds apart, with no
    burst after an idle spell. ``defer`` pushes every later slot back (a server's ``Retry-After``)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive number of requests per second")
        self.rate = float(rate)
        self.interval = 1.0 / self.rate
        self._clock = clock
        self._next = clock()
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for this caller's slot; False if ``stop`` was set while waiting."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        delay = slot - now
        if delay > 0:
            if stop is not None:
                return not stop.wait(delay)
            time.sleep(delay)
        return stop is None or not stop.is_set()

    def defer(self, seconds: float) -> None:
        """No slot starts earlier than ``seconds`` from now."""
        with self._lock:
            self._next = max(self._next, self._clock() + max(0.0, seconds))


# ---------------------------------------------------------------------------------------------------------
# HTTP client


def normalize_base_url(url: str) -> str:
    """``scheme://host[:port][/path]`` without a trailing slash; http(s) only, no credentials in it."""
    if not isinstance(url, str) or not url.strip():
        raise UsageError("--base-url must be an http(s) URL such as https://danbooru.donmai.us")
    parts = urlsplit(url.strip())
    if "@" in parts.netloc:
        # never echo the URL: it holds credentials
        raise UsageError("--base-url must not contain a login or password; use DANBOORU_LOGIN and "
                         "DANBOORU_API_KEY (or --login/--api-key) instead")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url must be an http(s) URL such as https://danbooru.donmai.us, not {url!r}")
    if parts.query or parts.fragment:
        raise UsageError(f"--base-url must not have a query or fragment: {url!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")


def check_url(url: Any) -> str:
    """An absolute http(s) URL with a host, or raise FetchError('bad_url')."""
    if not isinstance(url, str):
        raise FetchError("bad_url", "not a string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError("bad_url", f"only http(s) URLs are fetched, not {url[:100]!r}")
    return url


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class Download:
    """A verified file in a temp place: rename ``tmp`` into place, or unlink it."""

    tmp: Path
    md5: str
    size: int


def _secret_forms(login: str | None, api_key: str | None) -> list[str]:
    """Every form the credentials take on the wire or in a message: as given, as the base64 Basic-auth
    token, and each of those URL-encoded (longest first, so a longer form is replaced before its parts)."""
    import base64
    from urllib.parse import quote, quote_plus

    plain = [s for s in (login, api_key) if s and len(s) >= 2]
    if login and api_key:
        token = base64.b64encode(f"{login}:{api_key}".encode()).decode("ascii")
        plain += [token, token.rstrip("="), f"{login}:{api_key}"]
    forms = set(plain)
    for s in plain:
        forms.update((quote(s, safe=""), quote_plus(s), quote(quote(s, safe=""), safe="")))
    return sorted(forms, key=len, reverse=True)


class DanbooruClient:
    """The one object that talks to the server: session, User-Agent, rate limit, retries, credentials.

    Credentials go out as HTTP Basic auth, only to the ``base_url`` host, never in a URL, and are scrubbed
    from every message this client produces.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, rate: float = 1.0, login: str | None = None,
                 api_key: str | None = None, tries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_retry_after: float = 600.0, timeout: float = 30.0, pool_size: int = 8,
                 stop: threading.Event | None = None, user_agent: str = USER_AGENT):
        self.base_url = normalize_base_url(base_url)
        self._host = urlsplit(self.base_url).netloc.lower()
        self._auth = (login, api_key) if login and api_key else None
        self._secrets = _secret_forms(login, api_key)
        self.tries = max(1, int(tries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.timeout = timeout
        self.stop = stop or threading.Event()
        self.limiter = RateLimiter(rate)
        self.session = requests.Session()
        self.session.headers["User-Agent"] = user_agent
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(4, pool_size), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._stats_lock = threading.Lock()
        self._active: set[requests.Response] = set()
        self.requests = 0
        self.retries = 0
        self.bytes = 0

    # -- helpers -------------------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    def scrub(self, text: Any) -> str:
        """``text`` with credentials (and any ``api_key=...`` style parameter) replaced by ``***``."""
        text = str(text)
        for s in self._secrets:
            text = text.replace(s, "***")
        return _SECRET_PARAM.sub(r"\1=***", text)

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self, name, getattr(self, name) + n)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self.stop.wait(seconds):
            raise FetchError("interrupted")

    def abort_active(self) -> None:
        """Cut the connections of responses being read now (after ``stop`` is set), so that an interrupt
        does not wait for a slow or stalled download to time out. Takes no lock: it runs inside the SIGINT
        handler, and ``list(set)`` is a single step under the GIL."""
        active = list(self._active)
        for resp in active:
            sock = getattr(getattr(resp.raw, "_connection", None), "sock", None)
            if sock is None:
                sock = getattr(getattr(getattr(getattr(resp.raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.session.close()

    # -- the one request loop ------------------------------------------------------------------------------

    def fetch(self, url: str, params: dict | None, handle: Callable[[requests.Response], Any]) -> Any:
        """GET ``url`` within the rate limit and hand the 200 response to ``handle``; retry what is worth
        retrying (429/5xx, connection errors, truncated or unparseable bodies) up to ``tries`` times."""
        check_url(url)
        auth = self._auth if urlsplit(url).netloc.lower() == self._host else None
        seen: dict[str, int] = {}
        last: _Retry | None = None
        for attempt in range(self.tries):
            if attempt:
                self._count("retries")
            if not self.limiter.acquire(self.stop):
                raise FetchError("interrupted")
            self._count("requests")
            resp = None
            try:
                resp = self.session.get(url, params=params, auth=auth, timeout=self.timeout, stream=True)
                with self._stats_lock:
                    self._active.add(resp)
                if self.stop.is_set():  # interrupted while waiting for the headers: abort_active missed it
                    resp.close()
                    raise FetchError("interrupted")
                with resp:
                    if resp.status_code == 200:
                        return handle(resp)
                    if resp.status_code in RETRY_STATUS:
                        raise _Retry(f"http_{resp.status_code}", f"HTTP {resp.status_code}",
                                     retry_after=parse_retry_after(resp.headers.get("Retry-After")))
                    raise FetchError(f"http_{resp.status_code}", self._error_text(resp), status=resp.status_code)
            except _Retry as e:
                last = e
            except requests.Timeout as e:
                last = _Retry("timeout", self.scrub(e))
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as e:
                # a body cut short of its Content-Length surfaces here as urllib3's IncompleteRead
                last = _Retry("truncated" if "IncompleteRead" in str(e) else "connection", self.scrub(e))
            except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
                    requests.exceptions.MissingSchema) as e:
                raise FetchError("bad_url", self.scrub(e)) from None
            except requests.RequestException as e:
                raise FetchError("request_failed", self.scrub(e)) from None
            finally:
                if resp is not None:
                    with self._stats_lock:
                        self._active.discard(resp)
            if self.stop.is_set():
                raise FetchError("interrupted")
            seen[last.reason] = seen.get(last.reason, 0) + 1
            if last.limit is not None and seen[last.reason] >= last.limit:
                break
            if attempt + 1 < self.tries:
                if last.retry_after is not None:
                    # every thread waits: the server asked this client, not this request, to slow down
                    wait_s = max(last.retry_after, min(self.max_backoff, self.backoff * 2 ** attempt))
                    self.limiter.defer(min(wait_s, self.max_retry_after))
                else:
                    delay = min(self.max_backoff, self.backoff * 2 ** attempt) + random.uniform(0, self.backoff)
                    self._sleep(delay)
        assert last is not None
        raise FetchError(last.reason, f"{last.detail} (gave up after {sum(seen.values())} tries)")

    def _error_text(self, resp: requests.Response) -> str:
        text = ""
        try:
            raw = resp.raw.read(4096, decode_content=True) or b""
            text = raw.decode("utf-8", "replace")
            obj = json.loads(text)
            if isinstance(obj, dict):
                text = str(obj.get("message") or obj.get("error") or text)
        except Exception:  # noqa: BLE001 - the body of an error page is only a hint
            pass
        text = re.sub(r"<[^>]+>", " ", text)
        text = re.sub(r"\s+", " ", text).strip()[:200]
        return self.scrub(f"HTTP {resp.status_code} {resp.reason or ''}".strip() + (f": {text}" if text else ""))

    def _read(self, resp: requests.Response, max_bytes: int | None, sink: Callable[[bytes], None]) -> int:
        """Stream the body into ``sink``; raise _Retry if it is shorter than its Content-Length."""
        declared = _int(resp.headers.get("Content-Length"))
        encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if max_bytes and declared is not None and not encoded and declared > max_bytes:
            raise FetchError("too_large", f"{declared} bytes > {max_bytes}")
        n = 0
        for chunk in resp.iter_content(CHUNK):
            if self.stop.is_set():
                raise FetchError("interrupted")
            n += len(chunk)
            if max_bytes and n > max_bytes:
                raise FetchError("too_large", f"more than {max_bytes} bytes")
            sink(chunk)
        self._count("bytes", n)
        if declared is not None:
            got = n
            if encoded:
                try:
                    got = int(resp.raw.tell())
                except (AttributeError, TypeError, ValueError):
                    got = declared
            if got < declared:
                raise _Retry("truncated", f"body has {got} of {declared} bytes")
        return n

    # -- the three kinds of request ------------------------------------------------------------------------

    def get_json(self, path_or_url: str, params: dict | None = None,
                 parse: Callable[[Any], Any] | None = None) -> Any:
        """A JSON document; one that does not parse (or that ``parse`` rejects) is fetched again."""
        def decode(resp: requests.Response, body: bytes) -> Any:
            try:
                return json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise _Retry("malformed_json", f"unparseable JSON ({str(e)[:80]})") from None

        return self._get_page(path_or_url, params, decode, parse)

    def get_html(self, path_or_url: str, params: dict | None = None,
                 parse: Callable[[str], Any] | None = None) -> Any:
        """An HTML page as text (or what ``parse`` makes of it; PageFormatError means fetch again)."""
        return self._get_page(path_or_url, params,
                              lambda resp, body: body.decode(resp.encoding or "utf-8", "replace"), parse)

    def _get_page(self, path_or_url: str, params: dict | None, decode: Callable[[requests.Response, bytes], Any],
                  parse: Callable[[Any], Any] | None) -> Any:
        """Fetch a whole page (bounded size), decode it, and let ``parse`` judge it (PageFormatError: again)."""
        def handle(resp: requests.Response) -> Any:
            buf = bytearray()
            self._read(resp, MAX_PAGE_BYTES, buf.extend)
            doc = decode(resp, bytes(buf))
            if parse is None:
                return doc
            try:
                return parse(doc)
            except PageFormatError as e:
                raise _Retry("unexpected_page", str(e)[:200]) from None

        return self.fetch(self._abs(path_or_url), params, handle)

    def download(self, url: str, directory: Path, *, prefix: str, expected_md5: str | None = None,
                 max_bytes: int | None = None) -> Download:
        """Stream ``url`` into a hidden ``<prefix><random>.part`` temp file in ``directory``, fsync'ed; with
        ``expected_md5`` a mismatching file is fetched once more, then refused. The caller renames it."""
        def handle(resp: requests.Response) -> Download:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=directory)
            digest = hashlib.md5()
            ok = False
            try:
                with os.fdopen(fd, "wb") as f:
                    def sink(chunk: bytes) -> None:
                        digest.update(chunk)
                        f.write(chunk)
                    size = self._read(resp, max_bytes, sink)
                    md5 = digest.hexdigest()
                    if expected_md5 is not None and md5 != expected_md5:
                        raise _Retry("md5_mismatch", f"file md5 {md5} != {expected_md5}", limit=2)
                    f.flush()
                    os.fsync(f.fileno())
                ok = True
                return Download(Path(tmp), md5, size)
            finally:
                if not ok:
                    _unlink(Path(tmp))

        return self.fetch(url, None, handle)

    def _abs(self, path_or_url: str) -> str:
        return path_or_url if "://" in path_or_url else self.url(path_or_url)


# ---------------------------------------------------------------------------------------------------------
# Parsing: both sources give a PostInfo, and one function makes the posts.jsonl line from it


@dataclass
class PostInfo:
    """What the scraper needs to know about one post, whichever source it came from."""

    id: int
    md5: str | None = None
    file_ext: str | None = None
    file_url: str | None = None
    sample_url: str | None = None
    tags: dict[str, list[str]] = field(default_factory=dict)
    rating: str | None = None
    score: int | None = None
    width: int | None = None
    height: int | None = None
    deleted: bool = False
    file_size: int | None = None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _tags(names: Any) -> list[str]:
    if isinstance(names, str):
        names = names.split()
    if not isinstance(names, (list, tuple)):
        return []
    return sorted({normalize_tag(t) for t in names if isinstance(t, str) and t.strip()})


def _rating(value: Any) -> str | None:
    return RATINGS.get(value.strip().lower()) if isinstance(value, str) else None


def parse_api_post(obj: Any) -> PostInfo:
    """One element of ``/posts.json`` (ValueError when it is not a post with an integer id)."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    pid = _int(obj.get("id")) if not isinstance(obj.get("id"), str) else None
    if pid is None:
        raise ValueError(f"post without an integer id: {str(obj.get('id'))[:40]!r}")
    check_post_id(pid)  # a server's id outside 64 bits would block every later --build
    if any(f"tag_string_{c}" in obj for c in CATEGORIES):
        tags = {c: _tags(obj.get(f"tag_string_{c}") or "") for c in CATEGORIES}
    else:  # a server that only gives the flat tag_string
        tags = {c: [] for c in CATEGORIES}
        tags["general"] = _tags(obj.get("tag_string") or "")
    md5 = obj.get("md5")
    ext = obj.get("file_ext")
    return PostInfo(
        id=pid, md5=md5 if isinstance(md5, str) and md5 else None,
        file_ext=ext if isinstance(ext, str) and ext else None,
        file_url=obj.get("file_url") or None, sample_url=obj.get("large_file_url") or None, tags=tags,
        rating=_rating(obj.get("rating")), score=_int(obj.get("score")),
        width=_int(obj.get("image_width")), height=_int(obj.get("image_height")),
        deleted=bool(obj.get("is_deleted")), file_size=_int(obj.get("file_size")))


def parse_api_page(obj: Any) -> list[Any]:
    """``/posts.json`` must be a list; an error object or anything else is a bad page."""
    if not isinstance(obj, list):
        raise PageFormatError(f"expected a list of posts, got {type(obj).__name__}")
    return obj


def _soup(text: str):
    from bs4 import BeautifulSoup

    return BeautifulSoup(text, "html.parser")


@dataclass
class ListItem:
    """A post as the HTML post list shows it: enough to decide whether its page is needed."""

    id: int
    deleted: bool = False


def parse_post_list(text: str) -> tuple[list[ListItem], bool | None]:
    """The ``<article class="post-preview" data-id=...>`` items of ``/posts`` and whether a next page is
    linked (None when the page has no paginator). PageFormatError if it is not a post list at all."""
    soup = _soup(text)
    container = soup.select_one("#posts") or soup.select_one(".posts-container")
    articles = (container or soup).select("article.post-preview[data-id], article[id^=post_][data-id]")
    if container is None and not articles:
        raise PageFormatError("not a Danbooru post list (no #posts element)")
    items, seen = [], set()
    for a in articles:
        pid = _int(a.get("data-id"))
        if pid is None or pid in seen:
            continue
        seen.add(pid)
        items.append(ListItem(pid, "deleted" in (a.get("data-flags") or "").split()))
    paginator = soup.select_one(".paginator")
    if paginator is None:
        return items, None
    nxt = paginator.select_one("a.paginator-next[href], a[rel~=next][href]")
    return items, nxt is not None


def parse_post_page(text: str, page_url: str, expected_id: int | None = None) -> PostInfo:
    """A post page (``/posts/<id>``): the image container's data attributes and the categorised tag list."""
    soup = _soup(text)
    box = soup.select_one("section.image-container[data-id], #image-container[data-id], [data-id].image-container")
    if box is None:
        raise PageFormatError("not a Danbooru post page (no image container)")
    pid = _int(box.get("data-id"))
    if pid is None or (expected_id is not None and pid != expected_id):
        raise PageFormatError(f"post page shows post {box.get('data-id')!r}, expected {expected_id}")
    try:
        check_post_id(pid)
    except ValueError as e:
        raise PageFormatError(str(e)) from None

    def attr(name: str) -> str | None:
        value = box.get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None

    file_url = attr("data-file-url")
    if file_url is None:
        link = soup.select_one("#post-info-size a[href], #post-option-download a[href]")
        file_url = link["href"].strip() if link is not None and link.get("href", "").strip() else None
    file_url = urljoin(page_url, file_url) if file_url else None
    name_match = _MD5_NAME.search(urlsplit(file_url).path) if file_url else None
    md5 = attr("data-md5") or (name_match.group(1) if name_match else None)
    ext = attr("data-file-ext") or (name_match.group(2).lower() if name_match else None)
    sample = attr("data-large-file-url")
    if sample is None:
        img = box.select_one("img#image[src], #image[src]")
        sample = img["src"].strip() if img is not None and img.get("src", "").strip() else None
    sample = urljoin(page_url, sample) if sample and file_url else None

    tags: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    tag_area = soup.select_one("#tag-list") or soup
    for li in tag_area.select("li[class*=tag-type-]"):
        cat = next((TAG_TYPES.get(c[len("tag-type-"):]) for c in li.get("class", []) if c.startswith("tag-type-")),
                   None) or "general"
        name = li.get("data-tag-name")
        if not name:
            link = li.select_one("a.search-tag")
            name = link.get_text(" ", strip=True) if link is not None else None
        if name:
            tags[cat].append(name)
    tags = {c: _tags(v) for c, v in tags.items()}
    return PostInfo(
        id=pid, md5=md5, file_ext=ext, file_url=file_url, sample_url=sample, tags=tags,
        rating=_rating(attr("data-rating")), score=_int(attr("data-score")), width=_int(attr("data-width")),
        height=_int(attr("data-height")), deleted="deleted" in (attr("data-flags") or "").split(),
        file_size=_int(attr("data-file-size")))


def post_record(info: PostInfo, base_url: str, *, md5: str, ext: str, original_md5: str | None = None) -> dict:
    """The ``posts.jsonl`` line (CONTRACTS section 1) for a post whose file is ``<md5>.<ext>``."""
    post = {"id": info.id, "md5": md5, "file_ext": ext, "file": image_relpath(md5, ext),
            "tags": {c: list(info.tags.get(c, [])) for c in CATEGORIES}, "rating": info.rating,
            "score": info.score, "width": info.width, "height": info.height, "source": "danbooru",
            "url": f"{base_url}/posts/{info.id}"}
    if original_md5 is not None:
        post["original_md5"] = original_md5
        post["variant"] = "sample"
    return post


# ---------------------------------------------------------------------------------------------------------
# Pages of a query


def _cursor_mode(query: str) -> bool:
    """The b<id> cursor only works in id order; an ``order:`` search is paged by number."""
    return not any(t.lower().startswith("order:") and t.lower() not in ("order:id_desc", "order:id")
                   for t in query.split())


def _pages(client: DanbooruClient, query: str, source: str, page_size: int,
           notes: list[str]) -> Iterator[tuple[str, list[Any]]]:
    """Yield ``(page label, items)`` for one query: PostInfo (api) or ListItem (html) lists, in order.
    Raises FetchError for a page that could not be had."""
    use_cursor = _cursor_mode(query)
    cursor: int | None = None
    number = 1
    while True:
        params: dict[str, Any] = {"tags": query, "limit": page_size}
        label = "1"
        if use_cursor and cursor is not None:
            params["page"] = label = f"b{cursor}"
        elif not use_cursor:
            params["page"] = number
            label = str(number)
        if source == "api":
            raw = client.get_json("/posts.json", params, parse=parse_api_page)
            items: list[Any] = []
            for obj in raw:
                try:
                    items.append(parse_api_post(obj))
                except ValueError as e:
                    notes.append(f"{query!r} page {label}: skipped a malformed entry ({e})")
            count, more = len(raw), len(raw) >= page_size
        else:
            items, has_next = client.get_html("/posts", params, parse=parse_post_list)
            count = len(items)
            more = bool(items) and (has_next if has_next is not None else count >= page_size)
        ids = [it.id for it in items]
        if use_cursor and cursor is not None:
            items = [it for it in items if it.id < cursor]
            if ids and not items:
                notes.append(f"{query!r}: the server ignored the page=b<id> cursor; stopped this query")
                return
        yield label, items
        if not more or count == 0:
            return
        if use_cursor:
            if not ids:
                return
            cursor = min(ids) if cursor is None else min(min(ids), cursor)
        else:
            number += 1
            if number > MAX_NUMBERED_PAGE:
                notes.append(f"{query!r}: stopped at page {MAX_NUMBERED_PAGE}, Danbooru's last numbered page")
                return


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class ScrapeResult:
    """What a scrape did: counts, the skipped posts with reasons, failed pages, request statistics."""

    data_dir: str = ""
    source: str = "api"
    queries: list[str] = field(default_factory=list)
    stored: int = 0
    adopted: int = 0
    present: int = 0
    repaired: int = 0
    repeated: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason", "detail", "query"}
    failed_pages: list[dict] = field(default_factory=list)  # {"query", "page", "reason", "detail"}
    notes: list[str] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    rate_limit: float = 1.0
    stale_temps_removed: int = 0
    limit: int | None = None
    limit_reached: bool = False
    interrupted: bool = False
    report_path: str = ""

    def skip_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s["reason"]] = counts.get(s["reason"], 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        rate = self.requests / self.elapsed if self.elapsed > 0 else 0.0
        rows: dict[str, Any] = {
            "source": self.source, "queries": len(self.queries), "new posts": self.stored,
            "already present": self.present, "files repaired": self.repaired, "skipped": len(self.skipped),
            "skip reasons": self.skip_counts(), "failed pages": len(self.failed_pages),
            "requests": self.requests, "retries": self.retries, "downloaded MB": round(self.bytes / 1e6, 2),
            "elapsed s": round(self.elapsed, 1),
            "request rate": f"{rate:.2f}/s (limit {self.rate_limit:g}/s)",
        }
        if self.repeated:
            rows["repeated across queries"] = self.repeated
        if self.stale_temps_removed:
            rows["stale temp files removed"] = self.stale_temps_removed
        if self.interrupted:
            rows["interrupted"] = "yes: run the same command again to resume"
        if self.report_path:
            rows["report"] = self.report_path
        return rows


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


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class _Scrape:
    """One run over the queries: the main thread pages and appends lines; workers fetch and store files."""

    def __init__(self, data_dir: Path, client: DanbooruClient, result: ScrapeResult, *, source: str,
                 file_size: str, max_bytes: int | None, limit: int | None, workers: int, page_size: int,
                 quiet: bool):
        from .progress import bar

        self.data_dir = data_dir
        self.images = data_dir / "images"
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
        pages = _pages(self.client, query, self.source, self.page_size, self.result.notes)
        try:
            for label, items in pages:
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
            pages.close()

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
            path = safe_join(self.data_dir, post["file"], inside="images")
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
                got = self.client.download(job.url, target.parent, prefix=f".{target.name}.",
                                           expected_md5=job.md5, max_bytes=self.max_bytes)
                md5, ext = job.md5, job.ext
            else:
                self._ensure_dir(self.images)
                got = self.client.download(job.url, self.images, prefix=".sample.", max_bytes=self.max_bytes)
                try:
                    from .imaging import identify

                    ext = identify(str(got.tmp))[0]
                except ImageLoadError as e:
                    _unlink(got.tmp)
                    return _Outcome("skipped", info.id, reason="invalid_image", detail=str(e), query=job.query)
                md5 = got.md5
                if job.repair is not None and job.repair.get("md5") != md5:
                    _unlink(got.tmp)
                    return _Outcome("skipped", info.id, reason="file_changed",
                                    detail="the sample differs from the stored one", query=job.query)
                target = self.data_dir / image_relpath(md5, ext)
                self._ensure_dir(target.parent)
            try:
                os.replace(got.tmp, target)
            except OSError:
                _unlink(got.tmp)
                raise
            fsync_dir(target.parent)
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
    from .dataset import posts_lock

    with posts_lock(data_dir):
        yield


def scrape(data_dir: str | os.PathLike, queries: list[str] | str, *, limit: int | None = None,
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
    from .progress import write_report

    if isinstance(queries, str):
        queries = [queries]
    queries = [" ".join(q.split()) for q in queries if isinstance(q, str) and q.strip()]
    if not queries:
        raise UsageError("--scrape needs at least one non-empty --query")
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
        result.stale_temps_removed = remove_stale_temps(data / "images") if (data / "images").is_dir() else 0
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
            result.report_path = str(write_report(data, "scrape_report", report))
    if result.failed_pages and result.stored == 0 and result.present == 0 and not result.skipped:
        first = result.failed_pages[0]
        raise AltI2VError(f"nothing scraped: query {first['query']!r} page {first['page']} failed "
                          f"({first['reason']}: {first['detail']}); check --base-url, the network, the query and "
                          f"the login; details in {result.report_path}")
    return result


__all__ = ["DanbooruClient", "RateLimiter", "ScrapeResult", "PostInfo", "FetchError", "PageFormatError", "scrape",
           "parse_api_post", "parse_post_list", "parse_post_page", "post_record", "normalize_base_url",
           "parse_retry_after", "USER_AGENT", "DEFAULT_BASE_URL"]
