"""A fake Danbooru for the scraper's tests and benchmark: a real threaded HTTP/1.1 server on 127.0.0.1.

It serves what the scraper reads from Danbooru, in Danbooru's shapes: ``/posts.json`` (``tags``, ``limit``
up to 200, ``page`` as a number or the ``b<id>``/``a<id>`` cursors), the HTML post list ``/posts?tags=``
(``<article class="post-preview" data-id=...>`` items and a paginator), post pages ``/posts/<id>`` (the
image container's data attributes and the categorised tag list) and the files under ``/data/``.

Faults are injected per path (and page): 429 with Retry-After, 503, bodies cut short of their
Content-Length, malformed JSON, dropped connections, and a stalled download (for kill tests). Posts can be
restricted (no file URL or md5), deleted, videos or archives, or serve bytes that do not match their md5.
Every request is logged with its arrival time, so tests can count requests per second.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

CATEGORIES = ("general", "character", "copyright", "artist", "meta")
TAG_TYPE = {"general": 0, "artist": 1, "copyright": 3, "character": 4, "meta": 5}
SIDEBAR_ORDER = ("artist", "copyright", "character", "general", "meta")
RATING_NAMES = {"g": "General", "s": "Sensitive", "q": "Questionable", "e": "Explicit"}

GENERAL = ["1girl", "solo", "smile", "long_hair", "short_hair", "blue_eyes", "school_uniform", "looking_at_viewer",
           ":d", "^_^", "black_&_white", "<o>_<o>", "holding_sword", "\"quotes\""]
CHARACTERS = ["inazuma_(kancolle)", "hibiki_(kancolle)", "hakurei_reimu", "kirisame_marisa"]
COPYRIGHTS = ["kantai_collection", "touhou"]
ARTISTS = ["someone", "k/da_(artist)", "o'neill"]
META = ["highres", "absurdres", "commentary_request"]


def make_image(seed: int, size: tuple[int, int] = (16, 16), fmt: str = "PNG") -> bytes:
    """A small noise picture, different for every seed."""
    from PIL import Image

    rng = random.Random(seed)
    w, h = size
    img = Image.frombytes("RGB", (w, h), bytes(rng.randrange(256) for _ in range(w * h * 3)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@dataclass
class FakePost:
    """One post. ``md5`` is what the server publishes (by default the md5 of ``data``)."""

    id: int
    data: bytes = b""
    file_ext: str = "png"
    tags: dict = field(default_factory=dict)
    rating: str = "g"
    score: int = 0
    width: int = 16
    height: int = 16
    md5: str | None = None
    deleted: bool = False
    restricted: bool = False
    sample: bytes | None = None  # a separate large_file_url file (JPEG)
    file_url: str | None = None  # override of the published file URL

    def __post_init__(self) -> None:
        if self.md5 is None:
            self.md5 = hashlib.md5(self.data).hexdigest()
        self.tags = {c: sorted(set(self.tags.get(c, []))) for c in CATEGORIES}

    @property
    def tag_string(self) -> str:
        return " ".join(sorted(t for c in CATEGORIES for t in self.tags[c]))

    def all_tags(self) -> set[str]:
        return {t for c in CATEGORIES for t in self.tags[c]}


def make_posts(n: int, *, start_id: int = 1000, seed: int = 0, fmt: str = "PNG",
               extra_tags: list[str] | None = None, size: tuple[int, int] = (16, 16)) -> list[FakePost]:
    """``n`` ordinary image posts with ids ``start_id .. start_id+n-1`` and Danbooru-like tags."""
    rng = random.Random(seed)
    ext = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp"}[fmt]
    posts = []
    for i in range(n):
        pid = start_id + i
        tags = {"general": rng.sample(GENERAL, 3) + list(extra_tags or []),
                "character": rng.sample(CHARACTERS, 1), "copyright": rng.sample(COPYRIGHTS, 1),
                "artist": rng.sample(ARTISTS, 1), "meta": rng.sample(META, rng.randrange(0, 2))}
        posts.append(FakePost(pid, make_image(seed * 100003 + pid, size, fmt), ext, tags,
                              rating=rng.choice("gsqe"), score=rng.randrange(-5, 200), width=size[0],
                              height=size[1]))
    return posts


@dataclass
class Fault:
    kind: str  # "429" | "503" | "truncate" | "malformed" | "reset" | "stall" | "echo_auth"
    path: str  # exact path, or a prefix ending in "*"
    page: str | None = None
    times: int = 1
    retry_after: str | None = None
    hits: int = 0
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def matches(self, path: str, params: dict) -> bool:
        if self.times <= 0:
            return False
        ok = path.startswith(self.path[:-1]) if self.path.endswith("*") else path == self.path
        if ok and self.page is not None:
            ok = params.get("page", "1") == self.page
        return ok


@dataclass
class Logged:
    t: float
    path: str
    params: dict
    user: str | None
    user_agent: str


class FakeDanbooru:
    """Start with ``with FakeDanbooru(posts) as srv:``; ``srv.base_url`` is its address."""

    def __init__(self, posts: list[FakePost], *, latency: float = 0.0, credentials: tuple[str, str] | None = None,
                 html_md5: bool = True):
        self.posts = sorted(posts, key=lambda p: p.id, reverse=True)
        self.by_id = {p.id: p for p in posts}
        self.latency = latency
        self.credentials = credentials
        self.html_md5 = html_md5  # publish data-md5 on post pages (else only the file URL names it)
        self.faults: list[Fault] = []
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.files: dict[str, bytes] = {}
        for p in self.posts:
            if p.md5 and len(p.md5) == 32 and not p.restricted:
                self.files[self.file_path(p)] = p.data
                if p.sample is not None:
                    self.files[self.sample_path(p)] = p.sample

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> "FakeDanbooru":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for f in self.faults:
            f.release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeDanbooru":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- faults and the request log ------------------------------------------------------------------------

    def add_fault(self, kind: str, path: str, *, page: str | None = None, times: int = 1,
                  retry_after: str | None = None) -> Fault:
        """The next ``times`` requests for ``path`` (and ``page``) fail as ``kind``."""
        fault = Fault(kind, path, page, times, retry_after)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take_fault(self, path: str, params: dict) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(path, params):
                    f.times -= 1
                    f.hits += 1
                    return f
        return None

    def requests(self, prefix: str = "") -> list[Logged]:
        with self._lock:
            return [r for r in self.log if r.path.startswith(prefix)]

    def count(self, prefix: str = "") -> int:
        return len(self.requests(prefix))

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    def per_second(self, prefix: str = "") -> dict[int, int]:
        """Requests per whole second since the first logged one."""
        reqs = self.requests(prefix)
        if not reqs:
            return {}
        t0 = reqs[0].t
        return dict(sorted(Counter(int(r.t - t0) for r in reqs).items()))

    def max_in_window(self, window: float = 1.0, prefix: str = "") -> int:
        """The most requests that arrived within any ``window`` seconds (sliding)."""
        ts = sorted(r.t for r in self.requests(prefix))
        best, j = 0, 0
        for i, t in enumerate(ts):
            while ts[j] <= t - window:
                j += 1
            best = max(best, i - j + 1)
        return best

    # -- URLs ----------------------------------------------------------------------------------------------

    @staticmethod
    def file_path(p: FakePost) -> str:
        return f"/data/original/{p.md5[:2]}/{p.md5[2:4]}/{p.md5}.{p.file_ext}"

    @staticmethod
    def sample_path(p: FakePost) -> str:
        return f"/data/sample/{p.md5[:2]}/{p.md5[2:4]}/sample-{p.md5}.jpg"

    def file_url(self, p: FakePost) -> str:
        return p.file_url or self.base_url + self.file_path(p)

    def large_file_url(self, p: FakePost) -> str:
        if p.file_url:
            return p.file_url
        return self.base_url + (self.sample_path(p) if p.sample is not None else self.file_path(p))

    # -- search --------------------------------------------------------------------------------------------

    def search(self, tags: str, limit: int, page: str) -> tuple[list[FakePost], bool, int | None]:
        """(posts of the page, whether more follow, HTTP error status or None)."""
        posts = self.posts
        order = None
        for term in tags.split():
            if term.startswith("order:"):
                order = term[6:]
            elif term.startswith("rating:"):
                posts = [p for p in posts if p.rating == term[7:8]]
            elif term.startswith("-"):
                posts = [p for p in posts if term[1:] not in p.all_tags()]
            else:
                posts = [p for p in posts if term in p.all_tags()]
        if order == "score":
            posts = sorted(posts, key=lambda p: (-p.score, -p.id))
        if page.startswith("b") and page[1:].isdigit():
            below = [p for p in posts if p.id < int(page[1:])]
            return below[:limit], len(below) > limit, None
        if page.startswith("a") and page[1:].isdigit():
            above = sorted((p for p in posts if p.id > int(page[1:])), key=lambda p: p.id)[:limit]
            return sorted(above, key=lambda p: p.id, reverse=True), False, None
        number = int(page) if page.isdigit() else 1
        if number > 1000:
            return [], False, 410
        start = (max(1, number) - 1) * limit
        return posts[start:start + limit], len(posts) > start + limit, None

    # -- renderings ----------------------------------------------------------------------------------------

    def post_json(self, p: FakePost) -> dict:
        obj = {"id": p.id, "created_at": "2024-01-02T03:04:05.000-05:00", "uploader_id": 1, "score": p.score,
               "source": "", "md5": p.md5, "last_comment_bumped_at": None, "rating": p.rating,
               "image_width": p.width, "image_height": p.height, "tag_string": p.tag_string, "fav_count": 0,
               "file_ext": p.file_ext, "last_noted_at": None, "parent_id": None, "has_children": False,
               "approver_id": None, "tag_count_general": len(p.tags["general"]),
               "tag_count_artist": len(p.tags["artist"]), "tag_count_character": len(p.tags["character"]),
               "tag_count_copyright": len(p.tags["copyright"]), "file_size": len(p.data), "up_score": p.score,
               "down_score": 0, "is_pending": False, "is_flagged": False, "is_deleted": p.deleted,
               "tag_count": len(p.tag_string.split()), "updated_at": "2024-01-02T03:04:05.000-05:00",
               "is_banned": False, "pixiv_id": None, "last_commented_at": None, "has_active_children": False,
               "bit_flags": 0, "tag_count_meta": len(p.tags["meta"]),
               "has_large": p.sample is not None, "has_visible_children": False}
        for c in CATEGORIES:
            obj[f"tag_string_{c}"] = " ".join(p.tags[c])
        if p.restricted:
            obj.pop("md5")
        else:
            obj["file_url"] = self.file_url(p)
            obj["large_file_url"] = self.large_file_url(p)
            obj["preview_file_url"] = f"{self.base_url}/data/180x180/{p.md5[:2]}/{p.md5[2:4]}/{p.md5}.jpg"
        return obj

    def list_html(self, tags: str, posts: list[FakePost], more: bool, page: str) -> str:
        e = html.escape
        arts = []
        for p in posts:
            flags = "deleted" if p.deleted else ""
            arts.append(
                f'<article id="post_{p.id}" class="post-preview post-preview-fit-compact post-preview-180'
                f'{" post-status-deleted" if p.deleted else ""}" data-id="{p.id}" data-tags="{e(p.tag_string)}" '
                f'data-rating="{p.rating}" data-flags="{flags}" data-score="{p.score}" data-uploader-id="1">'
                f'<div class="post-preview-container"><a class="post-preview-link" draggable="false" '
                f'href="/posts/{p.id}?q={quote(tags)}"><picture><img class="post-preview-image" '
                f'src="/data/180x180/x.jpg" width="180" height="180" alt="post #{p.id}"></picture></a></div>'
                f'</article>')
        body = "\n".join(arts) if arts else "<p>No posts found.</p>"
        q = quote(tags)
        prev = f'<a class="paginator-prev" rel="prev" href="/posts?page=a{posts[0].id}&amp;tags={q}">&lt;</a>' \
            if posts and page != "1" else '<span class="paginator-prev">&lt;</span>'
        nxt = f'<a class="paginator-next" rel="next" href="/posts?page=b{posts[-1].id}&amp;tags={q}">&gt;</a>' \
            if more and posts else '<span class="paginator-next">&gt;</span>'
        side = "".join(f'<li class="tag-type-0" data-tag-name="{e(t)}"><a class="search-tag" '
                       f'href="/posts?tags={quote(t)}">{e(t.replace("_", " "))}</a></li>'
                       for t in GENERAL[:5])
        return _page(f"{e(tags)} | Danbooru", "c-posts a-index", f"""
<div class="posts"><aside id="sidebar">
  <section id="search-box"><h2>Search</h2><form action="/posts" method="get"><input id="tags" name="tags"
   value="{e(tags)}"></form></section>
  <section id="tag-box"><h2>Tags</h2><ul class="tag-list search-tag-list">{side}</ul></section>
</aside>
<section id="content">
  <div id="posts" class="user-disable-cropped-false"><div class="posts-container gap-2">
{body}
  </div></div>
  <div class="paginator numbered-paginator mt-8 mb-4 space-x-2 flex justify-center items-center">{prev}
   <span class="paginator-current font-bold">{e(page)}</span> {nxt}</div>
</section></div>""")

    def post_html(self, p: FakePost) -> str:
        e = html.escape
        groups = []
        for cat in SIDEBAR_ORDER:
            if not p.tags[cat]:
                continue
            items = "".join(
                f'<li class="tag-type-{TAG_TYPE[cat]}" data-tag-name="{e(t)}" data-is-deprecated="false">'
                f'<a class="wiki-link" href="/wiki_pages/{quote(t)}">?</a> <a class="search-tag" '
                f'href="/posts?tags={quote(t)}">{e(t.replace("_", " "))}</a> '
                f'<span class="post-count" title="12">12</span></li>' for t in p.tags[cat])
            groups.append(f'<h3 class="{cat}-tag-list">{cat.capitalize()}</h3>'
                          f'<ul class="{cat}-tag-list">{items}</ul>')
        attrs = {"data-id": p.id, "data-tags": p.tag_string, "data-rating": p.rating,
                 "data-large-width": p.width, "data-large-height": p.height, "data-width": p.width,
                 "data-height": p.height, "data-flags": "deleted" if p.deleted else "", "data-score": p.score,
                 "data-uploader-id": 1, "data-source": "", "data-normalized-source": ""}
        notices, media, size = [], "", "Size: hidden"
        if p.deleted:
            notices.append('<div class="notice notice-small post-notice post-notice-deleted">'
                           'This post was deleted for the following reason: duplicate</div>')
        if p.restricted:
            media = '<p>You need a gold account to see this image.</p>'
        else:
            attrs["data-file-url"] = self.file_url(p)
            attrs["data-file-ext"] = p.file_ext
            if self.html_md5 and p.id % 2 == 0:
                attrs["data-md5"] = p.md5
            large = self.large_file_url(p)
            if p.file_ext in ("mp4", "webm", "zip", "swf"):
                media = f'<video id="image" autoplay loop controls src="{e(large)}"></video>'
            else:
                media = (f'<picture><img width="{p.width}" height="{p.height}" id="image" class="fit-width" '
                         f'alt="{e(p.tag_string)}" src="{e(large)}"></picture>')
            size = f'Size: <a href="{e(self.file_url(p))}">{len(p.data) / 1024:.1f} KB .{e(p.file_ext)}</a> ' \
                   f'({p.width}x{p.height})'
        attr_text = " ".join(f'{k}="{e(str(v))}"' for k, v in attrs.items())
        return _page(f"{e(p.tag_string)} | Danbooru", "c-posts a-show", f"""
<div class="posts"><aside id="sidebar">
  <section id="search-box"><h2>Search</h2>
   <form action="/posts" method="get"><input id="tags" name="tags"></form></section>
  <section id="tag-list"><div class="tag-list categorized-tag-list">{"".join(groups)}</div></section>
  <section id="post-information"><h2>Information</h2><ul>
    <li id="post-info-id">ID: {p.id}</li>
    <li id="post-info-uploader">Uploader: <a class="user user-member" href="/users/1">someone</a></li>
    <li id="post-info-size">{size}</li>
    <li id="post-info-rating">Rating: {RATING_NAMES.get(p.rating, p.rating)}</li>
    <li id="post-info-score">Score: <span class="post-score">{p.score}</span></li>
    <li id="post-info-status">Status: {"Deleted" if p.deleted else "Active"}</li>
  </ul></section>
</aside>
<section id="content">
  {"".join(notices)}
  <section class="image-container note-container" {attr_text}>
    {media}
  </section>
  <section id="mark-as-translated-section"></section>
</section></div>""")


def _page(title: str, body_class: str, inner: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"></head>
<body class="{body_class}" data-current-user-name="Anonymous">
<header id="top"><a id="app-name-header" href="/">Danbooru</a>
<nav id="nav"><menu id="main-menu"><li><a href="/posts">Posts</a></li>
<li><a href="/wiki_pages">Wiki</a></li></menu></nav>
</header>
<div id="page">{inner}</div>
<footer id="page-footer">Running Danbooru (fake, for tests)</footer>
</body></html>
"""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients that hang up (a killed scraper, a refused download) are normal here, not errors."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeDanbooru

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        fake = self.fake
        parts = urlsplit(self.path)
        path = parts.path
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        user = self._user()
        with fake._lock:
            fake.log.append(Logged(time.monotonic(), path, params, user, self.headers.get("User-Agent", "")))
        if fake.latency:
            time.sleep(fake.latency)
        if user == "":
            return self._send(401, "application/json", b'{"success":false,"message":"wrong login or api key"}')
        status, ctype, body = self._route(path, params)
        fault = fake._take_fault(path, params) if status == 200 else None
        if fault is None:
            return self._send(status, ctype, body)
        if fault.kind in ("429", "503"):
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            msg = b'{"success":false,"message":"Too many requests"}' if fault.kind == "429" else \
                b"<html><body>503 Service Temporarily Unavailable</body></html>"
            return self._send(int(fault.kind), "application/json" if fault.kind == "429" else "text/html", msg,
                              headers)
        if fault.kind == "echo_auth":  # a misconfigured proxy's error page that repeats the request's header
            auth = self.headers.get("Authorization", "")
            msg = json.dumps({"success": False, "message": f"bad request, got Authorization: {auth} "
                                                           f"(url-encoded {quote(auth, safe='')})"})
            return self._send(400, "application/json", msg.encode())
        if fault.kind == "malformed":
            bad = b'[{"id": 1, "md5": "0f3' if ctype.startswith("application/json") else b"<html><body><h1>Oops"
            return self._send(200, ctype, bad)
        if fault.kind == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        # truncate / stall: the full Content-Length, part of the body, then the connection goes away
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: max(1, len(body) * 2 // 3)])
        self.wfile.flush()
        if fault.kind == "stall":
            fault.stalled.set()
            fault.release.wait(60)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return None

    def _user(self) -> str | None:
        """The logged-in name; "" for wrong credentials; None for anonymous."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        import base64

        try:
            login, _, key = base64.b64decode(auth.split(" ", 1)[1]).decode().partition(":")
        except Exception:  # noqa: BLE001
            return ""
        creds = self.fake.credentials
        return login if creds is not None and (login, key) == tuple(creds) else ""

    def _route(self, path: str, params: dict) -> tuple[int, str, bytes]:
        fake = self.fake
        try:
            limit = min(200, max(1, int(params.get("limit", "20"))))
        except ValueError:
            limit = 20
        if path in ("/posts.json", "/posts"):
            posts, more, err = fake.search(params.get("tags", ""), limit, params.get("page", "1"))
            if err:
                return err, "application/json", json.dumps(
                    {"success": False, "error": "PaginationExtension::PaginationError",
                     "message": "You cannot go beyond page 1000."}).encode()
            if path == "/posts.json":
                return 200, "application/json; charset=utf-8", json.dumps([fake.post_json(p) for p in posts]).encode()
            return 200, "text/html; charset=utf-8", fake.list_html(params.get("tags", ""), posts, more,
                                                                   params.get("page", "1")).encode()
        if path.startswith("/posts/") and path[7:].isdigit():
            p = fake.by_id.get(int(path[7:]))
            if p is None:
                return 404, "text/html", b"<html><body>Not found</body></html>"
            return 200, "text/html; charset=utf-8", fake.post_html(p).encode()
        if path in fake.files:
            ctype = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp",
                     "mp4": "video/mp4", "zip": "application/zip"}.get(path.rsplit(".", 1)[-1],
                                                                         "application/octet-stream")
            return 200, ctype, fake.files[path]
        return 404, "text/html", b"<html><body>Not found</body></html>"

    def _send(self, status: int, ctype: str, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
