"""Where a store lives on disk, shared by its reader and its builder: ``DATA/store`` (one LevelDB) or a
folder of shards with ``meta.json``, which record goes to which shard, the advisory lock readers share and
builds take alone, and opening one LevelDB with a clear error."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..data.layout import STORE_DIR
from ..errors import AltI2VError, UsageError
from ..fsutil import read_json_object
from .records import LAYOUT_FILE

MAX_SHARDS = 4096


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


def open_db(path: Path, create: bool):
    """One LevelDB (plyvel), or an AltI2VError that says what to do (in use, missing, damaged)."""
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


# ---------------------------------------------------------------------------------------------------------
# Shards


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
    """A sharded store's ``meta.json``, or an AltI2VError."""
    file = Path(path) / LAYOUT_FILE
    try:
        layout = read_json_object(file, "store layout")
        int(layout["shards"])
    except AltI2VError as e:
        raise AltI2VError(f"{e}; run --build --rebuild") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AltI2VError(f"{file}: unreadable store layout ({e}); run --build --rebuild") from None
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


__all__ = ["store_path", "is_sharded", "store_lock", "open_db", "shard_name", "shard_of", "shards_for_process",
           "read_layout", "stored_shard_count", "check_shard_count", "MAX_SHARDS"]
