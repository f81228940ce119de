"""augment.py: flip and crop/zoom inside the compiled step, the same pixels as the host reference, and an
inference model without it whose outputs do not change."""

from __future__ import annotations

import keras
import numpy as np

from alt_i2v.training.augment import (FlipCrop, augment_params, flip_crop, flip_crop_numpy, identity_params,
                             tagger_of, training_model)
from alt_i2v.model.build import build_model
from alt_i2v.model.modeldir import load_model


def _on_backend(x, p):
    return keras.ops.convert_to_numpy(flip_crop(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(p)))


def test_backend_flip_crop_gives_the_host_reference_pixels():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 24, 24, 3), dtype=np.uint8)
    p = augment_params(16, 24, seed=1, epoch=2, index=3, zoom=0.3)
    out = _on_backend(x, p)
    assert out.shape == x.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, flip_crop_numpy(x, p))
    np.testing.assert_array_equal(_on_backend(x, identity_params(16, 24)), x)


def test_flips_mirror_and_crops_zoom_without_inventing_pixels():
    x = np.zeros((64, 16, 16, 3), dtype=np.uint8)
    x[:, :, :8] = 200  # left half bright
    out = _on_backend(x, augment_params(64, 16, seed=0, epoch=0, index=0, zoom=0.0))
    flipped = [bool((o[:, 8:] == 200).all() and (o[:, :8] == 0).all()) for o in out]
    same = [bool((o == x[0]).all()) for o in out]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54

    grad = np.tile(np.arange(32, dtype=np.uint8)[None, None, :, None] * 8, (8, 32, 1, 3))
    zoomed = _on_backend(grad, augment_params(8, 32, seed=0, epoch=0, index=1, zoom=0.3, flip=False))
    rows = zoomed[:, 0, :, 0].astype(int)
    assert (np.diff(rows, axis=1) >= 0).all()  # a crop of a gradient is still increasing, not shuffled
    assert (rows[:, -1] - rows[:, 0] < 31 * 8).any()  # and some images really were zoomed in
    assert set(np.unique(zoomed)) <= set(np.unique(grad))  # nearest neighbour: no new values


def test_parameters_are_a_function_of_seed_epoch_and_batch():
    a = augment_params(32, 150, seed=7, epoch=3, index=11)
    np.testing.assert_array_equal(a, augment_params(32, 150, seed=7, epoch=3, index=11))
    for other in (dict(seed=8, epoch=3, index=11), dict(seed=7, epoch=4, index=11), dict(seed=7, epoch=3, index=12)):
        assert not np.array_equal(a, augment_params(32, 150, **other))
    oy, ox, ch, cw, flip = a.T
    assert (ch == cw).all() and (ch <= 150).all() and (ch >= round(150 / 1.15)).all()
    assert (oy + ch <= 150).all() and (ox + cw <= 150).all() and set(flip) == {0, 1}


def test_training_model_augments_only_when_training_and_saves_a_tagger_without_it(tmp_path):
    tagger = build_model(num_tags=6, image_size=24, backbone="tiny", weights=None)
    train_model = training_model(tagger)
    train_model.compile(optimizer="adam", loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    p = augment_params(8, 24, seed=0, epoch=0, index=0, zoom=0.3)
    y = (rng.random((8, 6)) < 0.3).astype("float32")
    for _ in range(3):
        train_model.train_on_batch({"image": x, "augment": p}, y)
    assert tagger_of(train_model) is tagger

    plain = keras.ops.convert_to_numpy(tagger(x, training=False))
    inference = keras.ops.convert_to_numpy(train_model({"image": x, "augment": p}, training=False))
    np.testing.assert_allclose(inference, plain, rtol=1e-5, atol=1e-6)  # params ignored at inference
    augmented = keras.ops.convert_to_numpy(tagger(flip_crop_numpy(x, p), training=False))
    assert not np.allclose(augmented, plain, atol=1e-4)  # (so the check above can fail)

    tagger.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert len(loaded.inputs) == 1 and not _has_flip_crop(loaded)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), plain, rtol=1e-5, atol=1e-6)


def _has_flip_crop(model) -> bool:
    return any(isinstance(layer, FlipCrop) or (isinstance(layer, keras.Model) and _has_flip_crop(layer))
               for layer in model.layers)
