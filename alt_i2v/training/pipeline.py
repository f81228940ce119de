"""The input pipeline: a ``keras.utils.PyDataset`` of fixed-shape batches over the store.

Every batch has the same shape, so a run compiles its train, eval and predict steps once each: the
last, partial batch is padded with the first images of the epoch's order and those get sample weight
0, as does a record that fails to decode, so neither counts in the loss (``mean_with_sample_weight``)
nor in the metrics. A batch is ``({"image": uint8 (B, S, S, 3), "augment": int32 (B, 5)}, multi-hot
float32 (B, T), weights float32 (B,))``; the images are raw (the model normalises them) and the flip
and crop/zoom run on the accelerator (:mod:`alt_i2v.training.augment`): the host only reads records.

Records are read by threads of this process (a one-shard store) or, with a :class:`ReaderPool`, by
reader processes that own the shards of a sharded store and write into shared memory (LevelDB allows
one process per database; threads stop scaling at the GIL). A record that does not decode is noted in
``store.bad`` and weighted 0. The order and the augmentation are
functions of (seed, epoch, batch index), so a resumed run sees the same batches, whichever reads them.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
from keras.callbacks import Callback
from keras.utils import PyDataset

from .augment import augment_params, identity_params
from .readers import ReaderPool, SharedBatches
from ..store import Store, multi_hot


class StoreDataset(PyDataset):
    """Fixed-shape batches of one split of the store (see the module docstring for their layout).

    ``shuffle`` reorders every epoch, ``augment`` draws flip/crop parameters per batch; ``workers``
    threads read ahead, or the processes of ``readers`` do. ``epoch`` is the epoch the next pass is,
    so a resumed run continues the same sequence of shuffles. The read-ahead is this class's own, not
    Keras' enqueuer (which, under JAX and torch, fetches batches again and trains in another order), so
    threads and reader processes give the same run on every backend.
    """

    def __init__(self, store: Store, keys: Sequence[bytes], labels: Sequence[Sequence[int]], *,
                 num_tags: int | None = None, batch_size: int = 32, shuffle: bool = False,
                 augment: bool = False, zoom: float = 0.15, seed: int = 0, epoch: int = 0,
                 workers: int = 1, max_queue_size: int = 8, steps: int | None = None,
                 readers: ReaderPool | None = None):
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=max_queue_size)
        self.threads = max(1, int(workers))
        if len(keys) != len(labels):
            raise ValueError("keys and labels differ in length")
        self.store = store
        self.keys = list(keys)
        self.labels = list(labels)
        self.num_tags = int(num_tags if num_tags is not None else store.num_tags)
        self.batch_size = int(batch_size)
        self.image_size = store.image_size
        self.shuffle, self.augment, self.zoom = shuffle, augment, float(zoom)
        self.seed, self.epoch = int(seed), int(epoch)
        self.steps = steps
        self.readers = readers
        self._order = self._make_order()
        self._lock = threading.Lock()
        self._buffer: SharedBatches | None = None
        self._scheduled: dict[int, Any] = {}  # batch index -> (slot, job) or a thread's future
        self._free: list[int] = []
        self._next = 0
        self._threads: ThreadPoolExecutor | None = None

    @classmethod
    def from_split(cls, store: Store, split: str, *, shards: Sequence[int] | None = None, **kw) -> "StoreDataset":
        """The records of ``split``; with ``shards``, only those in these shards (one training process's
        own part of a sharded store, :func:`alt_i2v.store.shards_for_process`)."""
        keys, labels = store.index(split)
        if shards is not None:
            mine = set(int(s) for s in shards)
            keep = [i for i, k in enumerate(keys) if store.shard_of(k) in mine]
            keys, labels = [keys[i] for i in keep], [labels[i] for i in keep]
        return cls(store, keys, labels, **kw)

    def __len__(self) -> int:
        n = math.ceil(len(self.keys) / self.batch_size)
        return min(n, self.steps) if self.steps else n

    @property
    def num_images(self) -> int:
        return len(self.keys)

    def _make_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.keys))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.keys))

    def batch_indices(self, index: int) -> np.ndarray:
        """Positions (in ``keys``) of the real images of batch ``index``, without the padding."""
        if index < 0 or index >= len(self):
            raise IndexError(index)
        idx = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return np.sort(idx) if self.shuffle else idx  # sorted keys read LevelDB in order

    def padded_indices(self, index: int) -> tuple[np.ndarray, int]:
        """``(positions of all batch_size images, how many are real)``: the padding repeats the start of
        the epoch's order (real images, so BatchNorm statistics stay sane) and gets weight 0."""
        idx = self.batch_indices(index)
        n = len(idx)
        if n < self.batch_size:
            idx = np.concatenate([idx, np.resize(self._order, self.batch_size - n)])
        return idx, n

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        return self.read(index)

    def read(self, index: int, lo: int = 0, hi: int | None = None
             ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Rows ``lo:hi`` of batch ``index`` exactly as they are in the whole batch (images, augmentation,
        labels, weights): the processes of a distributed run each read their slice of every batch and
        together feed what one process would."""
        idx, n = self.padded_indices(index)
        lo, hi, _ = slice(lo, hi).indices(len(idx))
        keys = [self.keys[i] for i in idx[lo:hi]]
        if (lo, hi) == (0, len(idx)):
            x, ok = self._fetch(index, keys)
        else:  # a slice: read here, without the read-ahead of whole batches
            x = np.empty((hi - lo, self.image_size, self.image_size, 3), np.uint8)
            ok = self.store.read_into(keys, x)
        y = multi_hot([self.labels[i] for i in idx[lo:hi]], self.num_tags)
        w = (np.arange(lo, hi) < n).astype(np.float32)
        w[~ok] = 0.0
        if self.augment:
            p = augment_params(self.batch_size, self.image_size, seed=self.seed, epoch=self.epoch, index=index,
                               zoom=self.zoom)[lo:hi]
        else:
            p = identity_params(hi - lo, self.image_size)
        return {"image": x, "augment": p}, y, w

    # ------------------------------------------------------------------------------ read-ahead
    def _fetch(self, index: int, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Images and the decoded-mask of batch ``index``; the batches after it are already being read
        (by ``workers`` threads, or into the shared-memory slots of the reader processes)."""
        with self._lock:
            if self.readers is not None and self._buffer is None:
                slots = max(1, min(len(self), max(4, 2 * self.readers.processes)))
                self._buffer = SharedBatches(slots, self.batch_size, self.image_size)
                self._free = list(range(slots))
            if self.readers is None and self._threads is None:
                self._threads = ThreadPoolExecutor(self.threads)
            if index not in self._scheduled:
                self._cancel()
                self._next = index
                self._schedule(index, keys)
            self._fill()
            handle = self._scheduled.pop(index)
            if self.readers is None:
                x, ok = handle.result()
            else:
                slot, job = handle
                bad = self.readers.wait(job)
                x = self._buffer.array[slot].copy()
                self._free.append(slot)
                ok = np.ones(self.batch_size, bool)
                for pos, why in bad:  # noted here as if this process had read them
                    ok[pos] = False
                    self.store.bad[keys[pos]] = why
            self._fill()
        return x, ok

    def _read(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((len(keys), self.image_size, self.image_size, 3), np.uint8)
        return x, self.store.read_into(keys, x)

    def _schedule(self, index: int, keys: list[bytes] | None = None) -> None:
        if keys is None:
            keys = [self.keys[i] for i in self.padded_indices(index)[0]]
        if self.readers is None:
            self._scheduled[index] = self._threads.submit(self._read, keys)
        else:
            slot = self._free.pop()
            self._scheduled[index] = (slot, self.readers.submit(self._buffer, slot, keys))

    def _fill(self) -> None:
        ahead = 2 * self.threads + 1
        while (self._free if self.readers is not None else len(self._scheduled) < ahead) and self._next < len(self):
            if self._next not in self._scheduled:
                self._schedule(self._next)
            self._next += 1

    def _cancel(self) -> None:
        """Forget the batches read ahead (another epoch, or an out-of-order request): wait for them to be
        written (into slots that are then free again)."""
        for handle in self._scheduled.values():
            if self.readers is None:
                handle.result()
            else:
                self.readers.wait(handle[1])
                self._free.append(handle[0])
        self._scheduled.clear()

    def close(self) -> None:
        """Stop reading ahead; free the threads or the shared-memory slots."""
        from ..errors import AltI2VError

        with self._lock:
            try:
                self._cancel()
            except (AltI2VError, KeyError):  # the readers stopped, or the store was closed: nothing is in flight
                self._scheduled.clear()
            if self._threads is not None:
                self._threads.shutdown()
                self._threads = None
            if self._buffer is not None:
                self.readers.forget(self._buffer)
                self._buffer.close()
                self._buffer = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Select the order and augmentation of ``epoch`` (:class:`EpochSetter` calls this)."""
        if int(epoch) != self.epoch:
            with self._lock:
                self._cancel()
                self.epoch = int(epoch)
                self._order = self._make_order()

    def labels_matrix(self) -> np.ndarray:
        """All labels of the split in dataset order as an ``(N, T)`` 0/1 matrix (for evaluation)."""
        return multi_hot([self.labels[i] for i in self._order], self.num_tags)


class EpochSetter(Callback):
    """Tells the datasets which epoch is starting, from Keras' own epoch index (Keras may call a
    PyDataset's ``on_epoch_end`` more than once per epoch, so counting those calls would drift)."""

    def __init__(self, *datasets: StoreDataset):
        super().__init__()
        self.datasets = datasets

    def on_epoch_begin(self, epoch, logs=None):
        for ds in self.datasets:
            ds.set_epoch(epoch)


def measure_pipeline(dataset: StoreDataset, batches: int | None = None) -> float:
    """Images per second the dataset produces on its own (no model), with its read-ahead threads or
    reader processes: for the benchmark."""
    import time

    n = min(len(dataset), batches or len(dataset))
    t0 = time.perf_counter()
    images = sum(len(dataset[i][1]) for i in range(n))
    return images / max(time.perf_counter() - t0, 1e-9)


__all__ = ["StoreDataset", "EpochSetter", "measure_pipeline"]
