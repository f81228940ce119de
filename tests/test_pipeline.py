"""pipeline.py: batches from the store (uint8, multi-hot), per-epoch shuffling, augmentation, threads."""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from alt_i2v.pipeline import StoreDataset, augment_batch, measure_pipeline  # noqa: E402
from alt_i2v.store import Store, multi_hot  # noqa: E402


@pytest.fixture
def store(built_data):
    s = Store(built_data)
    yield s
    s.close()


def test_batches_are_uint8_images_and_multi_hot_labels_of_the_split(store):
    keys, labels = store.index("train")
    ds = StoreDataset(store, keys, labels, batch_size=32)
    assert len(ds) == math.ceil(len(keys) / 32) and ds.num_images == len(keys)
    x, y = ds[0]
    assert x.dtype == np.uint8 and x.shape == (32, 32, 32, 3)
    assert y.dtype == np.float32 and y.shape == (32, store.num_tags)
    imgs, labs = store.get_batch(keys[:32])
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, multi_hot(labs, store.num_tags))
    last_x, last_y = ds[len(ds) - 1]
    assert len(last_x) == len(keys) - 32 * (len(ds) - 1) == len(last_y)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_shuffle_changes_every_epoch_covers_every_image_and_is_reproducible(store):
    keys, labels = store.index("train")

    def epoch_keys(ds):
        return [keys[i] for b in range(len(ds)) for i in ds.batch_indices(b)]

    ds = StoreDataset(store, keys, labels, batch_size=50, shuffle=True, seed=3)
    first = epoch_keys(ds)
    ds.set_epoch(1)
    second = epoch_keys(ds)
    assert sorted(first) == sorted(second) == sorted(keys)
    assert first != second
    again = StoreDataset(store, keys, labels, batch_size=50, shuffle=True, seed=3, epoch=1)
    assert epoch_keys(again) == second  # a resumed run (epoch=1) sees the same order


def test_validation_batches_are_neither_shuffled_nor_augmented(store):
    ds = StoreDataset.from_split(store, "val", batch_size=16)
    a = ds[0][0].copy()
    ds.set_epoch(1)
    np.testing.assert_array_equal(a, ds[0][0])
    np.testing.assert_array_equal(ds.labels_matrix(), multi_hot(store.index("val")[1], store.num_tags))


def test_augment_flips_and_crops_but_keeps_shape_dtype_and_content():
    rng = np.random.default_rng(0)
    x = np.zeros((64, 16, 16, 3), dtype=np.uint8)
    x[:, :, :8] = 200  # left half bright
    out = augment_batch(x, np.random.default_rng(1), zoom=0.0)
    assert out.shape == x.shape and out.dtype == np.uint8
    flipped = [bool((o[:, 8:] == 200).all() and (o[:, :8] == 0).all()) for o in out]
    same = [bool((o == x[0]).all()) for o in out]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54

    grad = np.tile(np.arange(32, dtype=np.uint8)[None, None, :, None] * 8, (8, 32, 1, 3))
    zoomed = augment_batch(grad, rng, flip=False, zoom=0.3)
    rows = zoomed[:, 0, :, 0].astype(int)
    assert (np.diff(rows, axis=1) >= 0).all()  # a crop of a gradient is still increasing, not shuffled
    assert (rows[:, -1] - rows[:, 0] < 31 * 8).any()  # and some images really were zoomed in
    assert set(np.unique(zoomed)) <= set(np.unique(grad))  # nearest neighbour: no new values


def test_augmentation_is_deterministic_per_epoch_and_batch(store):
    keys, labels = store.index("train")
    a = StoreDataset(store, keys, labels, batch_size=16, shuffle=True, augment=True, seed=5)
    b = StoreDataset(store, keys, labels, batch_size=16, shuffle=True, augment=True, seed=5)
    np.testing.assert_array_equal(a[2][0], b[2][0])
    plain = StoreDataset(store, keys, labels, batch_size=16, shuffle=True, augment=False, seed=5)
    assert not np.array_equal(a[2][0], plain[2][0])
    np.testing.assert_array_equal(a[2][1], plain[2][1])  # labels are untouched


def test_threaded_reads_match_serial_reads(store):
    keys, labels = store.index("train")
    ds = StoreDataset(store, keys, labels, batch_size=20, workers=4)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(ds.__getitem__, range(len(ds))))
    for i, (x, y) in enumerate(threaded):
        sx, sy = ds[i]
        np.testing.assert_array_equal(x, sx)
        np.testing.assert_array_equal(y, sy)
    assert measure_pipeline(ds) > 0


def test_keras_fit_sees_each_epochs_own_order_through_worker_threads(store):
    """Every batch Keras trains on in epoch e comes from epoch e's permutation (EpochSetter)."""
    import threading

    from alt_i2v.model import build_model
    from alt_i2v.pipeline import EpochSetter

    seen, lock = [], threading.Lock()

    class Logged(StoreDataset):
        def __getitem__(self, index):
            with lock:
                seen.append((self.epoch, index))
            return super().__getitem__(index)

    class Mark(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            with lock:
                seen.append(("begin", epoch))

    keys, labels = store.index("train")
    ds = Logged(store, keys, labels, batch_size=64, shuffle=True, augment=True, workers=2, epoch=1)
    model = build_model(num_tags=store.num_tags, image_size=32, backbone="tiny", weights=None)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    hist = model.fit(ds, epochs=3, initial_epoch=1, verbose=0, callbacks=[EpochSetter(ds), Mark()])
    assert len(hist.history["loss"]) == 2 and ds.epoch == 2
    current, per_epoch = None, {}
    for who, index in seen:
        if who == "begin":
            current = index
        elif current is not None:
            assert who == current
            per_epoch.setdefault(current, set()).add(index)
    assert per_epoch == {1: set(range(len(ds))), 2: set(range(len(ds)))}
