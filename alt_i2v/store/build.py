"""Building a store (``--build``, the builder half; the reader half is :mod:`.reader`): every post's image,
resumable, under the store lock; ``--rebuild`` builds beside the old store and swaps it in. One LevelDB
is written by :mod:`.writer`, N shards by N processes (:mod:`.build_shards`).

Every WriteBatch carries records, their index entries and the updated meta counts together, so a build
killed at any moment leaves a consistent store, and the next run only does what is missing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BuildConfig, ImageConfig, resolve_workers
from ..data.layout import STORE_DIR, DataDir
from ..data.vocab import VOCAB_FILE, Vocab
from ..errors import AltI2VError, StoreMismatchError
from .build_shards import build_sharded
from .layout import check_shard_count, store_lock, stored_shard_count
from .records import STORE_VERSION, split_of
from .writer import build_shard


@dataclass
class BuildResult:
    path: Path
    stored: int = 0
    already: int = 0
    removed: int = 0
    moved: int = 0  # stored records whose split changed (a --dedupe group joined them to another post's)
    skipped: list[dict] = field(default_factory=list)  # {"id", "file", "reason", "detail"}
    posts_errors: list[dict] = field(default_factory=list)
    duplicates: int = 0
    no_labels: int = 0
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        from ..progress import count_reasons

        reasons = count_reasons(self.skipped)
        rate = self.stored / self.seconds if self.seconds > 0 else 0.0
        return {"store": str(self.path), "stored now": self.stored, "already stored": self.already,
                "removed (no longer in posts)": self.removed,
                "moved to their near-copies' split": self.moved, "skipped images": len(self.skipped),
                "skip reasons": reasons, "bad posts.jsonl lines": len(self.posts_errors),
                "duplicate ids": self.duplicates, "posts with no vocab tag": self.no_labels,
                "records per split": self.counts, "images/s": round(rate, 1),
                "seconds": round(self.seconds, 1)}


def build_store(data_dir: str | os.PathLike, image_size: int = 150, resize: str = "pad", *,
                workers: int = 0, max_pixels: int = ImageConfig.max_pixels, batch_size: int = 64,
                val_fraction: float = 0.1, test_fraction: float = 0.1, rebuild: bool = False,
                prune: bool = False, quiet: bool = False, shards: int | None = None) -> BuildResult:
    """Decode, resize and store every post's image of ``DATA`` into ``DATA/store`` (resumable).

    Posts already stored are skipped; records whose post left posts.jsonl are removed (more than
    ``PRUNE_SHARE`` of the store only with ``prune=True``); every skipped post is listed with its reason in
    ``DATA/reports/build_report.json``. ``rebuild`` builds a new store beside the old one and swaps it in
    with a rename once it is complete; the old one serves until then. ``shards`` > 1 writes that many
    LevelDB shards, each by its own process (:mod:`alt_i2v.store.build_shards`); None keeps an existing store's count
    (1, the single LevelDB, for a new one); a different count needs ``rebuild``.
    """
    cfg = BuildConfig(image_size=image_size, resize=resize, max_pixels=max_pixels, workers=workers,
                      batch_size=batch_size, val_fraction=val_fraction, test_fraction=test_fraction)
    data_dir = Path(data_dir)
    vocab = Vocab.load(data_dir / VOCAB_FILE)
    if len(vocab) == 0:
        raise AltI2VError(f"{data_dir / VOCAB_FILE} is empty: no tag reached --min-count")
    path = data_dir / STORE_DIR
    with store_lock(path, shared=False):
        _finish_swap(path)
        if rebuild:
            fresh = path.with_name(f".{path.name}.rebuild")
            nshards = int(shards or stored_shard_count(path) or 1)
            if stored_shard_count(fresh) not in (None, nshards):
                _rmtree(fresh)
            try:  # a rebuild that was interrupted resumes where it stopped
                result = _build(data_dir, fresh, cfg, vocab, prune=True, quiet=quiet, shards=nshards)
            except StoreMismatchError:  # ... unless it was started with other settings
                _rmtree(fresh)
                result = _build(data_dir, fresh, cfg, vocab, prune=True, quiet=quiet, shards=nshards)
            _swap_in(fresh, path)
            result.path = path
        else:
            nshards = check_shard_count(path, shards)
            result = _build(data_dir, path, cfg, vocab, prune=prune, quiet=quiet, shards=nshards)
    DataDir(data_dir).write_report("build_report", {
        **result.summary(), "shards": nshards, "config": cfg.get_config(), "skipped_posts": result.skipped,
        "posts_jsonl_errors": result.posts_errors})
    return result


def _rmtree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _swap_in(fresh: Path, path: Path) -> None:
    """Replace ``path`` by the complete store ``fresh``: two renames, and the old one removed last (a kill
    at any point leaves either store whole; :func:`_finish_swap` completes the step on the next build)."""
    from ..fsutil import fsync_dir

    old = path.with_name(f".{path.name}.old")
    _rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(fresh, path)
    fsync_dir(path.parent)
    _rmtree(old)


def _finish_swap(path: Path) -> None:
    """Complete a swap that a kill interrupted: the renamed-away old store goes once the new one is in."""
    old, fresh = path.with_name(f".{path.name}.old"), path.with_name(f".{path.name}.rebuild")
    if old.exists():
        if not path.exists():
            os.replace(fresh if fresh.exists() else old, path)
        _rmtree(old)


def _build(data_dir: Path, path: Path, cfg: BuildConfig, vocab: Vocab, *, prune: bool, quiet: bool,
           shards: int = 1) -> BuildResult:
    """The build itself, into ``path`` (one LevelDB, or ``shards`` of them), under the caller's store lock."""
    from ..data.posts import PostsRead, id_key, iter_posts, post_image_path, posts_path
    from ..data.groups import group_leaders
    from ..progress import bar

    posts_file = posts_path(data_dir)
    if not posts_file.is_file() or posts_file.stat().st_size == 0:
        raise AltI2VError(f"{posts_file}: no posts; run --scrape or --import first (the store is left as it is)")
    t0 = time.perf_counter()
    want = {"version": STORE_VERSION, "image_size": cfg.image_size, "resize": cfg.resize,
            "vocab_sha256": vocab.sha256, "num_tags": len(vocab),
            "split": {"val": cfg.val_fraction, "test": cfg.test_fraction}}
    result = BuildResult(path=path)
    read = PostsRead()
    leaders = group_leaders(data_dir)  # --dedupe's groups: each takes the split of its first post
    entries = []  # (key, id, file, labels, split) of every post
    for post in iter_posts(data_dir, read):
        labels = vocab.labels(post)
        if not labels:
            result.no_labels += 1
        entries.append((id_key(post["id"]).encode(), post["id"], str(post_image_path(post, data_dir)), labels,
                        split_of(leaders.get(post["id"], post["id"]), cfg.val_fraction, cfg.test_fraction)))
    result.posts_errors, result.duplicates = read.errors, len(read.duplicates)
    if not entries:
        raise AltI2VError(f"{posts_file}: not one usable post in {read.lines} lines (see the bad lines in "
                          "the build report); the store is left as it is")
    with bar(total=len(entries), desc="build", unit="img", quiet=quiet) as progress:
        if shards == 1:
            stats = build_shard(path, want, entries, cfg, data_dir, processes=resolve_workers(cfg.workers),
                                prune=prune, progress=progress.update)
        else:
            stats = build_sharded(path, want, entries, cfg, data_dir, shards, prune=prune, progress=progress.update)
    result.stored, result.already, result.removed = stats["stored"], stats["already"], stats["removed"]
    result.moved = stats.get("moved", 0)
    result.skipped, result.counts = stats["skipped"], stats["counts"]
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["build_store", "BuildResult"]
