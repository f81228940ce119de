"""Tags: Danbooru-style names, the one parser of tag lists and the categories.

A tag list on the command line or in a caption file is comma-separated (newlines also separate) and an
option may be repeated: :func:`split_tags` gives its parts as written, :func:`parse_tags` the normalised
names. Post categories are Danbooru's; ``rating`` is the extra category a vocabulary may learn as tags.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from ..config import ALL_CATEGORIES, DEFAULT_CATEGORIES, TAG_CATEGORIES

CATEGORIES = TAG_CATEGORIES  # the lists of a post's "tags" object
# Captions name who and what it is from first: character, copyright, artist, then general, meta, rating.
CATEGORY_ORDER = tuple(sorted(ALL_CATEGORIES, key=lambda c: c not in ("character", "copyright", "artist")))


def normalize_tag(tag: str) -> str:
    """Danbooru style: lowercase, spaces to underscores, caption escapes ``\\(`` removed."""
    tag = tag.strip().replace("\\(", "(").replace("\\)", ")")
    return re.sub(r"\s+", "_", tag).lower()


MAX_TAG_CHARS = 200  # Danbooru's longest tags are under 100 characters


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` (normalised) cannot be a tag, or None: control or format characters (NUL, a BOM, bytes
    read as text) or more than MAX_TAG_CHARS characters."""
    import unicodedata

    if len(tag) > MAX_TAG_CHARS:
        return f"longer than {MAX_TAG_CHARS} characters"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in tag):
        return "control characters"
    return None


def split_tags(values: Iterable[str] | str | None) -> list[str]:
    """The parts of comma- (or newline-) separated text, or of a repeated option's values, trimmed and
    as written."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [p.strip() for v in values for p in re.split(r"[,\n]", v.removeprefix("\ufeff")) if p.strip()]


def parse_tags(values: Iterable[str] | str | None, refused: list[str] | None = None) -> list[str]:
    """:func:`split_tags`, normalised (:func:`normalize_tag`), first occurrence kept; a leading BOM is
    dropped, tags :func:`tag_problem` refuses are left out (into ``refused``)."""
    return unique_tags(split_tags(values), refused) or []


def unique_tags(value: Any, refused: list[str] | None = None) -> list[str] | None:
    """A list of tag names (or one space-separated string, as Danbooru writes them) normalised, first
    occurrence kept, those :func:`tag_problem` refuses left out (and appended to ``refused`` when given);
    None when ``value`` is neither."""
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        return None
    out: dict[str, None] = {}
    for t in value:
        t = normalize_tag(t)
        if t and tag_problem(t):
            if refused is not None:
                refused.append(t)
            continue
        if t:
            out.setdefault(t)
    return list(out)


__all__ = ["normalize_tag", "split_tags", "parse_tags", "unique_tags", "tag_problem", "MAX_TAG_CHARS", "CATEGORIES", "CATEGORY_ORDER",
           "ALL_CATEGORIES", "DEFAULT_CATEGORIES"]
