"""The polite HTTP client every scrape request goes through (API pages, HTML pages, image downloads).

One :class:`DanbooruClient` owns the session: an honest User-Agent, one rate limit shared by every request
and thread, retries with exponential backoff and jitter on 429/5xx and connection errors (``Retry-After``
honoured, for every thread), a bounded number of tries after which the item is skipped and reported, and
credentials sent as HTTP Basic auth to the server's host only, scrubbed from every message. A body shorter
than its Content-Length, or a page that does not parse, is retried and never used.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from .. import __version__
from ..errors import AltI2VError, UsageError
from ..fsutil import discard, temp_path

DEFAULT_BASE_URL = "https://danbooru.donmai.us"
PROJECT_URL = "https://github.com/alt-i2v/alt-i2v"
USER_AGENT = f"alt-i2v/{__version__} (+{PROJECT_URL})"
MAX_PAGE_BYTES = 32 * 1024 * 1024
RETRY_STATUS = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
CHUNK = 64 * 1024
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

    def download(self, url: str, target: Path, *, expected_md5: str | None = None,
                 max_bytes: int | None = None) -> Download:
        """Stream ``url`` into a hidden temp file beside ``target`` (fsutil.temp_path); with ``expected_md5``
        a mismatching file is fetched once more, then refused. The caller commits it (fsutil.commit)."""
        def handle(resp: requests.Response) -> Download:
            tmp = temp_path(target)
            digest = hashlib.md5()
            ok = False
            try:
                with open(tmp, "xb") as f:
                    def sink(chunk: bytes) -> None:
                        digest.update(chunk)
                        f.write(chunk)
                    size = self._read(resp, max_bytes, sink)
                    md5 = digest.hexdigest()
                    if expected_md5 is not None and md5 != expected_md5:
                        raise _Retry("md5_mismatch", f"file md5 {md5} != {expected_md5}", limit=2)
                ok = True
                return Download(Path(tmp), md5, size)
            finally:
                if not ok:
                    discard(tmp)

        return self.fetch(url, None, handle)

    def _abs(self, path_or_url: str) -> str:
        return path_or_url if "://" in path_or_url else self.url(path_or_url)


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


