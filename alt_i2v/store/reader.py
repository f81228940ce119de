"""Reading a store: :class:`Store` over one LevelDB (or, through ``Store(DATA)``, a sharded store), the
advisory lock readers share and builds take alone."""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..config import ImageConfig
from ..errors import AltI2VError, BadRecordError, StoreMismatchError
from ..data.layout import STORE_DIR
from ..data.vocab import Vocab
from .records import (IDX, LAYOUT_FILE, META_KEY, REC, SPLITS, STORE_VERSION, check_meta, check_record,
                      unpack)


def _open_db(path: Path, create: bool):
    import plyvel

    try:
        return plyvel.DB(str(path), create_if_missing=create, write_buffer_size=16 << 20,
                         max_open_files=256)
    except plyvel.IOError as e:
        if "lock" in str(e).lower():
            raise AltI2VError(f"{path}: the store is in use by another process (LevelDB allows one); "
                              "wait for it to finish or stop it") from None
        raise AltI2VError(f"{path}: cannot open the store ({e})") from None
    except plyvel.Error as e:
        if not create and "does not exist" in str(e):
            raise AltI2VError(f"{path}: no store here; run `python -m alt_i2v --build --data DIR` first") from None
        raise AltI2VError(f"{path}: the store is damaged or not a LevelDB ({e}); delete it and run --build "
                          "again (the images are safe, the store is derived from them)") from None


class Store:
    """Read access to a built store (used by training, evaluation and indexing).

    ``vocab`` / ``image_size`` / ``resize`` given: a store built differently is a StoreMismatchError.
    A sharded store (``--build --shards N``) opens as a :class:`~alt_i2v.store.shards.ShardedStore`, which
    reads the same way. :meth:`release` closes the LevelDB so another process (a reader of
    :mod:`alt_i2v.training.readers`) may open it; the next read here opens it again. ``lock=False`` is for the
    shards of a sharded store, whose lock the ShardedStore holds.
    """

    num_shards = 1

    def __new__(cls, path: str | os.PathLike = "", **kw: Any):
        if cls is Store and is_sharded(store_path(path)):
            from .shards import ShardedStore

            return super().__new__(ShardedStore)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, *, vocab: Vocab | None = None, image_size: int | None = None,
                 resize: str | None = None, lock: bool = True):
        path = store_path(path)
        self.path = path
        self.bad: dict[bytes, str] = {}  # records skipped as undecodable: key -> reason
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
            self._db = _open_db(path, create=False)
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
            self._db = _open_db(self.path, create=False)
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
        cache = self.__dict__.setdefault("_index_cache", {})
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
        labels = []
        with self._reading() as db:
            for key in keys:
                raw = db.get(REC + key)
                if raw is None:
                    raise KeyError(key.decode(errors="replace"))
                rec = self._decode(key, raw)
                if rec is None:
                    continue
                out[len(labels)] = rec["image"]
                labels.append(rec["labels"])
        return out[:len(labels)], labels

    def read_into(self, keys: Sequence[bytes], out: np.ndarray, at: Sequence[int] | None = None) -> np.ndarray:
        """Decode the images of ``keys`` into ``out[at[i]]`` (``out[i]`` without ``at``): a batch buffer,
        possibly shared memory. Returns the mask of records that decoded; one that does not is zeroed,
        noted in :attr:`bad` and costs only itself."""
        ok = np.ones(len(keys), bool)
        with self._reading() as db:
            for i, key in enumerate(keys):
                j = i if at is None else at[i]
                raw = db.get(REC + key)
                if raw is None:
                    raise KeyError(key.decode(errors="replace"))
                rec = self._decode(key, raw)
                if rec is None:
                    out[j] = 0
                    ok[i] = False
                else:
                    out[j] = rec["image"]
        return ok

    def records(self, split: str | None = None) -> Iterator[dict]:
        """Iterate full records of a split (or all)."""
        for key in self.ids(split):
            yield self.get(key)

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


def store_path(path: str | os.PathLike) -> Path:
    """``DATA/store`` when given ``DATA``, else the path itself."""
    path = Path(path)
    return path / STORE_DIR if (path / STORE_DIR).is_dir() else path


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a store directory) holds a sharded store: ``meta.json`` beside its shards."""
    return (Path(path) / LAYOUT_FILE).is_file()


def store_lock(path: Path, *, shared: bool):
    """The store's advisory lock, ``DATA/.store.lock``: readers (train, evaluate, index) share it, a build
    holds it alone. It is taken before the store is touched, so a build never removes or swaps a store
    that another process has open, and a reader never opens one that is being swapped."""
    from ..fsutil import lock_file

    busy = (f"{path}: a --build is writing this store now; wait for it to finish" if shared else
            f"{path}: the store is in use by another process (--build, --train, --evaluate or --index); wait "
            "for it to finish or stop it")
    return lock_file(path.parent / f".{path.name}.lock", busy, shared=shared)


def open_store(path: str | os.PathLike, **kw: Any) -> Store:
    return Store(path, **kw)
