"""Multi-label losses on probabilities: binary cross-entropy (the reference), focal and asymmetric (ASL),
registered so that a checkpoint with its compiled loss loads with ``safe_mode=True``."""

from __future__ import annotations

from typing import Any, Sequence

import keras
from keras import ops

from ..errors import UsageError
from .layers import PACKAGE


def _clip_probs(y_pred):
    eps = keras.config.epsilon()
    return ops.clip(ops.cast(y_pred, "float32"), eps, 1.0 - eps)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FocalLoss(keras.losses.Loss):
    """Binary focal loss on probabilities: down-weights the easy (mostly negative) labels."""

    def __init__(self, gamma: float = 2.0, name: str = "focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        p = _clip_probs(y_pred)
        y = ops.cast(y_true, "float32")
        pos = y * ops.power(1.0 - p, self.gamma) * ops.log(p)
        neg = (1.0 - y) * ops.power(p, self.gamma) * ops.log(1.0 - p)
        return -ops.mean(pos + neg, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AsymmetricLoss(keras.losses.Loss):
    """ASL (Ridnik et al. 2021): focusing ``gamma_neg`` and a probability shift ``clip`` on negatives only,
    which suits many rare tags where most labels of an image are negative."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 name: str = "asl", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma_neg, self.gamma_pos, self.clip = float(gamma_neg), float(gamma_pos), float(clip)

    def call(self, y_true, y_pred):
        p = _clip_probs(y_pred)
        y = ops.cast(y_true, "float32")
        p_neg = ops.maximum(p - self.clip, 0.0) if self.clip > 0 else p
        eps = keras.config.epsilon()
        pos = y * ops.power(1.0 - p, self.gamma_pos) * ops.log(p)
        neg = (1.0 - y) * ops.power(p_neg, self.gamma_neg) * ops.log(ops.maximum(1.0 - p_neg, eps))
        return -ops.mean(pos + neg, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gamma_neg": self.gamma_neg, "gamma_pos": self.gamma_pos,
                "clip": self.clip}


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupSoftmaxBCE(keras.losses.Loss):
    """Binary cross-entropy (with label smoothing) plus, for each group of mutually exclusive tags
    (groups.py: hair colours, eye colours), a softmax cross-entropy over the group's logits on the images
    that carry a tag of it: the tags of a group compete, so the net learns *which* colour it is, not only
    whether each one is there. The group term is summed over groups and divided by the number of tags, so
    each logit gets a softmax gradient about as strong as its binary one; ``weight`` scales it."""

    def __init__(self, groups: Sequence[Sequence[int]] = (), weight: float = 1.0, label_smoothing: float = 0.0,
                 name: str = "bce_groups", **kwargs):
        super().__init__(name=name, **kwargs)
        self.groups = [[int(i) for i in g] for g in groups]
        self.weight, self.label_smoothing = float(weight), float(label_smoothing)

    def call(self, y_true, y_pred):
        p = _clip_probs(y_pred)
        y = ops.cast(y_true, "float32")
        s = self.label_smoothing
        target = y * (1.0 - s) + 0.5 * s
        loss = -ops.mean(target * ops.log(p) + (1.0 - target) * ops.log(1.0 - p), axis=-1)
        if not self.groups or not self.weight:
            return loss
        logits = ops.log(p) - ops.log(1.0 - p)
        extra = 0.0
        for g in self.groups:
            idx = ops.convert_to_tensor(g, dtype="int32")
            zg, yg = ops.take(logits, idx, axis=-1), ops.take(y, idx, axis=-1)
            count = ops.sum(yg, axis=-1, keepdims=True)
            share = yg / ops.maximum(count, 1.0)  # two tags of the group on one image: half the target each
            ce = -ops.sum(share * ops.log_softmax(zg, axis=-1), axis=-1)
            extra = extra + ce * ops.cast(count[:, 0] > 0, "float32")
        return loss + self.weight * extra / float(y_pred.shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "groups": self.groups, "weight": self.weight,
                "label_smoothing": self.label_smoothing}


def get_loss(name: str = "bce", **params: Any) -> keras.losses.Loss:
    """``bce`` (binary cross-entropy, the reference; ``label_smoothing`` pulls its 0/1 targets inward; with
    ``groups`` of exclusive tags and a ``group_weight``, plus their softmax term: :class:`GroupSoftmaxBCE`),
    ``focal`` or ``asl``. The batch loss is the mean over the images with a non-zero sample weight, so
    padding (weight 0) changes nothing."""
    red = "mean_with_sample_weight"
    if name == "bce" and params.get("groups") and params.get("group_weight"):
        return GroupSoftmaxBCE(params["groups"], float(params["group_weight"]),
                               float(params.get("label_smoothing") or 0.0), reduction=red)
    if name == "bce":
        return keras.losses.BinaryCrossentropy(label_smoothing=float(params.get("label_smoothing") or 0.0),
                                               name="bce", reduction=red)
    if name == "focal":
        return FocalLoss(gamma=params.get("focal_gamma", 2.0), reduction=red)
    if name == "asl":
        return AsymmetricLoss(gamma_neg=params.get("asl_gamma_neg", 4.0), gamma_pos=params.get("asl_gamma_pos", 0.0),
                              clip=params.get("asl_clip", 0.05), reduction=red)
    raise UsageError(f"unknown loss {name!r}; choose bce, focal or asl")


__all__ = ["FocalLoss", "AsymmetricLoss", "GroupSoftmaxBCE", "get_loss"]
