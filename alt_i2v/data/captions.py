"""Caption files beside images, in the format caption users (training tools, booru taggers) expect.

A caption is one line of comma-separated tags: ``hatsune miku, vocaloid, 1girl, long hair``. Tags are
ordered by category (character, copyright, artist, general, meta, rating) and by probability inside a
category; underscores become spaces unless ``style="underscores"`` (kaomoji such as ``^_^`` are kept);
parentheses are escaped (``\\(``) because prompt syntax gives them a meaning, unless ``escape=False``.
``<image>.txt`` (the image's name with its extension replaced) is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..errors import UsageError
from ..fsutil import atomic_write_text
from .tags import CATEGORY_ORDER, normalize_tag, split_tags

CAPTION_MODES = ("append", "skip", "overwrite")
TAG_STYLES = ("spaces", "underscores")
DEFAULT_CAPTION_MODE = "skip"
DEFAULT_TAG_STYLE = "spaces"
# Danbooru tags whose underscores are part of the face, not word separators.
KAOMOJI = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||", "-_-", "t_t", "*_*", ";_;", "^_^;", "o_0", "0_o",
})


def caption_path(image: str | os.PathLike) -> Path:
    """Where an image's caption goes: ``dir/name.png`` -> ``dir/name.txt``."""
    return Path(image).with_suffix(".txt")


def format_tag(name: str, style: str = DEFAULT_TAG_STYLE, escape: bool = True) -> str:
    """A Danbooru tag name as it appears in a caption."""
    if style not in TAG_STYLES:
        raise UsageError(f"tag style must be one of {', '.join(TAG_STYLES)}, got {style!r}")
    text = name
    if style == "spaces" and name not in KAOMOJI and len(name) > 3:
        text = name.replace("_", " ")
    if escape:
        text = text.replace("(", "\\(").replace(")", "\\)")
    return text


def check_max_tags(max_tags: int | None) -> int | None:
    """``max_tags`` (None: no limit), or a UsageError when it is negative."""
    if max_tags is not None and max_tags < 0:
        raise UsageError("--max-tags must be >= 0")
    return max_tags


def select_tags(tags: Mapping[str, float], categories: Mapping[str, str], *, exclude: Iterable[str] = (),
                max_tags: int | None = None) -> list[str]:
    """Tag names for a caption: excluded ones dropped, the ``max_tags`` most probable kept, then ordered by
    category (:data:`CATEGORY_ORDER`, unknown categories last) and probability."""
    excluded = {normalize_tag(t) for t in exclude}
    names = [t for t in sorted(tags, key=lambda t: -tags[t]) if normalize_tag(t) not in excluded]
    if check_max_tags(max_tags) is not None:
        names = names[:max_tags]
    rank = {c: i for i, c in enumerate(CATEGORY_ORDER)}
    return sorted(names, key=lambda t: (rank.get(categories.get(t, "general"), len(rank)), -tags[t]))


def format_caption(tags: Mapping[str, float], categories: Mapping[str, str], *, style: str = DEFAULT_TAG_STYLE,
                   escape: bool = True, exclude: Iterable[str] = (), max_tags: int | None = None) -> str:
    """``{tag: probability}`` to one caption line."""
    names = select_tags(tags, categories, exclude=exclude, max_tags=max_tags)
    return ", ".join(format_tag(t, style, escape) for t in names)


def merge_caption(existing: str, new: Sequence[str]) -> str:
    """Existing caption tags kept in their order and spelling, then the new ones it lacks (compared in
    normalised form, so ``long hair`` and ``long_hair`` are the same tag)."""
    old = split_tags(existing)
    have = {normalize_tag(t) for t in old}
    added = []
    for t in new:
        key = normalize_tag(t)
        if key not in have:
            have.add(key)
            added.append(t)
    return ", ".join(old + added)


def write_caption(image: str | os.PathLike, tags: Sequence[str], mode: str = DEFAULT_CAPTION_MODE) -> str:
    """Write the formatted ``tags`` to the image's caption file; returns what happened: ``written`` (new
    file), ``overwritten``, ``appended``, ``unchanged`` (append found nothing new) or ``skipped``."""
    if mode not in CAPTION_MODES:
        raise UsageError(f"caption mode must be one of {', '.join(CAPTION_MODES)}, got {mode!r}")
    path = caption_path(image)
    text = ", ".join(tags)
    if not path.exists():
        atomic_write_text(path, text + "\n")
        return "written"
    if mode == "skip":
        return "skipped"
    if mode == "overwrite":
        atomic_write_text(path, text + "\n")
        return "overwritten"
    existing = path.read_text(encoding="utf-8", errors="replace")
    merged = merge_caption(existing, tags)
    if merged == ", ".join(split_tags(existing)):
        return "unchanged"
    atomic_write_text(path, merged + "\n")
    return "appended"


def caption_conflicts(images: Sequence[str | os.PathLike]) -> dict[str, list[str]]:
    """Images that would share one caption file (``a.jpg`` and ``a.png`` both -> ``a.txt``)."""
    groups: dict[str, list[str]] = {}
    for img in dict.fromkeys(os.fspath(i) for i in images):
        groups.setdefault(os.path.normcase(os.path.abspath(caption_path(img))), []).append(img)
    return {k: v for k, v in groups.items() if len(v) > 1}


__all__ = ["caption_path", "format_tag", "format_caption", "select_tags", "check_max_tags", "merge_caption",
           "write_caption", "caption_conflicts", "CATEGORY_ORDER", "CAPTION_MODES",
           "TAG_STYLES", "KAOMOJI"]
