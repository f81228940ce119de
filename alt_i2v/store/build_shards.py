"""Building a store in N LevelDB shards: ``--build --shards N``, one writer process per shard.

Layout (each shard is a complete store in the one-LevelDB format of :mod:`alt_i2v.store`, its
``__meta__`` also naming its place ``shard``/``shards``)::

    DATA/store/meta.json                  {version, shards, image_size, resize, vocab_sha256, num_tags, split}
    DATA/store/shard-00000-of-00004/      LevelDB: the records whose key hashes to shard 0
    ...
    DATA/store/shard-00003-of-00004/

A record's shard is a fixed function of its key (:func:`alt_i2v.store.layout.shard_of`), so every record
is in exactly one shard and a rerun puts it where it was. ``meta.json`` is written (atomically) before any
shard, and each shard commits its records with its own counts in WriteBatches, so a build killed at any
moment resumes to a complete store. LevelDB lets one process open a database: that is why a shard is the
unit of parallel writing and reading. A one-shard store keeps today's layout (the LevelDB in
``DATA/store``). Reshard by building again: ``--build --shards M --rebuild``.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import BuildConfig, resolve_workers
from ..errors import AltI2VError, StoreMismatchError
from ..fsutil import atomic_write_json
from .layout import is_sharded, read_layout, shard_name, shard_of
from .records import LAYOUT_FILE, SPLITS
from .writer import build_shard


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


__all__ = ["build_sharded"]
