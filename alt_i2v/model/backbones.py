"""The backbone registry (``vgg16`` by default, ``tiny`` for CPUs and tests, other keras.applications
trunks), each with the input its weights expect, and the weights check before anything is built:
"imagenet" fetched once into the Keras cache (a clear error offline), none, or a weights file."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from ..config import ModelConfig
from ..errors import AltI2VError, UsageError


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
    tta: str = "none"  # test-time augmentation every prediction of a new model averages over (ModelConfig.tta)

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
    Backbone("tiny", None, "unit", 64, 16, "flatten", 256, 0, dropout=0.2, lr=3e-3, trunk="resnet", stem=1,
             tta="flip"),
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


def offline_message(bb: Backbone, file: str, origin: str | None, why: str) -> str:
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
                    raise AltI2VError(offline_message(bb, bb.weights_file, bb.weights_origin,
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
                       filters=filters, dropout=dropout, trunk=trunk, stem=stem, tta=cfg.tta or bb.tta)


__all__ = ["Backbone", "BACKBONES", "FROM_PROJECT", "get_backbone", "tiny_filters", "keras_cache_dir",
           "resolve_weights", "resolve_config", "offline_message"]
