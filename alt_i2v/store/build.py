"""Building a store (``--build``): decode, resize and write every post's image, resumable, under the
store lock; ``--rebuild`` builds beside the old store and swaps it in; N shards are written by N processes
(:mod:`alt_i2v.store.shards`).

Every WriteBatch carries records, their index entries and the updated meta counts together, so a build
killed at any moment leaves a consistent store, and the next run only does what is missing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..config import BuildConfig, ImageConfig, resolve_workers
from ..data.layout import STORE_DIR
from ..errors import AltI2VError, ImageLoadError, StoreMismatchError
from ..data.vocab import VOCAB_FILE, Vocab
from .reader import _open_db, store_lock
from .records import IDX, META_KEY, REC, SPLITS, STORE_VERSION, check_meta, encode_record, pack, split_of, unpack

PRUNE_SHARE = 0.2  # a build that would remove more than this share of the store stops unless prune=True


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


def _work(task: tuple) -> tuple:
    """Worker: decode one image and return the encoded record, or the error (runs in a pool process)."""
    key, pid, path, labels, split, cfg = task
    try:
        img = _load(path, cfg)
    except ImageLoadError as e:
        return key, None, e.reason, str(e)
    except Exception as e:  # a decoder bug must cost one image, not the build
        return key, None, "error", f"{type(e).__name__}: {e}"
    return key, encode_record(pid, img, labels, split), None, None


def _load(path: str, cfg: tuple) -> np.ndarray:
    from ..data.imaging import load_image

    size, resize, max_pixels = cfg
    return load_image(path, size, resize, max_pixels=max_pixels)


def build_store(data_dir: str | os.PathLike, image_size: int = 150, resize: str = "pad", *,
                workers: int = 0, max_pixels: int = ImageConfig.max_pixels, batch_size: int = 64,
                val_fraction: float = 0.1, test_fraction: float = 0.1, rebuild: bool = False,
                prune: bool = False, quiet: bool = False, shards: int | None = None) -> BuildResult:
    """Decode, resize and store every post's image of ``DATA`` into ``DATA/store`` (resumable).

    Posts already stored are skipped; records whose post left posts.jsonl are removed (more than
    ``PRUNE_SHARE`` of the store only with ``prune=True``); every skipped post is listed with its reason in
    ``DATA/reports/build_report.json``. ``rebuild`` builds a new store beside the old one and swaps it in
    with a rename once it is complete; the old one serves until then. ``shards`` > 1 writes that many
    LevelDB shards, each by its own process (:mod:`alt_i2v.store.shards`); None keeps an existing store's count
    (1, the single LevelDB, for a new one); a different count needs ``rebuild``.
    """
    from .shards import check_shard_count, stored_shard_count

    from ..progress import write_report

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
    write_report(data_dir, "build_report", {
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
    from ..progress import bar
    from ..search.dedupe import group_leaders
    from .shards import build_sharded

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


def build_shard(path: Path, want: dict, entries: Sequence[tuple], cfg: BuildConfig, data_dir: Path, *,
                processes: int = 1, threads: int = 1, prune: bool = False, progress: Any = None) -> dict[str, Any]:
    """Write the records of ``entries`` (``(key, id, file, labels, split)``) into the one LevelDB at
    ``path``: skip those stored, remove stored ones not in ``entries`` (see :func:`_prune`), decode the
    rest on ``processes`` (a pool) or ``threads`` and commit them with the meta counts in WriteBatches.
    ``progress(n)`` is called as posts are done. Returns the counts and the skipped posts."""
    import plyvel

    db = _open_db(path, create=True)
    stats: dict[str, Any] = {"stored": 0, "already": 0, "removed": 0, "skipped": [], "counts": {}}
    try:
        raw = db.get(META_KEY)
        if raw is None:
            meta = {**want, "counts": {s: 0 for s in SPLITS}, "created": time.time()}
            db.put(META_KEY, pack(meta), sync=True)
        else:
            meta = unpack(raw)
            check_meta(meta, image_size=cfg.image_size, resize=cfg.resize, where=str(path))
            if meta.get("vocab_sha256") != want["vocab_sha256"]:
                raise StoreMismatchError(f"{path}: it was built with a different vocabulary ({meta.get('num_tags')} "
                                         f"tags, not {want['num_tags']}); rebuild it (`--build --rebuild`)")
            if meta.get("split") != want["split"]:
                raise StoreMismatchError(f"{path}: built with split fractions {meta.get('split')}, not "
                                         f"{want['split']}; rebuild it (`--build --rebuild`)")
        item = (cfg.image_size, cfg.resize, cfg.max_pixels)
        tasks = [(*e, item) for e in entries if db.get(REC + e[0]) is None]
        stats["already"] = len(entries) - len(tasks)
        if progress and stats["already"]:
            progress(stats["already"])
        info = {t[0]: t[1:5] for t in tasks}  # key -> (id, file, labels, split)
        counts = dict(meta.get("counts", {}))
        stats["moved"] = _move_splits(db, [e for e in entries if e[0] not in info], counts, meta)
        stats["removed"] = _prune(db, {e[0] for e in entries}, counts, meta, allow_all=prune)

        pool = threads_pool = None
        try:
            if processes > 1 and len(tasks) > 8:
                pool = mp.get_context("spawn").Pool(min(processes, len(tasks)))
                results: Iterable = pool.imap_unordered(_work, tasks, chunksize=4)
            elif threads > 1 and len(tasks) > 1:
                from concurrent.futures import ThreadPoolExecutor

                threads_pool = ThreadPoolExecutor(threads)
                results = threads_pool.map(_work, tasks)
            else:
                results = map(_work, tasks)
            pending = db.write_batch()
            in_batch = 0
            for key, value, reason, detail in results:
                pid, file, labels, split = info[key]
                if progress:
                    progress(1)
                if value is None:
                    stats["skipped"].append({"id": pid, "file": os.path.relpath(file, data_dir),
                                             "reason": reason, "detail": detail})
                    continue
                pending.put(REC + key, value)
                pending.put(IDX + split.encode() + b"/" + key, pack(labels))
                counts[split] = counts.get(split, 0) + 1
                stats["stored"] += 1
                in_batch += 1
                if in_batch >= cfg.batch_size:
                    _commit(pending, meta, counts)
                    pending, in_batch = db.write_batch(), 0
            _commit(pending, meta, counts)
            db.put(META_KEY, pack(meta), sync=True)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            if threads_pool is not None:
                threads_pool.shutdown(wait=False, cancel_futures=True)
        stats["counts"] = {s: counts.get(s, 0) for s in SPLITS}
    except plyvel.Error as e:
        raise AltI2VError(f"{path}: writing the store failed ({e}); is the disk full? Everything written "
                          "before this is kept: free space and run --build again to resume") from None
    finally:
        db.close()
    return stats


def _commit(batch, meta: dict, counts: dict) -> None:
    """Write records, their index entries and the new counts in one atomic WriteBatch."""
    meta["counts"] = {s: int(counts.get(s, 0)) for s in SPLITS}
    batch.put(META_KEY, pack(meta))
    batch.write()


def _move_splits(db, stored: Sequence[tuple], counts: dict, meta: dict) -> int:
    """Give stored records the split their entry now wants (a --dedupe report put them in a group with a
    post of another split): the record's own split and its index entry move together, in WriteBatches."""
    moved = 0
    wb = db.write_batch()
    for key, _pid, _file, _labels, split in stored:
        if db.get(IDX + split.encode() + b"/" + key) is not None:
            continue
        old = next((s for s in SPLITS if s != split and db.get(IDX + s.encode() + b"/" + key) is not None), None)
        raw = db.get(REC + key)
        if old is None or raw is None:
            continue
        record = unpack(raw)
        record["split"] = split
        wb.put(REC + key, pack(record))
        wb.put(IDX + split.encode() + b"/" + key, db.get(IDX + old.encode() + b"/" + key))
        wb.delete(IDX + old.encode() + b"/" + key)
        counts[old] = counts.get(old, 0) - 1
        counts[split] = counts.get(split, 0) + 1
        moved += 1
        if moved % 256 == 0:
            _commit(wb, meta, counts)
            wb = db.write_batch()
    _commit(wb, meta, counts)
    return moved


def _prune(db, live: set, counts: dict, meta: dict, *, allow_all: bool) -> int:
    """Remove records whose post is gone from posts.jsonl (the store mirrors the dataset); more than
    ``PRUNE_SHARE`` of the store only when ``allow_all`` (a truncated posts.jsonl must not wipe it)."""
    stale, total = [], 0
    for split in SPLITS:
        prefix = IDX + split.encode() + b"/"
        for k in db.iterator(prefix=prefix, include_value=False):
            total += 1
            key = k[len(prefix):]
            if key not in live:
                stale.append((split, key))
    if stale and not allow_all and len(stale) > PRUNE_SHARE * total:
        raise AltI2VError(f"{len(stale)} of the store's {total} records have no post in posts.jsonl any more "
                          f"(more than {PRUNE_SHARE:.0%}); if posts were removed on purpose, run --build again "
                          "with --prune to remove their records; otherwise restore posts.jsonl")
    if stale:
        wb = db.write_batch()
        for split, key in stale:
            wb.delete(REC + key)
            wb.delete(IDX + split.encode() + b"/" + key)
            counts[split] = counts.get(split, 0) - 1
        _commit(wb, meta, counts)
    return len(stale)
