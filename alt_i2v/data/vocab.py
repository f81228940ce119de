"""The tag vocabulary: the top-N tags of a dataset, whose order defines the model's output units."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import DEFAULT_CATEGORIES, VocabConfig
from ..errors import AltI2VError
from ..fsutil import atomic_write_json
from .layout import VOCAB_FILE

VOCAB_VERSION = 1


@dataclass
class Vocab:
    """Ordered tags (count descending, then name); a tag's index is its output unit."""

    tags: list[dict] = field(default_factory=list)  # {"name", "category", "count"}
    categories: list[str] = field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    min_count: int = 1
    built_from: int = 0
    version: int = VOCAB_VERSION

    def __len__(self) -> int:
        return len(self.tags)

    @cached_property
    def names(self) -> list[str]:
        return [t["name"] for t in self.tags]

    @cached_property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @cached_property
    def tag_categories(self) -> list[str]:
        return [t.get("category", "general") for t in self.tags]

    @cached_property
    def sha256(self) -> str:
        """Fingerprint of what the label indices mean (ordered names), recorded by stores and models.
        Counts are left out on purpose: re-counting the same tags in the same order changes nothing."""
        return hashlib.sha256(json.dumps(self.names, ensure_ascii=False).encode()).hexdigest()

    def labels(self, post: dict) -> list[int]:
        """Sorted output indices of a post's tags that are in the vocabulary."""
        idx = self.index
        out = set()
        tags = post.get("tags") or {}
        for cat in self.categories:
            if cat == "rating":
                r = post.get("rating")
                if r and f"rating:{r}" in idx:
                    out.add(idx[f"rating:{r}"])
                continue
            for t in tags.get(cat, ()):
                if t in idx:
                    out.add(idx[t])
        return sorted(out)

    def get_config(self) -> dict[str, Any]:
        return {"version": self.version, "tags": self.tags, "categories": list(self.categories),
                "min_count": self.min_count, "built_from": self.built_from}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Vocab":
        if not isinstance(cfg, dict) or not isinstance(cfg.get("tags"), list):
            raise AltI2VError("vocab.json is not a vocabulary (no 'tags' list)")
        if cfg.get("version", 1) > VOCAB_VERSION:
            raise AltI2VError(f"vocab.json version {cfg['version']} is newer than this alt-i2v understands")
        tags = []
        for t in cfg["tags"]:
            if isinstance(t, str):
                t = {"name": t, "category": "general", "count": 0}
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise AltI2VError(f"vocab.json has an invalid tag entry: {t!r}")
            tags.append(t)
        return cls(tags=tags, categories=list(cfg.get("categories", DEFAULT_CATEGORIES)),
                   min_count=int(cfg.get("min_count", 1)), built_from=int(cfg.get("built_from", 0)),
                   version=int(cfg.get("version", VOCAB_VERSION)))

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.get_config())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        """Load ``vocab.json`` (a data or model directory may be given instead of the file)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.exists():
            raise AltI2VError(f"{path}: no vocabulary; run `python -m alt_i2v --vocab --data DIR` first")
        from ..fsutil import NotRegularFile, open_regular

        try:
            with open_regular(path) as f:
                raw = f.read()
        except NotRegularFile as e:
            raise AltI2VError(str(e)) from None
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise AltI2VError(f"{path}: not a vocabulary: byte {raw[e.start]:#04x} at offset {e.start} is not "
                              "UTF-8 text (a binary or damaged file?)") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise AltI2VError(f"{path}: not valid JSON ({e if isinstance(e, ValueError) else 'nested too deeply'})") \
                from None
        try:
            return cls.from_config(doc)
        except AltI2VError as e:
            raise AltI2VError(f"{path}: {e}") from None


def count_tags(posts: Iterable[dict], categories: Sequence[str]) -> tuple[Counter, dict[str, str], int]:
    """Count each tag once per post over ``categories``; returns (counts, name->category, posts seen)."""
    counts: Counter = Counter()
    category: dict[str, str] = {}
    n = 0
    for post in posts:
        n += 1
        seen = set()
        tags = post.get("tags") or {}
        for cat in categories:
            if cat == "rating":
                names = [f"rating:{post['rating']}"] if post.get("rating") else []
            else:
                names = tags.get(cat, ())
            for t in names:
                if t not in seen:
                    seen.add(t)
                    category.setdefault(t, cat)
        counts.update(seen)
    return counts, category, n


def build_vocab(data_dir: str | os.PathLike, size: int = 4096, min_count: int = 1,
                categories: Sequence[str] = DEFAULT_CATEGORIES, *, write: bool = True) -> Vocab:
    """Top ``size`` tags of ``DATA/posts.jsonl`` with at least ``min_count`` posts, from ``categories``;
    deterministic (count descending, then name). Writes ``DATA/vocab.json`` unless ``write=False``."""
    from .posts import iter_posts, posts_path

    cfg = VocabConfig(size=size, min_count=min_count, categories=tuple(categories))
    if not posts_path(data_dir).exists():
        raise AltI2VError(f"{posts_path(data_dir)}: no posts; run --scrape or --import first")
    counts, category, n = count_tags(iter_posts(data_dir), cfg.categories)
    ranked = sorted(((c, t) for t, c in counts.items() if c >= cfg.min_count), key=lambda x: (-x[0], x[1]))
    tags = [{"name": t, "category": category[t], "count": c} for c, t in ranked[:cfg.size]]
    vocab = Vocab(tags=tags, categories=list(cfg.categories), min_count=cfg.min_count, built_from=n)
    if write:
        vocab.save(Path(data_dir) / VOCAB_FILE)
    return vocab


__all__ = ["Vocab", "build_vocab", "count_tags", "VOCAB_FILE"]
