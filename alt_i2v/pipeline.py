"""The input pipeline: a ``keras.utils.PyDataset`` over the store, fed by threads.

LevelDB allows one process, so batches are read by a thread pool sharing one open :class:`Store`
(plyvel reads are thread-safe; msgpack decoding and numpy copies are quick). Batches are uint8
``(N, S, S, 3)`` images (the model normalises them itself) and float32 multi-hot labels. Train-time
augmentation is numpy on the whole batch: horizontal flips and a small random crop/zoom. The order and
the augmentation are functions of (seed, epoch, batch index), so threads never share a random state and
a resumed run sees the same epochs it would have seen.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .store import Store, multi_hot

from keras.callbacks import Callback
from keras.utils import PyDataset


def augment_batch(x: np.ndarray, rng: np.random.Generator, *, flip: bool = True, zoom: float = 0.15
                  ) -> np.ndarray:
    """Random horizontal flip and crop/zoom (nearest neighbour, up to ``1 + zoom``) of a uint8 batch.

    Each image is cropped to a random ``S / z`` square (``z`` in ``[1, 1 + zoom]``) at a random place and
    scaled back to ``S``: one fancy-indexing gather for the whole batch.
    """
    n, h, w = x.shape[:3]
    if n == 0:
        return x
    rows, cols = augment_indices(rng, n, h, w, flip=flip, zoom=zoom)
    return gather_rows_cols(x, rows, cols)


def augment_indices(rng: np.random.Generator, n: int, h: int, w: int, *, flip: bool = True,
                    zoom: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """The source rows ``(n, h)`` and columns ``(n, w)`` of :func:`augment_batch` for a batch of ``n``:
    drawn for the whole batch, so any slice of it can be augmented exactly as in the whole."""
    ar_h, ar_w = np.arange(h), np.arange(w)
    z = rng.uniform(1.0, 1.0 + zoom, n) if zoom > 0 else np.ones(n)
    ch = np.maximum(1, np.round(h / z)).astype(np.int64)
    cw = np.maximum(1, np.round(w / z)).astype(np.int64)
    oy = (rng.random(n) * (h - ch + 1)).astype(np.int64)
    ox = (rng.random(n) * (w - cw + 1)).astype(np.int64)
    rows = oy[:, None] + (ar_h[None, :] * ch[:, None]) // h  # (n, h)
    cols = ox[:, None] + (ar_w[None, :] * cw[:, None]) // w  # (n, w)
    if flip:
        flipped = rng.random(n) < 0.5
        cols = np.where(flipped[:, None], cols[:, ::-1], cols)
    return rows, cols


def gather_rows_cols(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return x[np.arange(len(x))[:, None, None], rows[:, :, None], cols[:, None, :]]


class StoreDataset(PyDataset):
    """Batches of one split of the store: ``(uint8 images, float32 multi-hot labels)``.

    ``shuffle`` reorders every epoch, ``augment`` flips and crops; ``workers`` threads read ahead
    (``use_multiprocessing`` is always False: LevelDB is single-process). ``epoch`` is the epoch the
    next pass is, so a resumed run continues the same sequence of shuffles.
    """

    def __init__(self, store: Store, keys: Sequence[bytes], labels: Sequence[Sequence[int]], *,
                 num_tags: int | None = None, batch_size: int = 32, shuffle: bool = False,
                 augment: bool = False, zoom: float = 0.15, seed: int = 0, epoch: int = 0,
                 workers: int = 1, max_queue_size: int = 8, steps: int | None = None):
        super().__init__(workers=max(1, int(workers)), use_multiprocessing=False,
                         max_queue_size=max_queue_size)
        if len(keys) != len(labels):
            raise ValueError("keys and labels differ in length")
        self.store = store
        self.keys = list(keys)
        self.labels = [list(x) for x in labels]
        self.num_tags = int(num_tags if num_tags is not None else store.num_tags)
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.zoom = shuffle, augment, float(zoom)
        self.seed, self.epoch = int(seed), int(epoch)
        self.steps = steps
        self._order = self._make_order()

    @classmethod
    def from_split(cls, store: Store, split: str, **kw) -> "StoreDataset":
        keys, labels = store.index(split)
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
        if index < 0 or index >= len(self):
            raise IndexError(index)
        idx = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return np.sort(idx) if self.shuffle else idx  # sorted keys read LevelDB in order

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read(index)

    def read(self, index: int, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``lo:hi`` of batch ``index``, augmented exactly as they are in the whole batch: processes
        that each read their slice of a global batch together feed what one process would."""
        idx = self.batch_indices(index)
        lo, hi, _ = slice(lo, hi).indices(len(idx))
        keys = [self.keys[i] for i in idx[lo:hi]]
        x, labels = self.store.get_batch(keys)  # a bad record is left out of both
        y = multi_hot(labels, self.num_tags)
        if self.augment and len(x):
            rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            rows, cols = augment_indices(rng, len(idx), x.shape[1], x.shape[2], zoom=self.zoom)
            kept = (np.arange(lo, hi) if len(x) == len(keys) else
                    np.array([lo + j for j, k in enumerate(keys) if k not in self.store.bad], np.int64))
            x = gather_rows_cols(x, rows[kept], cols[kept])
        return x, y

    def set_epoch(self, epoch: int) -> None:
        """Select the order and augmentation of ``epoch`` (:class:`EpochSetter` calls this)."""
        if int(epoch) != self.epoch:
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
    """Images per second the dataset produces with its own threads (no model): for the benchmark."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    n = min(len(dataset), batches or len(dataset))
    t0 = time.perf_counter()
    images = 0
    with ThreadPoolExecutor(max(1, dataset.workers)) as ex:
        for x, _ in ex.map(dataset.__getitem__, range(n)):
            images += len(x)
    return images / max(time.perf_counter() - t0, 1e-9)


__all__ = ["StoreDataset", "EpochSetter", "augment_batch", "augment_indices", "measure_pipeline"]
