"""The dataset directory: reading and appending ``posts.jsonl`` safely, and importing folders.

``posts.jsonl`` is the source of truth. Reading never crashes on a bad line: malformed lines, duplicate
ids and file paths that escape ``DATA/images`` are reported (with line numbers) and skipped. Appending
repairs a line torn by a crash, writes whole lines and fsyncs, so a SIGKILL never leaves half a post.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import AltI2VError, ImageLoadError, UnsafePathError, UsageError
from ..fsutil import (JsonlWriter, fsync_dir, image_relpath, is_md5, list_image_files, normalize_ext, printable,
                      safe_join)
from .layout import IMAGES_DIR, DataDir
from .tags import MAX_TAG_CHARS, parse_tags, tag_problem, unique_tags

RATINGS = {"g": "g", "general": "g", "s": "s", "sensitive": "s", "q": "q", "questionable": "q",
           "e": "e", "explicit": "e"}
IMPORT_MODES = ("auto", "folders", "captions")


@dataclass
class PostsRead:
    """What :func:`read_posts` found: the usable posts and everything it skipped, with line numbers."""

    posts: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # {"line": n, "reason": "...", "detail": "..."}
    duplicates: list[dict] = field(default_factory=list)  # {"line": n, "id": ...}
    lines: int = 0

    def summary(self) -> dict[str, Any]:
        return {"lines": self.lines, "posts": len(self.posts), "malformed": len(self.errors),
                "duplicate_ids": len(self.duplicates)}


def posts_path(data_dir: str | os.PathLike) -> Path:
    return DataDir(data_dir).posts


def posts_lock(data_dir: str | os.PathLike):
    """The lock every command that appends to posts.jsonl holds (--scrape, --import): one at a time."""
    from ..fsutil import lock_file

    return lock_file(DataDir(data_dir).posts_lock, f"{data_dir}: another --scrape or --import is writing into "
                                                  "this data directory; wait for it to finish or stop it first")


MAX_ID_CHARS = 256


def check_post_id(pid: Any) -> Any:
    """``pid`` if it is a valid post id, else ValueError: an integer in the signed 64-bit range (what the
    store's msgpack and every index can hold), or, for imported data, a non-empty string of at most
    ``MAX_ID_CHARS`` characters."""
    if isinstance(pid, int) and not isinstance(pid, bool):
        if not -2 ** 63 <= pid < 2 ** 63:
            raise ValueError(f"id {str(pid)[:40]} is outside the 64-bit integer range")
        return pid
    if isinstance(pid, str) and pid.strip():
        if len(pid) > MAX_ID_CHARS:
            raise ValueError(f"id string of {len(pid)} characters (at most {MAX_ID_CHARS})")
        return pid
    raise ValueError(f"missing or invalid id {str(pid)[:40]!r}")


def validate_post(obj: Any, data_dir: str | os.PathLike) -> dict:
    """Check and normalise one post; raises ValueError (reason text) or UnsafePathError.

    Unknown keys are kept. ``tags`` may be the contract's ``{category: [tags]}``, or a list/space-separated
    string (taken as general). ``file`` is derived from md5 + file_ext when absent; either way it must
    resolve inside ``DATA/images``.
    """
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    check_post_id(obj.get("id"))
    post = dict(obj)
    md5 = post.get("md5")
    if md5 is not None and not is_md5(md5):
        raise ValueError(f"md5 {md5!r} is not 32 lowercase hex characters")
    rel = post.get("file")
    if rel is None:
        if md5 is None or post.get("file_ext") is None:
            raise ValueError("no image: needs 'file' or 'md5' + 'file_ext'")
        rel = image_relpath(md5, post["file_ext"])
    safe_join(data_dir, rel, inside=IMAGES_DIR)  # raises UnsafePathError
    post["file"] = rel
    tags = post.get("tags", {})
    if isinstance(tags, dict):
        norm = {}
        for cat, lst in tags.items():
            got = unique_tags(lst)
            if got is None:
                raise ValueError(f"tags[{cat!r}] is not a list of strings")
            norm[str(cat)] = got
        post["tags"] = norm
    else:
        got = unique_tags(tags)
        if got is None:
            raise ValueError("tags must be an object of category lists, a list, or a string")
        post["tags"] = {"general": got}
    rating = post.get("rating")
    post["rating"] = RATINGS.get(rating.lower()) if isinstance(rating, str) else None
    return post


def iter_posts(data_dir: str | os.PathLike, result: PostsRead | None = None) -> Iterator[dict]:
    """Yield valid, first-seen posts in file order; problems are recorded in ``result`` if given."""
    result = result if result is not None else PostsRead()
    path = posts_path(data_dir)
    if not path.exists():
        return
    seen: set = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            result.lines = lineno
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                torn = not raw.endswith(b"\n")
                result.errors.append({"line": lineno, "reason": "torn last line" if torn else "malformed JSON",
                                      "detail": str(e)[:200]})
                continue
            except RecursionError:  # e.g. a line of a thousand '[': no post is nested that deep
                result.errors.append({"line": lineno, "reason": "malformed JSON",
                                      "detail": "nested too deeply to be a post"})
                continue
            try:
                post = validate_post(obj, data_dir)
            except UnsafePathError as e:
                result.errors.append({"line": lineno, "reason": "unsafe file path", "detail": str(e)[:300]})
                continue
            except ValueError as e:
                result.errors.append({"line": lineno, "reason": "invalid post", "detail": str(e)[:300]})
                continue
            key = id_key(post["id"])
            if key in seen:
                result.duplicates.append({"line": lineno, "id": post["id"]})
                continue
            seen.add(key)
            yield post


def read_posts(data_dir: str | os.PathLike) -> PostsRead:
    """Read all of ``DATA/posts.jsonl`` (see :func:`iter_posts`)."""
    result = PostsRead()
    result.posts = list(iter_posts(data_dir, result))
    return result


def id_key(pid: Any) -> str:
    """The canonical text of a post id (ints and strings never collide with each other's keys)."""
    return f"i{pid}" if isinstance(pid, int) else f"s{pid}"


def post_image_path(post: dict, data_dir: str | os.PathLike) -> Path:
    """Absolute path of a validated post's image (inside DATA/images, checked again)."""
    return DataDir(data_dir).image_path(post["file"])


class PostsWriter(JsonlWriter):
    """Appends whole lines to posts.jsonl; on open it finishes or cuts a last line a crash left."""

    def __init__(self, data_dir: str | os.PathLike, *, sync: bool = True):
        super().__init__(posts_path(data_dir), sync=sync)

    def append_many(self, posts: Iterable[dict]) -> None:
        posts = list(posts)
        for p in posts:  # a bad id is never written: it would stop every later stage
            check_post_id(p.get("id"))
        super().append_many(posts)


# ---------------------------------------------------------------------------------------------------------
# Import from folders


@dataclass
class ImportResult:
    added: int = 0
    already_present: int = 0
    merged_duplicates: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason", "detail"}
    mode: str = ""
    refused_tags: int = 0  # tags with control characters or too long (tag_problem), left out
    refused_examples: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        from ..progress import count_reasons

        reasons = count_reasons(self.skipped)
        return {"mode": self.mode, "added": self.added, "already present": self.already_present,
                "merged duplicates": self.merged_duplicates, "skipped": len(self.skipped),
                "skip reasons": reasons,
                "refused tags": (f"{self.refused_tags} (control characters or over {MAX_TAG_CHARS} characters, "
                                 f"e.g. {', '.join(self.refused_examples[:3])})" if self.refused_tags else 0)}


def _caption_for(img: Path) -> Path | None:
    for cand in (img.with_suffix(".txt"), img.with_name(img.name + ".txt")):
        if cand.is_file():
            return cand
    return None


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8 strictly, a BOM dropped; ValueError saying which byte is wrong."""
    from ..fsutil import open_regular

    with open_regular(path) as f:
        raw = f.read((1 << 20) + 1)
    if len(raw) > 1 << 20:
        raise ValueError(f"{path.name}: over 1 MiB, not a caption")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name}: byte {raw[e.start]:#04x} at offset {e.start} is not UTF-8 text") from None


def _detect_mode(images: list[Path], src: Path) -> str:
    if any(_caption_for(p) for p in images):
        return "captions"
    if any(p.parent != src for p in images):
        return "folders"
    raise UsageError(f"{src}: cannot tell the layout: no caption .txt files and no class sub-folders; "
                     "use --mode folders or --mode captions")


def import_folder(src: str | os.PathLike, data_dir: str | os.PathLike, mode: str = "auto", *,
                  workers: int = 4, quiet: bool = False) -> ImportResult:
    """Turn a folder into a dataset: class sub-folders become tags (``folders``), or images with
    same-named ``.txt`` captions of comma-separated tags (``captions``). Images are copied into
    ``DATA/images/<md5[:2]>/<md5>.<ext>``; posts already in the dataset (same md5) are not added again."""
    src, data_dir = Path(src), Path(data_dir)
    if mode not in IMPORT_MODES:
        raise UsageError(f"--mode must be one of {', '.join(IMPORT_MODES)}")
    if not src.is_dir():
        raise AltI2VError(f"{src}: not a folder")
    data_dir.mkdir(parents=True, exist_ok=True)
    if src.resolve() == data_dir.resolve() or data_dir.resolve() in src.resolve().parents:
        raise UsageError("the source folder must not be inside the data directory")
    with posts_lock(data_dir):  # two imports (or an import and a scrape) would add the same posts twice
        return _import_locked(src, data_dir, mode, workers, quiet)


def _import_locked(src: Path, data_dir: Path, mode: str, workers: int, quiet: bool) -> ImportResult:
    from .imaging import identify
    from ..progress import bar

    images = list_image_files(src)[0]
    result = ImportResult(mode=_detect_mode(images, src) if mode == "auto" and images else mode)
    if mode == "auto" and not images:
        result.mode = "folders"

    existing: set = set()
    for p in iter_posts(data_dir):
        existing.update(x for x in (p.get("md5"), p["id"]) if isinstance(x, str))

    def tags_of(path: Path, refused: list[str]) -> list[str] | None:
        if result.mode == "folders":
            rel = path.relative_to(src)
            return unique_tags([rel.parts[0]], refused) if len(rel.parts) > 1 else None
        cap = _caption_for(path)
        return parse_tags(read_caption(cap), refused) if cap else None

    def examine(path: Path) -> tuple[Path, dict | None, dict | None, list[str]]:
        rel = str(path.relative_to(src))
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # skipped before its image is copied: no orphan in DATA/images
            return path, None, {"path": printable(rel), "reason": "name not UTF-8",
                                "detail": "rename it (file or class folder) to UTF-8 and import again"}, []
        refused: list[str] = []
        try:
            tags = tags_of(path, refused)
        except (ValueError, OSError, AltI2VError) as e:
            return path, None, {"path": rel, "reason": "bad caption", "detail": str(e)}, []
        if tags is None:
            reason = "not in a class folder" if result.mode == "folders" else "no caption file"
            return path, None, {"path": rel, "reason": reason, "detail": ""}, []
        if not tags and refused:
            return path, None, {"path": rel, "reason": "no valid tag",
                                "detail": f"{len(refused)} refused: {tag_problem(refused[0])}"}, refused
        try:
            data = path.read_bytes()
            ext, w, h = identify(data)
        except ImageLoadError as e:
            return path, None, {"path": rel, "reason": e.reason, "detail": str(e)}, refused
        except OSError as e:
            return path, None, {"path": rel, "reason": "unreadable", "detail": str(e)}, refused
        md5, rel_file = DataDir(data_dir).save_image(data, ext)  # an identical file already there is kept
        post = {"id": md5, "md5": md5, "file_ext": ext, "file": rel_file,
                "tags": {"general": tags}, "width": w, "height": h, "source": "import", "original_path": rel}
        return path, post, None, refused

    new_posts: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for path, post, skip, refused in bar(ex.map(examine, images), total=len(images), desc="import", unit="img",
                                             quiet=quiet):
            result.refused_tags += len(refused)
            result.refused_examples.extend(printable(t[:80]).encode("unicode_escape").decode("ascii")
                                           for t in refused[:max(0, 5 - len(result.refused_examples))])
            if skip:
                result.skipped.append(skip)
            elif post["md5"] in existing:
                result.already_present += 1
            elif post["md5"] in new_posts:
                old = new_posts[post["md5"]]["tags"]["general"]
                old.extend(t for t in post["tags"]["general"] if t not in old)
                result.merged_duplicates += 1
            else:
                new_posts[post["md5"]] = post
    fsync_dir(data_dir)
    with PostsWriter(data_dir) as w:
        w.append_many(new_posts.values())
    result.added = len(new_posts)
    DataDir(data_dir).write_report("import_report", {
        "source": str(src), **result.summary(), "skipped_files": result.skipped,
        "unfinished_last_line_removed": w.removed_tail.decode("utf-8", "replace")})
    return result


__all__ = ["PostsRead", "PostsWriter", "ImportResult", "read_posts", "iter_posts", "validate_post",
           "post_image_path", "import_folder", "read_caption", "id_key", "posts_path",
           "check_post_id", "normalize_ext"]
