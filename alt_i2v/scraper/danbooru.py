"""Danbooru's answers as posts: the JSON API and the HTML pages parsed into one :class:`PostInfo`, the
``posts.jsonl`` line made from it, and the paging of a query (the ``b<id>`` cursor, numbered pages for
``order:`` searches); both sources give identical lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urljoin, urlsplit

from ..data.posts import RATINGS, check_post_id
from ..data.tags import CATEGORIES, normalize_tag
from ..fsutil import image_relpath
from .http import DanbooruClient, PageFormatError, _int

PAGE_SIZE = 200                    # Danbooru's largest page
MAX_NUMBERED_PAGE = 1000           # Danbooru refuses numbered pages beyond this; the b<id> cursor has no limit
TAG_TYPES = {"0": "general", "1": "artist", "3": "copyright", "4": "character", "5": "meta"}
_MD5_NAME = re.compile(r"([0-9a-f]{32})\.([A-Za-z0-9]+)$")


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
    parent_id: int | None = None  # Danbooru's parent post: the same picture as a variant or an edit


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
        deleted=bool(obj.get("is_deleted")), file_size=_int(obj.get("file_size")),
        parent_id=_int(obj.get("parent_id")))


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
        file_size=_int(attr("data-file-size")), parent_id=_int(attr("data-parent-id")))


def post_record(info: PostInfo, base_url: str, *, md5: str, ext: str, original_md5: str | None = None) -> dict:
    """The ``posts.jsonl`` line (docs/formats.md, "posts.jsonl") for a post whose file is ``<md5>.<ext>``."""
    post = {"id": info.id, "md5": md5, "file_ext": ext, "file": image_relpath(md5, ext),
            "tags": {c: list(info.tags.get(c, [])) for c in CATEGORIES}, "rating": info.rating,
            "score": info.score, "width": info.width, "height": info.height, "source": "danbooru",
            "url": f"{base_url}/posts/{info.id}"}
    if info.parent_id is not None:
        post["parent_id"] = info.parent_id
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


def pages(client: DanbooruClient, query: str, source: str, page_size: int,
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
