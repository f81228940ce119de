"""A private view of a store for one of several processes on a host: LevelDB lets one process open a
database, so each training process reads its own view (hard links to the immutable table files, copies of
the few small files around them) under ``DATA/.store-views/<host>-<pid>/``."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..errors import AltI2VError
from .layout import store_lock, store_path
from .reader import Store, open_store

VIEWS_DIR = ".store-views"  # DATA/.store-views/<host>-<pid>/: one process's view of DATA/store


def open_view(data_dir: str | os.PathLike, held: ExitStack, *, timeout: float = 120.0, **kw: Any) -> Store:
    """The store of ``data_dir`` (either layout) read through this process's own view. The store's shared
    lock goes on ``held`` (no build swaps the store while it is read); the view is removed at exit."""
    path = store_path(data_dir)
    held.enter_context(store_lock(path, shared=True))
    view = store_view(path, timeout=timeout)
    atexit.register(_remove_view, view)
    try:
        store = open_store(view, **kw)
    except BaseException:
        _remove_view(view)
        raise
    store.path = path
    return store




def store_view(store: Path, *, timeout: float = 120.0) -> Path:
    """A private copy of the store at ``store`` (one LevelDB, or a sharded store's folder of them) that
    costs almost no disk: LevelDB's table files (immutable) are hard-linked, the few small files around them
    copied, into ``DATA/.store-views/``. Taken while holding every database's own LevelDB lock, so no
    writer or other reader changes them meanwhile. Views of processes that are gone are removed first."""
    import fcntl

    store = Path(store)
    dbs = sorted({f.parent for f in store.rglob("CURRENT")})
    if not dbs:
        raise AltI2VError(f"{store}: no store here; run `python -m alt_i2v --build --data DIR` first")
    views = store.parent / VIEWS_DIR
    _remove_stale_views(views)
    view = views / f"{socket.gethostname()}-{os.getpid()}"
    _remove_view(view)
    deadline = time.monotonic() + timeout
    with ExitStack() as held:
        for db in dbs:
            lock = held.enter_context(open(db / "LOCK", "a+b"))
            while True:
                try:
                    fcntl.lockf(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.callback(fcntl.lockf, lock.fileno(), fcntl.LOCK_UN)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AltI2VError(f"{db}: the store stayed in use by another process (a build, an "
                                          f"evaluation?) for {timeout:.0f} s; wait for it to finish") from None
                    time.sleep(0.2)
        try:
            for f in sorted(store.rglob("*")):
                target = view / f.relative_to(store)
                if f.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if f.name == "LOCK" or f.name.startswith("LOG") or not f.is_file():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if f.suffix in (".ldb", ".sst"):
                    try:
                        os.link(f, target)
                        continue
                    except OSError:
                        pass  # another file system or no hard links there: copy instead
                shutil.copy2(f, target)
        except OSError as e:
            _remove_view(view)
            raise AltI2VError(f"{store}: cannot make this process's view of the store in {views} ({e}); "
                              "several processes on one host need a writable data directory, or give each "
                              "process its own copy of DATA") from None
    return view


def _remove_view(view: Path) -> None:
    """A view and the reader lock file that opening it left beside it."""
    shutil.rmtree(view, ignore_errors=True)
    Path(view.parent, f".{view.name}.lock").unlink(missing_ok=True)


def _remove_stale_views(views: Path) -> None:
    for v in views.glob(f"{socket.gethostname()}-*"):
        try:
            os.kill(int(v.name.rsplit("-", 1)[-1]), 0)
        except ProcessLookupError:
            _remove_view(v)
        except (ValueError, PermissionError):
            continue


__all__ = ["open_view", "store_view", "VIEWS_DIR"]
