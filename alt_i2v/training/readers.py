"""Reader processes: each owns some shards of the store and decodes records into shared-memory batches.

LevelDB lets one process open a database, so a shard is the unit of parallel reading: process ``k`` of
``P`` opens the shards assigned to it (round robin) and nothing else, and the parent (which released
them, :meth:`Store.release`) only sends small messages: "batch slot ``s`` of buffer ``name`` needs
these keys at these positions". The images go straight from the record into the parent's shared
memory; the parent waits for every process that had a part of the batch. Threads in one process top
out near 10-18k images/s (the GIL); processes add up. This module does not import Keras, so a reader
starts in about a second.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import threading
from multiprocessing import shared_memory
from typing import Any, Sequence

import numpy as np

from ..errors import AltI2VError
from ..store import Store

READY_TIMEOUT = 120.0


class ReaderPool:
    """``processes`` reader processes over ``shards`` of ``store`` (default: all, one process each).

    ``submit`` schedules one batch, ``wait`` returns its undecodable positions. Used through
    :class:`SharedBatches`; one pool serves every dataset of a run (train, validation, predict).
    """

    def __init__(self, store: Store, processes: int | None = None, shards: Sequence[int] | None = None):
        self.store = store
        shards = list(range(store.num_shards)) if shards is None else [int(s) for s in shards]
        if not shards:
            raise AltI2VError("a reader pool needs at least one shard")
        self.processes = max(1, min(int(processes or len(shards)), len(shards)))
        self.owner = {shard: k % self.processes for k, shard in enumerate(shards)}
        paths = store.shard_paths()
        store.index()  # read (and kept) before the readers take the LevelDBs
        store.release()
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(self.processes)]
        self._results = ctx.Queue()
        self._procs = []
        self._jobs = itertools.count()
        self._expect: dict[int, int] = {}
        self._done: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        try:
            for k in range(self.processes):
                mine = {s: str(paths[s]) for s, owner in self.owner.items() if owner == k}
                proc = ctx.Process(target=_reader_main, args=(k, mine, self._tasks[k], self._results, os.getpid()),
                                   name=f"alt-i2v-reader-{k}", daemon=True)
                proc.start()
                self._procs.append(proc)
            ready = 0
            while ready < self.processes:
                kind, k, payload = self._get(READY_TIMEOUT)
                if kind == "error":
                    raise AltI2VError(f"reader process {k}: {payload}")
                ready += kind == "ready"
        except BaseException:
            self.close()
            raise

    def submit(self, buffer: "SharedBatches", slot: int, keys: Sequence[bytes]) -> int:
        """Ask the readers to decode ``keys`` into ``buffer``'s ``slot`` (position i gets keys[i])."""
        job = next(self._jobs)
        owner = np.fromiter((self.owner.get(self.store.shard_of(k), -1) for k in keys), np.int64, len(keys))
        if (owner < 0).any():
            raise AltI2VError("a key of this batch is in a shard this reader pool does not own")
        parts = 0
        for k in np.unique(owner):
            pos = np.flatnonzero(owner == k)
            self._tasks[int(k)].put(("read", job, buffer.name, buffer.shape, slot, pos.tolist(),
                                     [keys[i] for i in pos]))
            parts += 1
        with self._lock:
            self._expect[job] = parts
            self._done[job] = []
        return job

    def wait(self, job: int) -> list[tuple[int, str]]:
        """Block until every part of ``job`` is written; returns ``(position, why)`` of the records that
        did not decode."""
        with self._lock:
            while self._expect.get(job, 0) > 0:
                kind, who, payload = self._get(READY_TIMEOUT)
                if kind == "error":
                    raise AltI2VError(f"reader process {who}: {payload}")
                done_job, bad = payload
                self._expect[done_job] -= 1
                self._done[done_job].extend(bad)
            self._expect.pop(job, None)
            return self._done.pop(job, [])

    def forget(self, buffer: "SharedBatches") -> None:
        """Tell the readers to unmap a buffer that is being freed."""
        if self._procs:
            for q in self._tasks:
                q.put(("forget", buffer.name))

    def _get(self, timeout: float) -> tuple:
        if not self._procs:
            raise AltI2VError("the reader processes have been stopped")
        waited = 0.0
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead:
                    raise AltI2VError(f"reader process {dead[0].name} stopped (exit code {dead[0].exitcode})") \
                        from None
                if waited >= timeout:
                    raise AltI2VError(f"the reader processes did not answer in {timeout:.0f} s") from None

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in getattr(self, "_procs", []):
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
        self._procs = []

    def __enter__(self) -> "ReaderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SharedBatches:
    """``slots`` uint8 batch buffers ``(batch, S, S, 3)`` in one shared-memory block the readers write."""

    def __init__(self, slots: int, batch_size: int, image_size: int):
        self.shape = (int(slots), int(batch_size), int(image_size), int(image_size), 3)
        self._shm = shared_memory.SharedMemory(create=True, size=int(np.prod(self.shape)))
        self.name = self._shm.name
        self.array = np.ndarray(self.shape, np.uint8, buffer=self._shm.buf)

    def close(self) -> None:
        if self._shm is not None:
            del self.array
            self._shm.close()
            self._shm.unlink()
            self._shm = None


def _reader_main(index: int, shard_paths: dict[int, str], tasks: Any, results: Any, parent: int) -> None:
    """A reader process: open its shards, then serve read requests until told to stop or orphaned."""
    try:
        stores = {int(s): Store(p, lock=False) for s, p in shard_paths.items()}  # the parent holds the lock
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("error", index, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", index, None))
    views: dict[str, tuple[Any, np.ndarray]] = {}
    count = len(stores)
    try:
        while True:
            try:
                msg = tasks.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    return
                continue
            if msg is None:
                return
            if msg[0] == "forget":
                shm, arr = views.pop(msg[1], (None, None))
                if shm is not None:
                    del arr
                    shm.close()
                continue
            _, job, name, shape, slot, positions, keys = msg
            if name not in views:
                shm = shared_memory.SharedMemory(name=name)  # spawn shares the parent's resource tracker
                views[name] = (shm, np.ndarray(shape, np.uint8, buffer=shm.buf))
            out = views[name][1][slot]
            bad: list[tuple[int, str]] = []
            try:
                if count == 1:
                    store = next(iter(stores.values()))
                    ok = store.read_into(keys, out, at=positions)
                    bad = [(p, store.bad.pop(k, "")) for p, k, good in zip(positions, keys, ok) if not good]
                else:
                    from ..store.layout import shard_of

                    total = stores[next(iter(stores))].meta.get("shards", 1)
                    groups: dict[int, list[int]] = {}
                    for j, key in enumerate(keys):
                        groups.setdefault(shard_of(key, total), []).append(j)
                    for shard, js in groups.items():
                        ok = stores[shard].read_into([keys[j] for j in js], out, at=[positions[j] for j in js])
                        bad += [(positions[j], stores[shard].bad.pop(keys[j], "")) for j, good in zip(js, ok)
                                if not good]
            except KeyError as e:
                results.put(("error", index, f"record {e} is not in the store (was it rebuilt while reading?)"))
                return
            results.put(("done", index, (job, bad)))
    finally:
        for shm, arr in views.values():
            del arr
            shm.close()
        for st in stores.values():
            st.close()


__all__ = ["ReaderPool", "SharedBatches"]
