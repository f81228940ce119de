"""Writing one LevelDB of a store (the builder half's core): decode, resize and commit every post's image
with its index entry and the meta counts in WriteBatches, so a write killed at any moment leaves a
consistent database and the next run only does what is missing; records whose post is gone are pruned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..config import BuildConfig
from ..errors import AltI2VError, ImageLoadError, StoreMismatchError
from .layout import open_db
from .records import IDX, META_KEY, REC, SPLITS, check_meta, encode_record, pack, unpack

PRUNE_SHARE = 0.2  # a build that would remove more than this share of the store stops unless prune=True


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


def build_shard(path: Path, want: dict, entries: Sequence[tuple], cfg: BuildConfig, data_dir: Path, *,
                processes: int = 1, threads: int = 1, prune: bool = False, progress: Any = None) -> dict[str, Any]:
    """Write the records of ``entries`` (``(key, id, file, labels, split)``) into the one LevelDB at
    ``path``: skip those stored, remove stored ones not in ``entries`` (see :func:`_prune`), decode the
    rest on ``processes`` (a pool) or ``threads`` and commit them with the meta counts in WriteBatches.
    ``progress(n)`` is called as posts are done. Returns the counts and the skipped posts."""
    import plyvel

    db = open_db(path, create=True)
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


__all__ = ["build_shard", "PRUNE_SHARE"]
