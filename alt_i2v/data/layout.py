"""The dataset directory, each file named once: ``DataDir``.

``DATA/``: ``posts.jsonl`` (one post a line), ``images/<md5[:2]>/<md5>.<ext>``, ``vocab.json``, ``store/``
(LevelDB), ``reports/``, ``.scrape.lock``. docs/formats.md writes each one out. The model directory is
:mod:`alt_i2v.model.modeldir`.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Mapping

from ..config import ImageConfig
from ..fsutil import atomic_write_bytes, atomic_write_json, image_relpath, safe_join

# DATA
POSTS_FILE = "posts.jsonl"
POSTS_LOCK = ".scrape.lock"  # held by every writer of posts.jsonl (--scrape, --import)
IMAGES_DIR = "images"
VOCAB_FILE = "vocab.json"
STORE_DIR = "store"
REPORTS_DIR = "reports"


class DataDir:
    """A dataset directory: where each of its files lives, and the one way to add an image file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    @property
    def posts(self) -> Path:
        return self.root / POSTS_FILE

    @property
    def posts_lock(self) -> Path:
        return self.root / POSTS_LOCK

    @property
    def images(self) -> Path:
        return self.root / IMAGES_DIR

    @property
    def vocab(self) -> Path:
        return self.root / VOCAB_FILE

    @property
    def store(self) -> Path:
        return self.root / STORE_DIR

    @property
    def reports(self) -> Path:
        return self.root / REPORTS_DIR

    def report(self, name: str) -> Path:
        return self.reports / f"{name}.json"

    def write_report(self, name: str, report: Mapping[str, Any]) -> Path:
        """Atomically write ``DATA/reports/<name>.json`` (stamped with the time) and return its path."""
        return atomic_write_json(self.report(name), {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report})

    def image_path(self, rel: str) -> Path:
        """The file a post's ``file`` names, refused (UnsafePathError) unless it lies inside ``images/``."""
        return safe_join(self.root, rel, inside=IMAGES_DIR)

    def save_image(self, data: bytes, ext: str) -> tuple[str, str]:
        """Store image bytes under their md5 (``images/<md5[:2]>/<md5>.<ext>``, written atomically; an
        identical file already there is kept). Returns ``(md5, path relative to DATA)``."""
        md5 = hashlib.md5(data).hexdigest()
        rel = image_relpath(md5, ext)
        path = self.root / rel
        if not (path.is_file() and path.stat().st_size == len(data)):
            atomic_write_bytes(path, data)
        return md5, rel


def store_matches(image: ImageConfig, store: Any) -> bool:
    """Whether a store's pixels are what a model trained with ``image`` expects (same size and resize)."""
    return store.image_size == image.image_size and store.resize == image.resize


__all__ = ["DataDir", "store_matches", "POSTS_FILE", "POSTS_LOCK", "IMAGES_DIR", "VOCAB_FILE", "STORE_DIR",
           "REPORTS_DIR"]
