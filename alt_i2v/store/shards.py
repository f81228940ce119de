"""A store in N LevelDB shards: ``--build --shards N``, one writer process per shard, read by processes.

Layout (each shard is a complete store in the one-LevelDB format of :mod:`alt_i2v.store`, its
``__meta__`` also naming its place ``shard``/``shards``)::

    DATA/store/meta.json                  {version, shards, image_size, resize, vocab_sha256, num_tags, split}
    DATA/store/shard-00000-of-00004/      LevelDB: the records whose key hashes to shard 0
    ...
    DATA/store/shard-00003-of-00004/

A record's shard is a fixed function of its key (:func:`shard_of`), so every record is in exactly one
shard and a rerun puts it where it was. ``meta.json`` is written (atomically) before any shard, and each
shard commits its records with its own counts in WriteBatches, so a build killed at any moment resumes
to a complete store. LevelDB lets one process open a database: that is why a shard is the unit of
parallel writing and reading. A one-shard store keeps today's layout (the LevelDB in ``DATA/store``).
Reshard by building again: ``--build --shards M --rebuild``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import multiprocessing as mp
import os
import queue
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..config import BuildConfig, resolve_workers
from ..errors import AltI2VError, StoreMismatchError, UsageError
from ..fsutil import atomic_write_json
from ..data.vocab import Vocab
from .build import build_shard
from .reader import Store, is_sharded, store_lock, store_path
from .records import LAYOUT_FILE, REC, SPLITS, check_meta

MAX_SHARDS = 4096


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def shard_of(key: bytes, count: int) -> int:
    """The shard of a record key: a fixed hash, independent of the split's hash."""
    if count == 1:
        return 0
    digest = hashlib.blake2b(key, digest_size=8, person=b"alt-i2v-shard").digest()
    return int.from_bytes(digest, "big") % count


def shards_for_process(num_shards: int, process_index: int = 0, process_count: int = 1) -> list[int]:
    """The shards process ``process_index`` of ``process_count`` owns (round robin): each shard has one
    owner, as LevelDB allows one process per database."""
    if not 0 <= process_index < process_count:
        raise UsageError(f"process index {process_index} is not in 0..{process_count - 1}")
    if process_count > num_shards:
        raise UsageError(f"{process_count} processes need at least as many shards, the store has {num_shards}; "
                         f"rebuild it with `--build --shards {process_count} --rebuild`")
    return list(range(process_index, num_shards, process_count))


def read_layout(path: Path) -> dict[str, Any]:
    try:
        layout = json.loads((Path(path) / LAYOUT_FILE).read_text(encoding="utf-8"))
        int(layout["shards"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AltI2VError(f"{path / LAYOUT_FILE}: unreadable store layout ({e}); run --build --rebuild") from None
    return layout


def stored_shard_count(path: Path) -> int | None:
    """How many shards the store at ``path`` has (None: no store there)."""
    if is_sharded(path):
        return int(read_layout(path)["shards"])
    return 1 if (path / "CURRENT").exists() else None


def check_shard_count(path: Path, shards: int | None) -> int:
    """The shard count a build of ``path`` uses: ``shards``, else the existing store's, else 1."""
    if shards is not None and not (isinstance(shards, int) and not isinstance(shards, bool)
                                   and 1 <= shards <= MAX_SHARDS):
        raise UsageError(f"--shards must be an integer in 1..{MAX_SHARDS}, got {shards!r}")
    existing = stored_shard_count(path)
    if existing is None:
        return int(shards or 1)
    if shards is not None and shards != existing:
        raise UsageError(f"{path} holds {existing} shard(s), not {shards}; reshard by building it again: "
                         f"`--build --shards {shards} --rebuild` (the images are decoded again), or leave "
                         "--shards out to update it as it is")
    return existing


# ---------------------------------------------------------------------------------------------------------
# Reading


class ShardedStore(Store):
    """A sharded store with the :class:`~alt_i2v.store.Store` read API (``Store(DATA)`` returns one).

    Keys and labels merge the shards' indexes in key order, so a split lists the same records in the
    same order as it would in a one-shard store: training on either sees the same batches.
    """

    def __init__(self, path: str | os.PathLike, *, vocab: Vocab | None = None, image_size: int | None = None,
                 resize: str | None = None, lock: bool = True):
        from contextlib import ExitStack

        self.path = store_path(path)
        self.bad: dict[bytes, str] = {}  # shared with the shards: key -> why it did not decode
        self.stores: list[Store] = []
        self._lock = ExitStack()
        try:
            if lock:
                self._lock.enter_context(store_lock(self.path, shared=True))
            layout = read_layout(self.path)
            self.num_shards = int(layout["shards"])
            for p in self.shard_paths():
                if not p.is_dir():
                    raise AltI2VError(f"{p}: shard missing; the store is incomplete: run --build again")
                self.stores.append(Store(p, vocab=vocab, image_size=image_size, resize=resize, lock=False))
                self.stores[-1].bad = self.bad
        except BaseException:
            self.close()
            raise
        counts = {s: sum(st.count(s) for st in self.stores) for s in SPLITS}
        self.meta = {**{k: v for k, v in layout.items() if k != "counts"}, "counts": counts}
        check_meta(self.meta, vocab=vocab, image_size=image_size, resize=resize, where=str(self.path))

    @property
    def db(self):
        raise AltI2VError(f"{self.path} is sharded: read it through Store methods or .stores[i].db")

    def shard_paths(self) -> list[Path]:
        return [self.path / shard_name(i, self.num_shards) for i in range(self.num_shards)]

    def shard_of(self, key: bytes) -> int:
        return shard_of(key, self.num_shards)

    def _read_index(self, split: str) -> tuple[list[bytes], list[list[int]]]:
        keys, labels = [], []
        for k, lab in heapq.merge(*(zip(*st.index(split)) for st in self.stores), key=lambda kv: kv[0]):
            keys.append(k)
            labels.append(lab)
        return keys, labels

    def get(self, key: bytes | str) -> dict:
        key = self._key(key)
        return self.stores[self.shard_of(key)].get(key)

    def _by_shard(self, keys: Sequence[bytes]) -> Iterator[tuple[Store, np.ndarray]]:
        owner = np.fromiter((self.shard_of(k) for k in keys), np.int64, len(keys))
        for i in np.unique(owner):
            yield self.stores[int(i)], np.flatnonzero(owner == i)

    def get_batch(self, keys: Sequence[bytes], out: np.ndarray | None = None
                  ) -> tuple[np.ndarray, list[list[int]]]:
        n, s = len(keys), self.image_size
        if out is None or out.shape[0] < n:
            out = np.empty((n, s, s, 3), dtype=np.uint8)
        labels = []
        for key in keys:
            store = self.stores[self.shard_of(key)]
            with store._reading() as db:
                raw = db.get(REC + key)
            if raw is None:
                raise KeyError(key.decode(errors="replace"))
            rec = store._decode(key, raw)
            if rec is not None:
                out[len(labels)] = rec["image"]
                labels.append(rec["labels"])
        return out[:len(labels)], labels

    def read_into(self, keys: Sequence[bytes], out: np.ndarray, at: Sequence[int] | None = None) -> np.ndarray:
        ok = np.ones(len(keys), bool)
        for store, pos in self._by_shard(keys):
            ok[pos] = store.read_into([keys[i] for i in pos], out, at=[pos_i if at is None else at[pos_i]
                                                                      for pos_i in pos])
        return ok

    def release(self) -> None:
        for st in self.stores:
            st.release()

    def close(self) -> None:
        for st in self.stores:
            st.close()
        self._lock.close()


# ---------------------------------------------------------------------------------------------------------
# Building


def build_sharded(path: Path, want: dict, entries: Sequence[tuple], cfg: BuildConfig, data_dir: Path,
                  shards: int, *, prune: bool = False, progress: Callable[[int], Any] | None = None
                  ) -> dict[str, Any]:
    """Write ``entries`` into ``shards`` LevelDB shards under ``path``, each by its own process (with
    ``ceil(workers / shards)`` decoding threads, at least 2: Pillow releases the GIL while decoding, and
    the shards' shares of the work are only equal on average). Returns the summed counts and skipped
    posts."""
    layout = {**{k: v for k, v in want.items()}, "shards": shards}
    path.mkdir(parents=True, exist_ok=True)
    if is_sharded(path):
        old = read_layout(path)
        if {k: old.get(k) for k in layout} != layout:
            diff = ", ".join(f"{k} {old.get(k)!r} (not {v!r})" for k, v in layout.items() if old.get(k) != v)
            raise StoreMismatchError(f"{path}: built with {diff}; rebuild it (`--build --rebuild`)")
    else:
        atomic_write_json(path / LAYOUT_FILE, layout)  # before any shard: a rerun knows the layout
    parts: list[list[tuple]] = [[] for _ in range(shards)]
    for e in entries:
        parts[shard_of(e[0], shards)].append(e)
    threads = max(2, math.ceil(resolve_workers(cfg.workers) / shards))  # 2+: a shard that finishes early idles
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = []
    total: dict[str, Any] = {"stored": 0, "already": 0, "removed": 0, "moved": 0, "skipped": [],
                             "counts": {s: 0 for s in SPLITS}}
    try:
        for i in range(shards):
            shard_meta = {**want, "shard": i, "shards": shards}
            proc = ctx.Process(target=_shard_worker, name=f"alt-i2v-build-{shard_name(i, shards)}", daemon=True,
                               args=(i, str(path / shard_name(i, shards)), shard_meta, parts[i], cfg,
                                     str(data_dir), threads, prune, messages, os.getpid()))
            proc.start()
            procs.append(proc)
        done: set[int] = set()
        while len(done) < shards:
            try:
                kind, i, payload = messages.get(timeout=0.5)
            except queue.Empty:
                for i, proc in enumerate(procs):
                    if i not in done and proc.exitcode is not None:
                        raise AltI2VError(f"the writer of {shard_name(i, shards)} stopped (exit code "
                                          f"{proc.exitcode}); what it wrote is kept: run --build again")
                continue
            if kind == "progress":
                if progress:
                    progress(payload)
            elif kind == "error":
                raise AltI2VError(f"{path / shard_name(i, shards)}: {payload}")
            else:
                done.add(i)
                for k in ("stored", "already", "removed", "moved"):
                    total[k] += payload.get(k, 0)
                total["skipped"] += payload["skipped"]
                for s, c in payload["counts"].items():
                    total["counts"][s] += c
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
        messages.close()
    return total


def _shard_worker(index: int, path: str, want: dict, entries: list, cfg: BuildConfig, data_dir: str,
                  threads: int, prune: bool, messages: Any, parent: int) -> None:
    """One shard's writer process: report progress in chunks; stop at once if the parent is gone (a
    killed build), which is safe between WriteBatches."""
    pending = [0]

    def progress(n: int) -> None:
        pending[0] += n
        if pending[0] >= 16:
            if os.getppid() != parent:
                os._exit(1)
            messages.put(("progress", index, pending[0]))
            pending[0] = 0

    try:
        stats = build_shard(Path(path), want, entries, cfg, Path(data_dir), threads=threads, prune=prune,
                            progress=progress)
        if pending[0]:
            messages.put(("progress", index, pending[0]))
        messages.put(("done", index, stats))
    except AltI2VError as e:
        messages.put(("error", index, str(e)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        messages.put(("error", index, f"{type(e).__name__}: {e}"))


__all__ = ["ShardedStore", "build_sharded", "shard_of", "shard_name", "shards_for_process", "read_layout",
           "check_shard_count", "stored_shard_count"]
