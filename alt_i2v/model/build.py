"""The tagging network: a backbone registry, the reference VGG16 tagger, losses, embeddings, loading.

The reference model (the default) is the original alt-i2v design::

    RGB 0-255 -> Preprocess (VGG "caffe": RGB->BGR, mean subtraction) -> VGG16 conv base (first 12
    layers frozen) -> BatchNormalization -> Dense 2048 relu on each position of the 4x4 map ("features")
    -> Flatten -> Dense num_tags sigmoid ("tags", float32)

149,989,184 parameters at 150px with 4096 tags. Every backbone in :data:`BACKBONES` plugs into the same
head; ``tiny`` is a small CNN that trains in seconds on a CPU. Only ``keras`` and ``keras.ops`` are used,
so the same code runs under the TensorFlow, JAX and torch backends.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import keras
from keras import layers, ops

from ..config import ModelConfig
from ..data.layout import MODEL_FILE
from ..errors import AltI2VError, UsageError

PACKAGE = "alt_i2v"

# ---------------------------------------------------------------------------------------------------------
# Backbone registry


@dataclass(frozen=True)
class Backbone:
    """One registry entry: how to build a trunk and the input config its weights expect."""

    name: str
    app: str | None  # keras.applications constructor; None = built here (tiny)
    preprocess: str  # Preprocess mode: caffe, tf, torch, raw, unit
    image_size: int  # default input side
    min_size: int
    pooling: str = "avg"  # head: "flatten" the feature map, or global "avg" / "avgmax" pool it
    dense_units: int = 2048  # width of the per-position "features" Dense (= embedding size)
    frozen: int = 0  # default frozen backbone layers when pretrained weights are used
    weights_file: str | None = None  # keras cache file name of the notop ImageNet weights
    weights_origin: str | None = None
    weights_hash: str | None = None
    dropout: float = 0.0  # default dropout before the tags layer
    lr: float = 1e-3  # default peak learning rate (training setting, but it depends on the network)
    trunk: str | None = None  # tiny's default design (resnet or plain); None for the keras.applications ones
    stem: int | None = None  # tiny resnet: its stride-2 convs before the first pool (ModelConfig.stem)

    @property
    def pretrained(self) -> bool:
        return self.app is not None

    def input_config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "min_size": self.min_size, "preprocess": self.preprocess,
                "dtype": "uint8", "range": "RGB 0-255"}


_KA = "https://storage.googleapis.com/tensorflow/keras-applications/"
BACKBONES: dict[str, Backbone] = {b.name: b for b in [
    Backbone("vgg16", "VGG16", "caffe", 150, 32, "flatten", 2048, 12,
             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
             _KA + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
    Backbone("vgg19", "VGG19", "caffe", 150, 32, "flatten", 2048, 12,
             "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
             _KA + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "253f8cb515780f3b799900260a226db6"),
    Backbone("resnet50", "ResNet50", "caffe", 224, 32, "avg", 2048),
    Backbone("resnet50v2", "ResNet50V2", "tf", 224, 32, "avg", 2048),
    Backbone("mobilenet_v2", "MobileNetV2", "tf", 224, 32, "avg", 1024),
    Backbone("efficientnet_b0", "EfficientNetB0", "raw", 224, 32, "avg", 1280),
    Backbone("densenet121", "DenseNet121", "torch", 224, 32, "avg", 1024),
    Backbone("convnext_tiny", "ConvNeXtTiny", "raw", 224, 32, "avg", 768),
    Backbone("xception", "Xception", "tf", 299, 71, "avg", 2048),
    Backbone("inception_v3", "InceptionV3", "tf", 299, 75, "avg", 2048),
    Backbone("tiny", None, "unit", 64, 16, "flatten", 256, 0, dropout=0.2, lr=3e-3, trunk="resnet", stem=1),
    # a DeepDanbooru project's network (--init-from PROJECT: weights = the project), fine-tuned gently
    Backbone("deepdanbooru", None, "unit", 512, 32, "avg", 0, 0, lr=1e-4),  # 0 units: the trunk's own width
]}
FROM_PROJECT = "deepdanbooru"


def get_backbone(name: str) -> Backbone:
    """Registry lookup; ``VGG16``, ``mobilenet-v2`` and ``MobileNetV2`` all name an entry."""
    key = str(name).strip().lower().replace("-", "_")
    if key in BACKBONES:
        return BACKBONES[key]
    flat = key.replace("_", "")
    for b in BACKBONES.values():
        if flat in (b.name.replace("_", ""), (b.app or "").lower()):
            return b
    raise UsageError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def tiny_filters(image_size: int, trunk: str = "resnet") -> tuple[int, ...]:
    """Conv widths of ``tiny``: one per halving of the image side down to a ~4x4-6x6 map.

    plain: 16, 32, 64, 128 (capped); resnet: 24, 32, 64, 128 (capped), its first two strided convs.
    """
    blocks, s = 0, image_size
    while s > 6 and blocks < 6:
        s //= 2
        blocks += 1
    widths = [min(16 * 2 ** i, 128) for i in range(max(blocks, 2))]
    if trunk == "resnet":
        widths[0] = 24
    return tuple(widths)


# ---------------------------------------------------------------------------------------------------------
# Custom layers and losses (registered: a saved model loads with safe_mode=True)

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


# ---------------------------------------------------------------------------------------------------------
# Weights: validated before anything is built


def keras_cache_dir() -> Path:
    """Where keras.utils.get_file keeps downloaded weights (same rule as Keras): $KERAS_HOME/models, else
    ~/.keras/models, or /tmp/.keras/models when that is not writable."""
    base = os.environ.get("KERAS_HOME")
    if not base:
        home = os.path.expanduser("~")
        base = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    base = os.path.expanduser(base)
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return Path(base) / "models"


def _offline_message(bb: Backbone, file: str, origin: str | None, why: str) -> str:
    where = keras_cache_dir()
    return (f"cannot get the ImageNet weights of {bb.name} ({why}). Download {file}"
            + (f" from {origin}" if origin else "") +
            f" on a machine with internet access and put it in {where}/ (~/.keras/models/, or "
            f"$KERAS_HOME/models/ when KERAS_HOME is set); or pass --weights PATH/TO/{file}; or train "
            "from scratch with --weights none")


def resolve_weights(weights: Any, backbone: str | Backbone = "vgg16") -> str | None:
    """Check ``weights`` before building: "imagenet" (fetched once into the Keras cache, a clear error
    offline), None/"none", or an existing weights file. Returns "imagenet", None or an absolute path."""
    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    if bb.name == FROM_PROJECT:
        from ..ready.deepdanbooru import check_project

        if weights is None or not isinstance(weights, (str, os.PathLike)):
            raise UsageError("the deepdanbooru backbone starts from a DeepDanbooru project: --init-from PROJECT")
        return check_project(weights)
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in ("none", "", "random")):
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise UsageError(f"weights must be 'imagenet', 'none' or a file path, got {weights!r}")
    text = os.fspath(weights)
    if text.strip().lower() == "imagenet":
        if not bb.pretrained:
            raise UsageError(f"the {bb.name} backbone has no pretrained weights; use --weights none")
        if bb.weights_file:
            target = keras_cache_dir() / bb.weights_file
            if not target.exists():
                try:
                    keras.utils.get_file(bb.weights_file, bb.weights_origin, cache_subdir="models",
                                         file_hash=bb.weights_hash)
                except Exception as e:  # noqa: BLE001 - urllib/socket/hash errors all mean the same here
                    raise AltI2VError(_offline_message(bb, bb.weights_file, bb.weights_origin,
                                                       f"{type(e).__name__}: {e}")) from None
        return "imagenet"
    path = Path(text).expanduser()
    if not path.is_file():
        raise UsageError(f"weights file {path} not found; pass 'imagenet', 'none' or an existing .h5 file")
    if not path.name.endswith((".h5", ".hdf5", ".keras")):
        raise UsageError(f"weights file {path} should be a Keras .h5 / .weights.h5 file")
    return str(path.resolve())


def resolve_config(config: ModelConfig | None = None, *, check_weights: bool = True, warn: bool = True,
                   **kw: Any) -> ModelConfig:
    """Fill a ModelConfig's defaults from its backbone entry and check it. ``check_weights`` validates
    (and, for "imagenet", fetches once) the weights; off when rebuilding a trained architecture."""
    cfg = config if config is not None else ModelConfig(**kw)
    if config is not None and kw:
        cfg = cfg.replace(**kw)
    bb = get_backbone(cfg.backbone)
    weights = resolve_weights(cfg.weights, bb) if check_weights else cfg.weights
    size = cfg.image_size or bb.image_size
    if size < bb.min_size:
        raise UsageError(f"{bb.name} needs images of at least {bb.min_size}px, got {size}px")
    frozen = cfg.frozen
    if frozen is None:
        frozen = bb.frozen if weights is not None else 0
        if weights is None and bb.frozen and warn:
            warnings.warn(f"weights=None: freezing randomly initialised layers makes no sense, so frozen=0 "
                          f"(the {bb.name} default with pretrained weights is {bb.frozen}); pass --frozen N "
                          "to freeze anyway", UserWarning, stacklevel=3)
    elif weights is None and frozen and warn and check_weights:
        warnings.warn(f"frozen={frozen} with weights=None: those layers keep their random initial values",
                      UserWarning, stacklevel=3)
    if cfg.trunk and not bb.trunk:
        raise UsageError(f"trunk={cfg.trunk!r} applies to the tiny backbone only, not {bb.name}")
    trunk = cfg.trunk or bb.trunk
    if cfg.stem is not None and trunk != "resnet":
        raise UsageError(f"stem applies to the tiny backbone's resnet trunk only, not {bb.name} {trunk or ''}")
    stem = (bb.stem if cfg.stem is None else int(cfg.stem)) if trunk == "resnet" else None
    filters = tuple(cfg.filters) if cfg.filters else (tiny_filters(size, trunk) if trunk else None)
    dropout = bb.dropout if cfg.dropout is None else float(cfg.dropout)
    return cfg.replace(backbone=bb.name, image_size=size, weights=weights, frozen=frozen,
                       dense_units=cfg.dense_units or bb.dense_units or None, pooling=cfg.pooling or bb.pooling,
                       filters=filters, dropout=dropout, trunk=trunk, stem=stem)


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
        trunk = _tiny_trunk(size, tuple(cfg.filters), cfg.trunk or "plain", 2 if cfg.stem is None else int(cfg.stem))
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
            raise AltI2VError(_offline_message(bb, os.path.basename(origin), origin, str(e))) from None
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


def load_model(path: str | os.PathLike) -> keras.Model:
    """Load ``MODEL/model.keras`` (or a ``.keras`` file) with safe_mode=True, uncompiled, for inference."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.exists():  # there but not a regular file: check_keras_file says so
        hint = (" (a training run there has not finished: continue it with --train --resume)"
                if (path / "checkpoints").is_dir() else "; train one with --train")
        raise AltI2VError(f"{file}: no model file{hint}")
    check_keras_file(file)
    try:
        return keras.saving.load_model(file, safe_mode=True, compile=False)
    except Exception as e:  # noqa: BLE001 - corrupt zip, foreign file, newer format
        raise AltI2VError(f"{file}: cannot load the model ({type(e).__name__}: {e})") from None


def check_keras_file(file: Path) -> None:
    """What is wrong with a ``.keras`` file, in words, before Keras says "File not found" about a file that
    is there: empty, not a regular file, not a zip archive (truncated or another kind of file), a damaged
    archive, or one without the model's config."""
    import zipfile

    from ..fsutil import NotRegularFile, open_regular

    try:
        with open_regular(file) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise AltI2VError(f"{file}: the model file is empty (0 bytes); copy it again, or train again")
            if not zipfile.is_zipfile(f):
                raise AltI2VError(f"{file}: not a Keras model file ({size:,} bytes that are not a .keras zip "
                                  "archive: cut short by an interrupted copy, or another kind of file)")
            try:
                with zipfile.ZipFile(f) as z:
                    names = set(z.namelist())
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise AltI2VError(f"{file}: damaged Keras model file ({e})") from None
    except NotRegularFile as e:
        raise AltI2VError(str(e)) from None
    except PermissionError as e:
        raise AltI2VError(f"{file}: cannot read the model file ({e.strerror})") from None
    if "config.json" not in names:
        raise AltI2VError(f"{file}: a zip archive but not a Keras model file (no config.json inside)")


def count_params(model: keras.Model) -> dict[str, int]:
    """Total, trainable and non-trainable parameter counts."""
    import numpy as np

    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    total = int(sum(np.prod(v.shape) for v in model.weights))
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


__all__ = ["BACKBONES", "Backbone", "get_backbone", "build_model", "embedding_model", "embedding_dim",
           "load_model", "Preprocess", "FocalLoss", "AsymmetricLoss", "GroupSoftmaxBCE", "get_loss", "resolve_weights",
           "resolve_config", "keras_cache_dir", "count_params", "tiny_filters", "MODEL_FILE"]
