"""Building the tagging network on a backbone of the registry (:mod:`.backbones`), and the embedding model.

The reference model (the default) is the original alt-i2v design::

    RGB 0-255 -> Preprocess (VGG "caffe": RGB->BGR, mean subtraction) -> VGG16 conv base (first 12
    layers frozen) -> BatchNormalization -> Dense 2048 relu on each position of the 4x4 map ("features")
    -> Flatten -> Dense num_tags sigmoid ("tags", float32)

149,989,184 parameters at 150px with 4096 tags. Every backbone of the registry plugs into the same head;
``tiny`` is a small CNN that trains in seconds on a CPU. The layers are :mod:`.layers`, the losses
:mod:`.losses`. Only ``keras`` and ``keras.ops`` are used, so the same code runs under the TensorFlow,
JAX and torch backends.
"""

from __future__ import annotations

import os
import re
from typing import Any

import keras
from keras import layers, ops

from ..config import TTAS, ModelConfig
from ..errors import AltI2VError, UsageError
from .backbones import FROM_PROJECT, Backbone, get_backbone, offline_message, resolve_config
from .layers import Mirror, Preprocess

# ---------------------------------------------------------------------------------------------------------
# Building


def _conv_bn(x: Any, filters: int, name: str, strides: int = 1, relu: bool = True) -> Any:
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _tiny_trunk(size: int, filters: tuple[int, ...], trunk: str = "resnet", stem: int = 2) -> keras.Model:
    """A small CNN that trains fast on a CPU; each width in ``filters`` halves the image side once.

    plain (the original 4-block CNN): per width a 3x3 conv-BN-relu then a 2x2 max-pool.
    resnet (the default, after ResNet-9): the first two widths are stride-2 3x3 conv-BN-relu (96px ->
    24x24 in two cheap steps), each further width a conv-BN-relu, a max-pool and a residual block (two
    3x3 convs and a skip connection). At 96px that is 8 convs instead of 4, a 3-4x wider receptive field,
    for about the same CPU time per image: the work moves from the 96x96 map to the small ones. ``stem``
    caps the strided convs (1: the second width works on the 48x48 map, conv, pool and residual block).
    """
    inp = keras.Input((size, size, 3), name="tiny_input")
    x = inp
    strided = min(2, len(filters) - 1) if trunk == "resnet" else 0
    strided = min(strided, int(stem))
    for i, f in enumerate(filters, start=1):
        if i <= strided:
            x = _conv_bn(x, f, f"stem{i}", strides=2)
            continue
        x = _conv_bn(x, f, f"block{i}")
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
        if trunk == "resnet":
            y = _conv_bn(x, f, f"block{i}_res1")
            y = _conv_bn(y, f, f"block{i}_res2", relu=False)
            x = layers.ReLU(name=f"block{i}_out")(layers.Add(name=f"block{i}_add")([x, y]))
    return keras.Model(inp, x, name="tiny")


def _trunk(cfg: ModelConfig, bb: Backbone, load_weights: bool) -> keras.Model:
    size = int(cfg.image_size)
    if bb.app is None:
        stem = 2 if cfg.stem is None else int(cfg.stem)
        trunk = _tiny_trunk(size, tuple(cfg.filters), cfg.trunk or "plain", stem)
    else:
        ctor = getattr(keras.applications, bb.app)
        weights = cfg.weights if (load_weights and cfg.weights == "imagenet") else None
        try:
            trunk = ctor(include_top=False, weights=weights, input_shape=(size, size, 3))
        except ValueError as e:
            raise UsageError(f"keras.applications.{bb.app} refused this configuration: {e}") from None
        except Exception as e:  # noqa: BLE001 - a download failure surfaces here for uncached backbones
            found = re.search(r"URL fetch failure on (\S+?): ", str(e))
            if not found:
                raise
            origin = found.group(1)
            raise AltI2VError(offline_message(bb, os.path.basename(origin), origin, str(e))) from None
    if load_weights and cfg.weights not in (None, "imagenet"):
        try:
            trunk.load_weights(cfg.weights)
        except Exception as e:  # noqa: BLE001 - shape/format mismatch of a user file
            raise AltI2VError(f"cannot load backbone weights from {cfg.weights} into {bb.name}: {e}. The file "
                              f"must hold the {bb.name} conv base without its top (include_top=False)") from None
    return trunk


def build_model(num_tags: int | ModelConfig = 4096, image_size: int | None = None, backbone: str = "vgg16",
                weights: str | None = "imagenet", frozen: int | None = None, *, config: ModelConfig | None = None,
                load_weights: bool = True, tag_names: Any = None, **kw: Any) -> keras.Model:
    """The tagger: RGB 0-255 ``(None, S, S, 3)`` in, ``"tags"`` sigmoid probabilities ``(None, T)`` out.

    ``image_size``/``frozen`` None take the backbone's defaults (vgg16: 150px, 12 frozen). ``frozen``
    counts the backbone's layers as Keras lists them, its InputLayer included, as the original design did
    (12 = VGG16 blocks 1-3 and block4_conv1); with ``weights=None`` the default is 0 (with a warning).
    A ``ModelConfig`` may be given instead of the arguments (first argument or ``config=``).
    ``load_weights=False`` builds the architecture only, to receive the weights of a checkpoint.
    The ``deepdanbooru`` backbone (``weights`` = a DeepDanbooru project) is the project's network with a
    head for ``num_tags`` tags; ``tag_names`` (the vocabulary) keeps the head weights of tags it knows.
    """
    if isinstance(num_tags, ModelConfig):
        config, num_tags = num_tags, None
    if config is None:
        config = ModelConfig(backbone=backbone, num_tags=int(num_tags), image_size=image_size,
                             weights=weights, frozen=frozen, **kw)
    elif kw:
        config = config.replace(**kw)
    cfg = resolve_config(config, check_weights=load_weights, warn=load_weights)
    if cfg.backbone == FROM_PROJECT:
        from ..ready.deepdanbooru import build_from_project

        return build_from_project(cfg.weights, int(cfg.num_tags), int(cfg.image_size),
                                  tag_names=tag_names if load_weights else None, frozen=int(cfg.frozen or 0))
    return _assemble(cfg, load_weights)


def _assemble(cfg: ModelConfig, load_weights: bool) -> keras.Model:
    bb = get_backbone(cfg.backbone)
    size = int(cfg.image_size)
    trunk = _trunk(cfg, bb, load_weights)
    n_frozen = min(int(cfg.frozen or 0), len(trunk.layers))
    for layer in trunk.layers[:n_frozen]:
        layer.trainable = False

    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = Preprocess(bb.preprocess, name="preprocess")(inputs)
    x = trunk(x)
    x = layers.BatchNormalization(momentum=0.9, name="bn")(x)
    x = layers.Dense(int(cfg.dense_units), activation="relu", name="features")(x)
    if cfg.pooling == "flatten":
        x = layers.Flatten(name="flatten")(x)
    elif cfg.pooling == "avgmax":  # average for area tags (hair colour), max for small local ones (eyes)
        x = layers.Concatenate(name="pool")([layers.GlobalAveragePooling2D(name="avg_pool")(x),
                                             layers.GlobalMaxPooling2D(name="max_pool")(x)])
    else:
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    if cfg.dropout:
        x = layers.Dropout(float(cfg.dropout), name="dropout")(x)
    outputs = layers.Dense(int(cfg.num_tags), activation="sigmoid", dtype="float32", name="tags")(x)
    return keras.Model(inputs, outputs, name=f"alt_i2v_{bb.name}")


def embedding_model(model: keras.Model) -> keras.Model:
    """Outputs ``[probs (N, T), embedding (N, D)]`` in one pass: the embedding is the "features" layer
    (the per-position Dense) averaged over positions; not normalised."""
    feats = model.get_layer("features").output
    emb = layers.GlobalAveragePooling2D(dtype="float32", name="embedding")(feats)
    return keras.Model(model.inputs, [model.get_layer("tags").output, emb], name=f"{model.name}_embed")


def with_tta(model: keras.Model, tta: str | None = "flip") -> keras.Model:
    """What every prediction runs (``ModelConfig.tta``): ``model`` itself for "none", or for "flip" a model
    whose outputs are the means of ``model``'s over the picture and its mirror image, output by output
    (tags, and an embedding model's embedding). Mirror images are as likely as the pictures themselves
    (training flips them), so the mean is a steadier guess; on the real faces it gained mAP on every one of
    fifteen models, for twice the compute (docs/quality.md)."""
    if tta in (None, "none"):
        return model
    if tta not in TTAS:
        raise UsageError(f"tta must be one of {', '.join(TTAS)}, got {tta!r}")
    image = keras.Input(tuple(model.inputs[0].shape[1:]), dtype=model.inputs[0].dtype, name="image")
    views = model(image), model(Mirror(name="mirror")(image))
    if isinstance(views[0], (list, tuple)):
        outputs = [layers.Average(dtype="float32", name=f"{name}_mean")([a, b])
                   for name, a, b in zip(model.output_names, *views)]
    else:
        outputs = layers.Average(dtype="float32", name="tags_mean")(list(views))
    return keras.Model(image, outputs, name=f"{model.name}_flip")


def predict_batch(model: keras.Model, batch: Any, max_batch: int = 64) -> Any:
    """``model.predict_on_batch`` with short batches zero-padded to a power of two (at most ``max_batch``):
    compiled predict functions (tf.function, jax.jit) trace once per shape, so a run over any number of
    images costs at most log2(max_batch) traces. Returns NumPy arrays (a list for several outputs)."""
    import numpy as np

    n = len(batch)
    size = min(max(max_batch, n), 1 << max(0, (n - 1).bit_length()))
    if size > n:
        batch = np.concatenate([batch, np.zeros((size - n,) + tuple(batch.shape[1:]), batch.dtype)])
    out = model.predict_on_batch(batch)
    if isinstance(out, (list, tuple)):
        return [ops.convert_to_numpy(o)[:n] for o in out]
    return ops.convert_to_numpy(out)[:n]


def embedding_dim(model: keras.Model) -> int:
    return int(model.get_layer("features").output.shape[-1])


def count_params(model: keras.Model) -> dict[str, int]:
    """Total, trainable and non-trainable parameter counts."""
    import numpy as np

    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    total = int(sum(np.prod(v.shape) for v in model.weights))
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


__all__ = ["build_model", "embedding_model", "with_tta", "embedding_dim", "predict_batch", "count_params"]
