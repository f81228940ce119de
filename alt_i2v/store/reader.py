"""Reading a store (the reader half; the builder half is :mod:`.build`): :class:`Store` over one LevelDB,
:class:`ShardedStore` over N of them with the same read API, and :func:`open_store`, which opens either
layout."""

from __future__ import annotations

import heapq
import os
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..config import ImageConfig
from ..data.vocab import Vocab
from ..errors import AltI2VError, BadRecordError, StoreMismatchError
from .layout import is_sharded, open_db, read_layout, shard_name, shard_of, store_lock, store_path
from .records import IDX, META_KEY, REC, SPLITS, STORE_VERSION, check_meta, check_record, unpack


def open_store(path: str | os.PathLike, *, vocab: Vocab | None = None, image_size: int | None = None,
               resize: str | None = None, lock: bool = True) -> "Store":
    """The store at ``path`` (``DATA`` or ``DATA/store``) in either layout: a :class:`ShardedStore` when it
    was built with ``--shards N``, else a :class:`Store`. Both read the same way."""
    kw = {"vocab": vocab, "image_size": image_size, "resize": resize, "lock": lock}
    return (ShardedStore if is_sharded(store_path(path)) else Store)(path, **kw)


class Store:
    """Read access to a built store of one LevelDB (used by training, evaluation and indexing); open a
    store of either layout with :func:`open_store`.

    ``vocab`` / ``image_size`` / ``resize`` given: a store built differently is a StoreMismatchError.
    :meth:`release` closes the LevelDB so another process (a reader of :mod:`alt_i2v.training.readers`)
    may open it; the next read here opens it again. ``lock=False`` is for the shards of a sharded store,
    whose lock the ShardedStore holds.
    """

    num_shards = 1

    def __init__(self, path: str | os.PathLike, *, vocab: Vocab | None = None, image_size: int | None = None,
                 resize: str | None = None, lock: bool = True):
        path = store_path(path)
        self.path = path
        self.bad: dict[bytes, str] = {}  # records skipped as undecodable: key -> reason
        self._index_cache: dict[str, tuple[list[bytes], list[list[int]]]] = {}
        if is_sharded(path):
            raise AltI2VError(f"{path} is a sharded store (--build --shards N): open it with open_store()")
        if not (path / "CURRENT").is_file():
            raise AltI2VError(f"{path}: no store here; run `python -m alt_i2v --build --data DIR` first")
        self._lock = ExitStack()
        if lock:
            self._lock.enter_context(store_lock(path, shared=True))  # a build never swaps it away under us
        self._db = None
        self._closed = False
        self._use = threading.Condition()  # reads in flight; release() waits for them (plyvel must not
        self._users = 0                    # close a DB that another thread is reading)
        try:
            self._db = open_db(path, create=False)
            raw = self._db.get(META_KEY)
            if raw is None:
                raise AltI2VError(f"{path}: store has no meta record (not an alt-i2v store, or never built)")
            try:
                self.meta: dict = unpack(raw)
            except BadRecordError as e:
                raise AltI2VError(f"{path}: the store's meta record is damaged ({e}); run --build --rebuild") \
                    from None
            if self.meta.get("version", 0) > STORE_VERSION:
                raise StoreMismatchError(f"{path}: store version {self.meta.get('version')} is newer than this "
                                         "alt-i2v understands")
            check_meta(self.meta, vocab=vocab, image_size=image_size, resize=resize, where=str(path))
        except BaseException:
            self.close()
            raise

    @property
    def db(self):
        """The open LevelDB (opened again after :meth:`release`, never after :meth:`close`)."""
        if self._db is None or self._db.closed:
            if self._closed:
                raise AltI2VError(f"{self.path}: the store is closed")
            self._db = open_db(self.path, create=False)
        return self._db

    def release(self) -> None:
        """Close the LevelDB files (not the lock) so another process can open them; reads reopen them.
        Waits for reads in flight on other threads (read-ahead) first."""
        with self._use:
            while self._users:
                self._use.wait()
            if self._db is not None and not self._db.closed:
                self._db.close()

    @contextmanager
    def _reading(self):
        """The open DB for one read (or a batch of them): :meth:`release` waits until it is done."""
        with self._use:
            db = self.db
            self._users += 1
        try:
            yield db
        finally:
            with self._use:
                self._users -= 1
                self._use.notify_all()

    def shard_of(self, key: bytes) -> int:
        """Which shard holds ``key`` (always 0 here)."""
        return 0

    def shard_paths(self) -> list[Path]:
        """The LevelDB directory of every shard, in shard order."""
        return [self.path]

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def resize(self) -> str:
        return str(self.meta["resize"])

    @property
    def num_tags(self) -> int:
        return int(self.meta["num_tags"])

    def image_config(self) -> ImageConfig:
        return ImageConfig(image_size=self.image_size, resize=self.resize)

    def count(self, split: str | None = None) -> int:
        counts = self.meta.get("counts", {})
        return int(sum(counts.values()) if split is None else counts.get(split, 0))

    def counts(self) -> dict[str, int]:
        return {s: self.count(s) for s in SPLITS}

    def index(self, split: str | None = None) -> tuple[list[bytes], list[list[int]]]:
        """Keys and label lists of a split (or all) in key order, read from the small index, not the
        images; kept after the first read, so readers may hold the LevelDB meanwhile."""
        keys, labels = [], []
        cache = self._index_cache
        for s in ([split] if split else SPLITS):
            if s not in cache:
                cache[s] = self._read_index(s)
            keys += cache[s][0]
            labels += cache[s][1]
        return keys, labels

    def _read_index(self, split: str) -> tuple[list[bytes], list[list[int]]]:
        keys, labels = [], []
        prefix = IDX + split.encode() + b"/"
        for k, v in self.db.iterator(prefix=prefix):
            keys.append(k[len(prefix):])
            labels.append(unpack(v))
        return keys, labels

    def ids(self, split: str | None = None) -> list[bytes]:
        """Record keys of a split (or all) in key order; feed them to :meth:`get_batch`."""
        return self.index(split)[0]

    def get(self, key: bytes | str) -> dict:
        """One record ``{"id", "image", "labels", "split"}`` by key (``i123``) or by post id."""
        key = self._key(key)
        with self._reading() as db:
            raw = db.get(REC + key)
        if raw is None:
            raise KeyError(key.decode(errors="replace"))
        try:
            return check_record(unpack(raw), self.image_size, self.num_tags)
        except BadRecordError as e:
            raise BadRecordError(f"{self.path}: record {key.decode(errors='replace')}: {e}") from None

    def _decode(self, key: bytes, raw: bytes) -> dict | None:
        """The checked record, or None after noting it in :attr:`bad` (a bad record costs one image)."""
        try:
            return check_record(unpack(raw), self.image_size, self.num_tags)
        except BadRecordError as e:
            self.bad[key] = str(e)
            return None

    def bad_report(self) -> list[dict]:
        """The records skipped so far as undecodable, for summaries and reports."""
        return [{"key": k.decode(errors="replace"), "reason": r} for k, r in sorted(self.bad.items())]

    def get_batch(self, keys: Sequence[bytes], out: np.ndarray | None = None
                  ) -> tuple[np.ndarray, list[list[int]]]:
        """Images ``(N, H, W, 3)`` uint8 and label lists for ``keys``; ``out`` may be a reused buffer.

        A record that fails to decode is left out (N is then smaller) and noted in :attr:`bad`."""
        n, s = len(keys), self.image_size
        if out is None or out.shape[0] < n:
            out = np.empty((n, s, s, 3), dtype=np.uint8)
        ok, labels = self._read(keys, out, range(n))
        keep = np.flatnonzero(ok)
        if len(keep) < n:
            out[:len(keep)] = out[keep]
        return out[:len(keep)], [labels[i] for i in keep]

    def read_into(self, keys: Sequence[bytes], out: np.ndarray, at: Sequence[int] | None = None) -> np.ndarray:
        """Decode the images of ``keys`` into ``out[at[i]]`` (``out[i]`` without ``at``): a batch buffer,
        possibly shared memory. Returns the mask of records that decoded; one that does not is zeroed,
        noted in :attr:`bad` and costs only itself."""
        return self._read(keys, out, range(len(keys)) if at is None else at)[0]

    def _read(self, keys: Sequence[bytes], out: np.ndarray, at: Sequence[int]
              ) -> tuple[np.ndarray, list[list[int] | None]]:
        """Decode ``keys`` into ``out[at[i]]``: the mask of those that decoded and their label lists."""
        ok = np.ones(len(keys), bool)
        labels: list[list[int] | None] = [None] * len(keys)
        with self._reading() as db:
            for i, key in enumerate(keys):
                raw = db.get(REC + key)
                if raw is None:
                    raise KeyError(key.decode(errors="replace"))
                rec = self._decode(key, raw)
                if rec is None:
                    out[at[i]] = 0
                    ok[i] = False
                else:
                    out[at[i]] = rec["image"]
                    labels[i] = rec["labels"]
        return ok, labels

    def close(self) -> None:
        self._closed = True  # a late read (a read-ahead thread) fails instead of opening it again
        self.release()
        self._lock.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _key(key: bytes | str | int) -> bytes:
        from ..data.posts import id_key

        if isinstance(key, bytes):
            return key
        if isinstance(key, str) and key[:1] in ("i", "s") and not key.isdigit():
            return key.encode()
        return id_key(key).encode()


class ShardedStore(Store):
    """A sharded store with the :class:`Store` read API (:func:`open_store` opens one).

    Keys and labels merge the shards' indexes in key order, so a split lists the same records in the
    same order as it would in a one-shard store: training on either sees the same batches.
    """

    def __init__(self, path: str | os.PathLike, *, vocab: Vocab | None = None, image_size: int | None = None,
                 resize: str | None = None, lock: bool = True):
        self.path = store_path(path)
        self.bad: dict[bytes, str] = {}  # shared with the shards: key -> why it did not decode
        self._index_cache = {}
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

    def _read(self, keys: Sequence[bytes], out: np.ndarray, at: Sequence[int]
              ) -> tuple[np.ndarray, list[list[int] | None]]:
        ok = np.ones(len(keys), bool)
        labels: list[list[int] | None] = [None] * len(keys)
        for store, pos in self._by_shard(keys):
            got, lab = store._read([keys[i] for i in pos], out, [at[i] for i in pos])
            ok[pos] = got
            for i, one in zip(pos, lab):
                labels[i] = one
        return ok, labels

    def release(self) -> None:
        for st in self.stores:
            st.release()

    def close(self) -> None:
        for st in self.stores:
            st.close()
        self._lock.close()


__all__ = ["Store", "ShardedStore", "open_store"]
