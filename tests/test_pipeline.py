"""pipeline.py: fixed-shape batches from the store (uint8, multi-hot, sample weights), padding, per-epoch
shuffling, augmentation parameters, threads and reader processes."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from alt_i2v.training.pipeline import StoreDataset, measure_pipeline
from alt_i2v.store import multi_hot, open_store


@pytest.fixture
def store(built_data):
    s = open_store(built_data)
    yield s
    s.close()


def test_batches_are_uint8_images_and_multi_hot_labels_of_the_split(store):
    keys, labels = store.index("train")
    ds = StoreDataset(store, keys, labels, batch_size=32)
    assert len(ds) == math.ceil(len(keys) / 32) and ds.num_images == len(keys)
    x, y, w = ds[0]
    assert x["image"].dtype == np.uint8 and x["image"].shape == (32, 32, 32, 3)
    assert x["augment"].dtype == np.int32 and x["augment"].shape == (32, 5)
    assert y.dtype == np.float32 and y.shape == (32, store.num_tags)
    assert w.dtype == np.float32 and (w == 1).all()
    imgs, labs = store.get_batch(keys[:32])
    np.testing.assert_array_equal(x["image"], imgs)
    np.testing.assert_array_equal(y, multi_hot(labs, store.num_tags))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_the_last_partial_batch_is_padded_to_full_size_with_weight_zero(store):
    keys, labels = store.index("train")
    ds = StoreDataset(store, keys, labels, batch_size=32)
    real = len(keys) - 32 * (len(ds) - 1)
    assert 0 < real < 32
    x, y, w = ds[len(ds) - 1]
    assert x["image"].shape == (32, 32, 32, 3) and y.shape == (32, store.num_tags)  # one shape: one compile
    assert (w[:real] == 1).all() and (w[real:] == 0).all()
    imgs, _ = store.get_batch(keys[-real:] + keys[:32 - real])  # padding = the start of the epoch's order
    np.testing.assert_array_equal(x["image"], imgs)


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
    from alt_i2v.training.augment import identity_params

    ds = StoreDataset.from_split(store, "val", batch_size=16)
    a = ds[0][0]["image"].copy()
    ds.set_epoch(1)
    np.testing.assert_array_equal(a, ds[0][0]["image"])
    np.testing.assert_array_equal(ds[0][0]["augment"], identity_params(16, 32))
    np.testing.assert_array_equal(ds.labels_matrix(), multi_hot(store.index("val")[1], store.num_tags))


def test_augmentation_parameters_depend_only_on_seed_epoch_and_batch(store):
    keys, labels = store.index("train")
    a = StoreDataset(store, keys, labels, batch_size=16, shuffle=True, augment=True, seed=5)
    b = StoreDataset(store, keys, labels, batch_size=16, shuffle=True, augment=True, seed=5)
    np.testing.assert_array_equal(a[2][0]["augment"], b[2][0]["augment"])
    assert not np.array_equal(a[2][0]["augment"], a[3][0]["augment"])
    resumed = StoreDataset(store, keys, labels, batch_size=16, shuffle=True, augment=True, seed=5, epoch=1)
    a.set_epoch(1)  # an uninterrupted run reaching epoch 1 == a run resumed at epoch 1
    np.testing.assert_array_equal(a[2][0]["augment"], resumed[2][0]["augment"])
    np.testing.assert_array_equal(a[2][0]["image"], resumed[2][0]["image"])
    assert not np.array_equal(a[2][0]["augment"], b[2][0]["augment"])  # another epoch, other parameters
    plain = StoreDataset(store, keys, labels, batch_size=16, shuffle=True, augment=False, seed=5)
    np.testing.assert_array_equal(b[2][0]["image"], plain[2][0]["image"])  # the host never changes pixels
    np.testing.assert_array_equal(b[2][1], plain[2][1])


def test_threaded_reads_match_serial_reads(store):
    keys, labels = store.index("train")
    ds = StoreDataset(store, keys, labels, batch_size=20, workers=4)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(ds.__getitem__, range(len(ds))))
    for i, (x, y, w) in enumerate(threaded):
        sx, sy, sw = ds[i]
        np.testing.assert_array_equal(x["image"], sx["image"])
        np.testing.assert_array_equal(y, sy)
        np.testing.assert_array_equal(w, sw)
    assert measure_pipeline(ds) > 0


def test_keras_fit_sees_each_epochs_own_order_through_worker_threads(store):
    """Every batch Keras trains on in epoch e comes from epoch e's permutation (EpochSetter)."""
    import threading

    from alt_i2v.model.build import build_model
    from alt_i2v.training.pipeline import EpochSetter

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
    from alt_i2v.training.augment import training_model

    model = training_model(build_model(num_tags=store.num_tags, image_size=32, backbone="tiny", weights=None))
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
