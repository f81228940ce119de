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


def split_tags(values: Iterable[str] | str | None) -> list[str]:
    """The parts of comma- (or newline-) separated text, or of a repeated option's values, trimmed and
    as written."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [p.strip() for v in values for p in re.split(r"[,\n]", v) if p.strip()]


def parse_tags(values: Iterable[str] | str | None) -> list[str]:
    """:func:`split_tags`, normalised (:func:`normalize_tag`), first occurrence kept."""
    return unique_tags(split_tags(values)) or []


def unique_tags(value: Any) -> list[str] | None:
    """A list of tag names (or one space-separated string, as Danbooru writes them) normalised, first
    occurrence kept; None when ``value`` is neither."""
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        return None
    out: dict[str, None] = {}
    for t in value:
        t = normalize_tag(t)
        if t:
            out.setdefault(t)
    return list(out)


__all__ = ["normalize_tag", "split_tags", "parse_tags", "unique_tags", "CATEGORIES", "CATEGORY_ORDER",
           "ALL_CATEGORIES", "DEFAULT_CATEGORIES"]
