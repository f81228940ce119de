"""The model's own layers, registered so that a saved model loads with ``safe_mode=True``: the pixel
preprocessing that lives inside the model (RGB 0-255 in, whatever the backbone expects out), and the
mirror image of test-time augmentation."""

from __future__ import annotations

from typing import Any

import keras
from keras import layers, ops

PACKAGE = "alt_i2v"  # the registered names are alt_i2v>Preprocess, alt_i2v>FocalLoss, ...


_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Preprocess(layers.Layer):
    """RGB 0-255 (uint8 or float) to what a backbone expects, inside the model.

    Modes follow ``keras.applications.imagenet_utils``: ``caffe`` (RGB->BGR, subtract the ImageNet mean),
    ``tf`` ([-1, 1]), ``torch`` ([0, 1] then ImageNet mean/std), ``unit`` ([-1, 1], for tiny) and ``raw``
    (float 0-255, for backbones that rescale themselves).
    """

    MODES = ("caffe", "tf", "torch", "unit", "raw")

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Preprocess mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype="float32")
        elif self.mode in ("tf", "unit"):
            x = x / 127.5 - 1.0
        elif self.mode == "torch":
            x = (x / 255.0 - ops.convert_to_tensor(_TORCH_MEAN, dtype="float32")) / \
                ops.convert_to_tensor(_TORCH_STD, dtype="float32")
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Mirror(layers.Layer):
    """Images (N, H, W, C) mirrored left to right: the second view of test-time flip averaging."""

    def call(self, inputs):
        return ops.flip(inputs, axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape


__all__ = ["Preprocess", "Mirror", "PACKAGE"]
