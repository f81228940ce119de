"""Train-time augmentation on the accelerator: a random horizontal flip and crop/zoom inside the compiled step.

The host only draws five integers per image (:func:`augment_params`: crop offset, crop size, flip) from
a generator seeded with ``(seed, epoch, batch)``, so a resumed run sees exactly the augmentation an
uninterrupted one would have, on any backend. The :class:`FlipCrop` layer applies them with
``keras.ops`` gathers on the uint8 batch (nearest neighbour, the crop scaled back to the full size).

Training fits :func:`training_model`, a wrapper ``{"image", "augment"} -> FlipCrop -> tagger`` that shares
the tagger's weights; the tagger alone (no augmentation in it) is what gets saved for inference.
``FlipCrop`` is also the identity when called with ``training=False`` (validation), whatever the params.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops

PACKAGE = "alt_i2v"
NUM_PARAMS = 5  # per image: crop top, crop left, crop height, crop width, flip (0/1)


def augment_params(n: int, size: int, *, seed: int, epoch: int, index: int, zoom: float = 0.15,
                   flip: bool = True) -> np.ndarray:
    """``(n, 5)`` int32 flip/crop parameters of batch ``index`` of ``epoch``: a function of those only.

    Each image gets a random ``S / z`` square (``z`` uniform in ``[1, 1 + zoom]``) at a random place, and
    a coin flip for the mirror image.
    """
    rng = np.random.default_rng([int(seed), int(epoch), int(index), 1])
    z = rng.uniform(1.0, 1.0 + zoom, n) if zoom > 0 else np.ones(n)
    crop = np.clip(np.round(size / z), 1, size).astype(np.int64)
    off_y = (rng.random(n) * (size - crop + 1)).astype(np.int64)
    off_x = (rng.random(n) * (size - crop + 1)).astype(np.int64)
    mirror = (rng.random(n) < 0.5) if flip else np.zeros(n, bool)
    return np.stack([off_y, off_x, crop, crop, mirror.astype(np.int64)], axis=1).astype(np.int32)


def identity_params(n: int, size: int) -> np.ndarray:
    """Parameters that leave every image as it is (the whole image, not mirrored)."""
    out = np.zeros((n, NUM_PARAMS), np.int32)
    out[:, 2:4] = size
    return out


def _indices(params: Any, h: int, w: int, xp: Any) -> tuple[Any, Any]:
    """Source rows ``(n, h)`` and columns ``(n, w)`` of every output pixel (``xp``: numpy or keras.ops)."""
    oy, ox, ch, cw, mirror = (params[:, i] for i in range(NUM_PARAMS))
    rows = oy[:, None] + (xp.arange(h, dtype="int32")[None, :] * ch[:, None]) // h
    cols = ox[:, None] + (xp.arange(w, dtype="int32")[None, :] * cw[:, None]) // w
    cols = xp.where(mirror[:, None] > 0, xp.flip(cols, axis=1), cols)
    return rows, cols


def flip_crop(images: Any, params: Any) -> Any:
    """Apply :func:`augment_params` output to a ``(n, H, W, C)`` batch with keras.ops (two gathers)."""
    h, w = int(images.shape[1]), int(images.shape[2])
    rows, cols = _indices(ops.cast(params, "int32"), h, w, ops)
    x = ops.take_along_axis(images, rows[:, :, None, None], axis=1)
    return ops.take_along_axis(x, cols[:, None, :, None], axis=2)


def flip_crop_numpy(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The same transformation on the host (NumPy): the reference the tests hold :func:`flip_crop` to."""
    n, h, w = images.shape[:3]
    rows, cols = _indices(np.asarray(params, np.int32), h, w, np)
    return images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


@keras.saving.register_keras_serializable(package=PACKAGE)
class FlipCrop(layers.Layer):
    """``(images, params) -> images`` flipped and cropped/zoomed per image when training, else unchanged."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = False

    def call(self, images, params, training=None):
        if not training:
            return images
        return flip_crop(images, params)

    def compute_output_shape(self, images_shape, params_shape=None):
        return images_shape

    def compute_output_spec(self, images, params, training=None):
        return keras.KerasTensor(images.shape, dtype=images.dtype)


def training_model(model: keras.Model) -> keras.Model:
    """The model ``fit`` trains: inputs ``{"image", "augment"}``, :class:`FlipCrop`, then ``model`` itself
    (a nested layer, so its weights are shared and it is saved for inference on its own)."""
    spec = model.inputs[0]
    image = keras.Input(tuple(spec.shape[1:]), dtype=spec.dtype, name="image")
    params = keras.Input((NUM_PARAMS,), dtype="int32", name="augment")
    x = FlipCrop(name="flip_crop")(image, params)
    return keras.Model({"image": image, "augment": params}, model(x), name=f"{model.name}_train")


def tagger_of(model: keras.Model) -> keras.Model:
    """The tagger inside a :func:`training_model` (or ``model`` itself when it is one already)."""
    if not any(isinstance(layer, FlipCrop) for layer in model.layers):
        return model
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(inner) != 1:
        raise ValueError(f"{model.name}: expected one nested tagger in the training model, found {len(inner)}")
    return inner[0]


__all__ = ["augment_params", "identity_params", "flip_crop", "flip_crop_numpy", "FlipCrop", "training_model",
           "tagger_of", "NUM_PARAMS"]
