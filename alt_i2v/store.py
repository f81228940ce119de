"""The training store: ``DATA/store/``, a LevelDB of decoded, resized uint8 images with their labels.

Keys (``id_key`` is ``i<int id>`` or ``s<str id>``)::

    __meta__                 msgpack {version, image_size, resize, vocab_sha256, num_tags, split, counts}
    r/<id_key>               msgpack {"id", "image": uint8 HxWx3 (msgpack-numpy), "labels", "split"}
    s/<split>/<id_key>       msgpack [labels]  (a small index: splits and labels without touching images)

Every WriteBatch carries records, their index entries and the updated meta counts together, so a build
killed at any moment leaves a consistent store, and the next run only does what is missing.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import msgpack
import msgpack_numpy
import numpy as np

from .config import BuildConfig, ImageConfig, resolve_workers
from .errors import AltI2VError, BadRecordError, ImageLoadError, StoreMismatchError
from .layout import STORE_DIR
from .vocab import VOCAB_FILE, Vocab

STORE_VERSION = 1
META_KEY = b"__meta__"
REC = b"r/"
IDX = b"s/"
SPLITS = ("train", "val", "test")


def split_of(pid: Any, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """A stable split from a hash of the id: rebuilding never moves an image between splits."""
    from .dataset import id_key

    h = int.from_bytes(hashlib.sha256(id_key(pid).encode()).digest()[:8], "big") / 2.0 ** 64
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=msgpack_numpy.encode, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """msgpack (+ msgpack-numpy arrays of plain numeric dtypes only); nothing is ever unpickled.

    Anything else (object or structured dtypes, a shape that disagrees with the bytes, broken msgpack)
    is a :class:`BadRecordError`, never a crash or a half-decoded array.
    """
    try:
        return msgpack.unpackb(data, object_hook=_decode_array, raw=False, strict_map_key=False)
    except BadRecordError:
        raise
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
        raise BadRecordError(f"undecodable msgpack ({type(e).__name__}: {str(e)[:100]})") from None


# The dtypes a store ever holds (images are uint8; counts and scalars are plain numbers). A dtype outside
# this list, such as a structured one with an object field, would let the record's bytes become pointers.
ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in (
    "|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8",
    ">u2", ">i2", ">u4", ">i4", ">u8", ">i8", ">f2", ">f4", ">f8"))


def _decode_array(obj: dict) -> Any:
    if b"nd" not in obj:
        return obj
    typ, kind, shape, data = obj.get(b"type"), obj.get(b"kind", b""), obj.get(b"shape", ()), obj.get(b"data")
    typ = typ.decode("ascii", "replace") if isinstance(typ, bytes) else typ
    if kind or not isinstance(typ, str) or typ not in ALLOWED_DTYPES or not isinstance(data, bytes):
        raise BadRecordError(f"array of dtype {str(typ)[:60]} (kind {kind!r}) is not a plain numeric array; "
                             "refusing to decode it")
    dtype = np.dtype(typ)
    if obj[b"nd"] is not True:
        if len(data) != dtype.itemsize:
            raise BadRecordError("numpy scalar with the wrong number of bytes")
        return np.frombuffer(data, dtype=dtype)[0]
    if not (isinstance(shape, (list, tuple)) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 31 for d in shape)):
        raise BadRecordError(f"array shape {str(shape)[:60]} is not a list of sizes")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
        raise BadRecordError(f"array of shape {tuple(shape)} {typ} does not match its {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def check_record(rec: Any, image_size: int, num_tags: int) -> dict:
    """``rec`` if it is the record the store's meta promises (uint8 SxSx3 image, labels below num_tags),
    else BadRecordError: a damaged or foreign record never reaches training as a wrong array."""
    if not isinstance(rec, dict):
        raise BadRecordError("record is not a map")
    img, labels = rec.get("image"), rec.get("labels")
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != (image_size, image_size, 3):
        what = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise BadRecordError(f"image is {what}, the store holds uint8 ({image_size}, {image_size}, 3)")
    if not (isinstance(labels, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                             and 0 <= x < num_tags for x in labels)):
        raise BadRecordError(f"labels are not tag indices below {num_tags}")
    return rec


def encode_record(pid: Any, image: np.ndarray, labels: Sequence[int], split: str) -> bytes:
    return pack({"id": pid, "image": np.ascontiguousarray(image, dtype=np.uint8),
                 "labels": [int(x) for x in labels], "split": split})


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
    """

    def __init__(self, path: str | os.PathLike, *, vocab: Vocab | None = None, image_size: int | None = None,
                 resize: str | None = None):
        path = Path(path)
        if (path / STORE_DIR).is_dir():
            path = path / STORE_DIR
        self.path = path
        self.bad: dict[bytes, str] = {}  # records skipped as undecodable: key -> reason
        if not (path / "CURRENT").is_file():
            raise AltI2VError(f"{path}: no store here; run `python -m alt_i2v --build --data DIR` first")
        self._lock = ExitStack()
        self._lock.enter_context(store_lock(path, shared=True))  # a build never swaps it away under us
        self.db = None
        try:
            self.db = _open_db(path, create=False)
            raw = self.db.get(META_KEY)
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
        """Keys and label lists of a split (or all), read from the small index, not the images."""
        keys, labels = [], []
        for s in ([split] if split else SPLITS):
            prefix = IDX + s.encode() + b"/"
            for k, v in self.db.iterator(prefix=prefix):
                keys.append(k[len(prefix):])
                labels.append(unpack(v))
        return keys, labels

    def ids(self, split: str | None = None) -> list[bytes]:
        """Record keys of a split (or all) in key order; feed them to :meth:`get_batch`."""
        out = []
        for s in ([split] if split else SPLITS):
            prefix = IDX + s.encode() + b"/"
            out.extend(k[len(prefix):] for k in self.db.iterator(prefix=prefix, include_value=False))
        return out

    def get(self, key: bytes | str) -> dict:
        """One record ``{"id", "image", "labels", "split"}`` by key (``i123``) or by post id."""
        key = self._key(key)
        raw = self.db.get(REC + key)
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
        get = self.db.get
        for key in keys:
            raw = get(REC + key)
            if raw is None:
                raise KeyError(key.decode(errors="replace"))
            rec = self._decode(key, raw)
            if rec is None:
                continue
            out[len(labels)] = rec["image"]
            labels.append(rec["labels"])
        return out[:len(labels)], labels

    def records(self, split: str | None = None) -> Iterator[dict]:
        """Iterate full records of a split (or all)."""
        for key in self.ids(split):
            yield self.get(key)

    def close(self) -> None:
        if self.db is not None and not self.db.closed:
            self.db.close()
        self._lock.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _key(key: bytes | str | int) -> bytes:
        from .dataset import id_key

        if isinstance(key, bytes):
            return key
        if isinstance(key, str) and key[:1] in ("i", "s") and not key.isdigit():
            return key.encode()
        return id_key(key).encode()


def multi_hot(labels: Sequence[Sequence[int]], num_tags: int, dtype: Any = np.float32) -> np.ndarray:
    """Label index lists to an ``(N, num_tags)`` 0/1 matrix."""
    y = np.zeros((len(labels), num_tags), dtype=dtype)
    for i, lab in enumerate(labels):
        if len(lab):
            y[i, np.asarray(lab, dtype=np.int64)] = 1
    return y


def check_meta(meta: dict, *, vocab: Vocab | None = None, image_size: int | None = None,
               resize: str | None = None, where: str = "store") -> None:
    """Raise StoreMismatchError when a store's meta disagrees with what the caller expects."""
    problems = []
    if vocab is not None and meta.get("vocab_sha256") != vocab.sha256:
        problems.append(f"it was built with a different vocabulary ({meta.get('num_tags')} tags, "
                        f"sha256 {str(meta.get('vocab_sha256'))[:12]}…) than the one given ({len(vocab)} tags, "
                        f"{vocab.sha256[:12]}…)")
    if image_size is not None and int(meta.get("image_size", -1)) != int(image_size):
        problems.append(f"its images are {meta.get('image_size')}px, not {image_size}px")
    if resize is not None and meta.get("resize") != resize:
        problems.append(f"its resize mode is {meta.get('resize')!r}, not {resize!r}")
    if problems:
        raise StoreMismatchError(f"{where}: " + "; ".join(problems) +
                                 ". Rebuild it (`--build --rebuild`) or use matching settings.")


# ---------------------------------------------------------------------------------------------------------
# Building


@dataclass
class BuildResult:
    path: Path
    stored: int = 0
    already: int = 0
    removed: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"id", "file", "reason", "detail"}
    posts_errors: list[dict] = field(default_factory=list)
    duplicates: int = 0
    no_labels: int = 0
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        from .progress import count_reasons

        reasons = count_reasons(self.skipped)
        rate = self.stored / self.seconds if self.seconds > 0 else 0.0
        return {"store": str(self.path), "stored now": self.stored, "already stored": self.already,
                "removed (no longer in posts)": self.removed, "skipped images": len(self.skipped),
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
    from .imaging import load_image

    size, resize, max_pixels = cfg
    return load_image(path, size, resize, max_pixels=max_pixels)


PRUNE_SHARE = 0.2  # a build that would remove more than this share of the store stops unless prune=True


def store_lock(path: Path, *, shared: bool):
    """The store's advisory lock, ``DATA/.store.lock``: readers (train, evaluate, index) share it, a build
    holds it alone. It is taken before the store is touched, so a build never removes or swaps a store
    that another process has open, and a reader never opens one that is being swapped."""
    from .fsutil import lock_file

    busy = (f"{path}: a --build is writing this store now; wait for it to finish" if shared else
            f"{path}: the store is in use by another process (--build, --train, --evaluate or --index); wait "
            "for it to finish or stop it")
    return lock_file(path.parent / f".{path.name}.lock", busy, shared=shared)


def build_store(data_dir: str | os.PathLike, image_size: int = 150, resize: str = "pad", *,
                workers: int = 0, max_pixels: int = ImageConfig.max_pixels, batch_size: int = 64,
                val_fraction: float = 0.1, test_fraction: float = 0.1, rebuild: bool = False,
                prune: bool = False, quiet: bool = False) -> BuildResult:
    """Decode, resize and store every post's image of ``DATA`` into ``DATA/store`` (resumable).

    Posts already stored are skipped; records whose post left posts.jsonl are removed (more than
    ``PRUNE_SHARE`` of the store only with ``prune=True``); every skipped post is listed with its reason in
    ``DATA/reports/build_report.json``. ``rebuild`` builds a new store beside the old one and swaps it in
    with a rename once it is complete; the old one serves until then.
    """
    from .progress import write_report

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
            try:  # a rebuild that was interrupted resumes where it stopped
                result = _build(data_dir, fresh, cfg, vocab, prune=True, quiet=quiet)
            except StoreMismatchError:  # ... unless it was started with other settings
                _rmtree(fresh)
                result = _build(data_dir, fresh, cfg, vocab, prune=True, quiet=quiet)
            _swap_in(fresh, path)
            result.path = path
        else:
            result = _build(data_dir, path, cfg, vocab, prune=prune, quiet=quiet)
    write_report(data_dir, "build_report", {
        **result.summary(), "config": cfg.get_config(), "skipped_posts": result.skipped,
        "posts_jsonl_errors": result.posts_errors})
    return result


def _rmtree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _swap_in(fresh: Path, path: Path) -> None:
    """Replace ``path`` by the complete store ``fresh``: two renames, and the old one removed last (a kill
    at any point leaves either store whole; :func:`_finish_swap` completes the step on the next build)."""
    from .fsutil import fsync_dir

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


def _build(data_dir: Path, path: Path, cfg: BuildConfig, vocab: Vocab, *, prune: bool,
           quiet: bool) -> BuildResult:
    """The build itself, into ``path``, under the caller's store lock."""
    import plyvel

    from .dataset import PostsRead, id_key, iter_posts, post_image_path, posts_path
    from .progress import bar

    posts_file = posts_path(data_dir)
    if not posts_file.is_file() or posts_file.stat().st_size == 0:
        raise AltI2VError(f"{posts_file}: no posts; run --scrape or --import first (the store is left as it is)")
    t0 = time.perf_counter()
    want = {"version": STORE_VERSION, "image_size": cfg.image_size, "resize": cfg.resize,
            "vocab_sha256": vocab.sha256, "num_tags": len(vocab),
            "split": {"val": cfg.val_fraction, "test": cfg.test_fraction}}
    db = _open_db(path, create=True)
    result = BuildResult(path=path)
    try:
        raw = db.get(META_KEY)
        if raw is None:
            meta = {**want, "counts": {s: 0 for s in SPLITS}, "created": time.time()}
            db.put(META_KEY, pack(meta), sync=True)
        else:
            meta = unpack(raw)
            check_meta(meta, vocab=vocab, image_size=cfg.image_size, resize=cfg.resize, where=str(path))
            if meta.get("split") != want["split"]:
                raise StoreMismatchError(f"{path}: built with split fractions {meta.get('split')}, not "
                                         f"{want['split']}; rebuild it (`--build --rebuild`)")

        read = PostsRead()
        tasks, live = [], set()
        for post in iter_posts(data_dir, read):
            key = id_key(post["id"]).encode()
            live.add(key)
            labels = vocab.labels(post)
            if not labels:
                result.no_labels += 1
            if db.get(REC + key) is not None:
                result.already += 1
                continue
            file = str(post_image_path(post, data_dir))
            split = split_of(post["id"], cfg.val_fraction, cfg.test_fraction)
            tasks.append((key, post["id"], file, labels, split,
                          (cfg.image_size, cfg.resize, cfg.max_pixels)))
        result.posts_errors, result.duplicates = read.errors, len(read.duplicates)
        info = {t[0]: (t[1], t[2], t[3], t[4]) for t in tasks}  # key -> (id, file, labels, split)

        counts = dict(meta.get("counts", {}))
        if not live:
            raise AltI2VError(f"{posts_file}: not one usable post in {read.lines} lines (see the bad lines in "
                              "the build report); the store is left as it is")
        result.removed = _prune(db, live, counts, meta, allow_all=prune)

        nworkers = min(resolve_workers(cfg.workers), max(1, len(tasks)))
        pool = None
        try:
            if nworkers > 1 and len(tasks) > 8:
                pool = mp.get_context("spawn").Pool(nworkers)
                results: Iterable = pool.imap_unordered(_work, tasks, chunksize=4)
            else:
                results = map(_work, tasks)
            pending = db.write_batch()
            in_batch = 0
            progress = bar(results, total=len(tasks), desc="build", unit="img", quiet=quiet)
            for key, value, reason, detail in progress:
                pid, file, labels, split = info[key]
                if value is None:
                    result.skipped.append({"id": pid, "file": os.path.relpath(file, data_dir),
                                           "reason": reason, "detail": detail})
                    continue
                pending.put(REC + key, value)
                pending.put(IDX + split.encode() + b"/" + key, pack(labels))
                counts[split] = counts.get(split, 0) + 1
                result.stored += 1
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
        result.counts = {s: counts.get(s, 0) for s in SPLITS}
    except plyvel.Error as e:
        raise AltI2VError(f"{path}: writing the store failed ({e}); is the disk full? Everything written "
                          "before this is kept: free space and run --build again to resume") from None
    finally:
        db.close()
    result.seconds = time.perf_counter() - t0
    return result


def _commit(batch, meta: dict, counts: dict) -> None:
    """Write records, their index entries and the new counts in one atomic WriteBatch."""
    meta["counts"] = {s: int(counts.get(s, 0)) for s in SPLITS}
    batch.put(META_KEY, pack(meta))
    batch.write()


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


def open_store(path: str | os.PathLike, **kw: Any) -> Store:
    return Store(path, **kw)


__all__ = ["Store", "open_store", "build_store", "BuildResult", "split_of", "multi_hot", "encode_record",
           "pack", "unpack", "check_meta", "check_record", "SPLITS"]
