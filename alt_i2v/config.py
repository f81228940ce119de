"""Settings as dataclasses that round-trip through JSON (``get_config`` / ``from_config``).

Each stage stores the config it ran with beside what it made (store meta, model config.json), so a
result can always be traced back to, and rebuilt from, its settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import UsageError

T = TypeVar("T", bound="JsonConfig")

RESIZE_MODES = ("pad", "stretch", "crop", "square")  # square: pad at full size, then resize (WD14)
# Danbooru's tag categories (the lists of a post's "tags"), and "rating", which a vocabulary may learn as
# tags (rating:g ...); alt_i2v.data.tags has the rest of what a tag is.
TAG_CATEGORIES = ("general", "character", "copyright", "artist", "meta")
ALL_CATEGORIES = (*TAG_CATEGORIES, "rating")
DEFAULT_CATEGORIES = TAG_CATEGORIES[:3]


class JsonConfig:
    """Mixin: ``get_config()`` gives plain JSON data, ``from_config()`` rebuilds (unknown keys ignored)."""

    def get_config(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_config(cls: type[T], config: dict[str, Any]) -> T:
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {}
        for k, v in config.items():
            if k in names:
                f = names[k]
                # JSON has no tuples: a list goes back to a tuple where the field holds one (by its default
                # or its annotation, e.g. ``tuple | None``)
                tuple_field = isinstance(f.default, tuple) or "tuple" in str(f.type)
                kwargs[k] = tuple(v) if tuple_field and isinstance(v, list) else v
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_config(json.loads(text))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# The most pixels any call may allow (Pillow's own hard limit, twice its default): a config.json or
# --max-pixels above it is capped per call, so no file can turn the decompression-bomb guard off.
MAX_PIXELS_CAP = 2 * 178_956_970


@dataclass(frozen=True)
class ImageConfig(JsonConfig):
    """How a file becomes model input; shared by build and predict so they never disagree."""

    image_size: int = 150
    resize: str = "pad"
    max_pixels: int = 178_956_970  # Pillow's default bomb limit (~13400x13400)
    pad_color: tuple = (255, 255, 255)

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if not isinstance(self.image_size, int) or not 8 <= self.image_size <= 2048:
            raise UsageError(f"image size must be an integer in 8..2048, got {self.image_size!r}")
        if int(self.max_pixels) <= 0:
            raise UsageError("max_pixels must be positive")


@dataclass(frozen=True)
class VocabConfig(JsonConfig):
    size: int = 4096
    min_count: int = 1
    categories: tuple = DEFAULT_CATEGORIES

    def __post_init__(self):
        bad = [c for c in self.categories if c not in ALL_CATEGORIES]
        if bad:
            raise UsageError(f"unknown tag categories {bad}; choose from {', '.join(ALL_CATEGORIES)}")
        if self.size < 1 or self.min_count < 1:
            raise UsageError("vocabulary size and min count must be >= 1")


@dataclass(frozen=True)
class BuildConfig(JsonConfig):
    image_size: int = 150
    resize: str = "pad"
    max_pixels: int = 178_956_970
    workers: int = 0  # 0 = number of cores
    batch_size: int = 64  # records per LevelDB WriteBatch
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def image_config(self) -> ImageConfig:
        return ImageConfig(image_size=self.image_size, resize=self.resize, max_pixels=self.max_pixels)

    def __post_init__(self):
        self.image_config()  # validates size and mode
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise UsageError("val and test fractions must be in [0, 1) and sum below 1")


def resolve_workers(workers: int | None) -> int:
    """0/None means one worker per available core."""
    if workers and workers > 0:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------
# Model and training settings (model/, training/)

LOSSES = ("bce", "focal", "asl")
OPTIMIZERS = ("adamw", "adam")
POOLINGS = ("flatten", "avg", "avgmax")
TRUNKS = ("resnet", "plain")  # designs of the tiny backbone (model/build.py)
TTAS = ("none", "flip")  # test-time augmentation: flip = the mean over the picture and its mirror image
SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = ("auto", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16", "float32", "none")


@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """The network: a backbone from the registry (model/build.py) and the tagging head on top of it.

    ``None`` fields take the backbone's default (registry entry): image size, frozen layers, width of
    the per-position "features" layer, head pooling. ``weights`` is "imagenet", None or a file path.
    """

    backbone: str = "vgg16"
    num_tags: int = 4096
    image_size: int | None = None
    weights: str | None = "imagenet"
    frozen: int | None = None
    dense_units: int | None = None
    pooling: str | None = None  # "flatten" (the reference), "avg" or "avgmax" (global average + max, concatenated)
    dropout: float | None = None  # before the tags layer; None = the backbone's default
    filters: tuple | None = None  # the tiny backbone's conv widths, one per halving of the image side
    trunk: str | None = None  # tiny only: "resnet" (the default) or "plain" (the original 4-block CNN)
    stem: int | None = None  # tiny resnet only: stride-2 convs before the first pool (None = 2; 1 = finer maps)
    tta: str | None = None  # what every prediction averages over: "flip" or "none"; None = the backbone's

    def __post_init__(self):
        if not isinstance(self.num_tags, int) or self.num_tags < 1:
            raise UsageError(f"num_tags must be a positive integer, got {self.num_tags!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or
                                            not 8 <= self.image_size <= 2048):
            raise UsageError(f"image size must be an integer in 8..2048, got {self.image_size!r}")
        if self.frozen is not None and (not isinstance(self.frozen, int) or self.frozen < 0):
            raise UsageError(f"frozen must be a non-negative integer, got {self.frozen!r}")
        if self.dense_units is not None and self.dense_units < 1:
            raise UsageError("dense_units must be >= 1")
        if self.pooling not in (None,) + POOLINGS:
            raise UsageError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.dropout is not None and not 0.0 <= float(self.dropout) < 1.0:
            raise UsageError("dropout must be in [0, 1)")
        if self.stem is not None and (not isinstance(self.stem, int) or not 0 <= self.stem <= 2):
            raise UsageError(f"stem must be 0, 1 or 2 strided convs, got {self.stem!r}")
        if self.trunk not in (None,) + TRUNKS:
            raise UsageError(f"trunk must be one of {', '.join(TRUNKS)}, got {self.trunk!r}")
        if self.tta not in (None,) + TTAS:
            raise UsageError(f"tta must be one of {', '.join(TTAS)}, got {self.tta!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelConfig":
        """As JsonConfig's; a tiny model recorded before ``trunk`` existed was the plain design, a resnet
        one recorded before ``stem`` existed had two strided convs, and a model recorded before ``tta``
        existed was calibrated on single pictures (no test-time flip)."""
        if "tta" not in config:
            config = {**config, "tta": "none"}
        if config.get("backbone") == "tiny" and "trunk" not in config:
            config = {**config, "trunk": "plain"}
        if config.get("backbone") == "tiny" and config.get("trunk") == "resnet" and "stem" not in config:
            config = {**config, "stem": 2}
        return super().from_config(config)


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """How a model is trained (recorded in MODEL/config.json; --resume reuses it)."""

    epochs: int = 8  # the cosine schedule spans them; 10 scored no better on the 15k-face benchmark (tiny)
    batch_size: int = 32
    lr: float | None = None  # peak learning rate; None = the backbone's (1e-3; 3e-3 for tiny, trained from scratch)
    loss: str = "bce"
    patience: int = 5
    monitor: str = "val_map"  # early stopping and the best checkpoint (map: mean average precision over tags)
    mixed_precision: str | None = None
    workers: int = 0  # input pipeline threads; 0 = cores
    augment: bool = True
    zoom: float = 0.15  # random crop/zoom up to this factor (train-time augmentation)
    seed: int = 0
    min_positives: int = 5  # tags with fewer validation positives get the global threshold
    steps_per_epoch: int | None = None  # None = the whole train split every epoch
    focal_gamma: float = 2.0
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    optimizer: str = "adamw"  # adamw (decoupled weight decay) or adam (the original project's)
    weight_decay: float = 0.05  # AdamW's decoupled weight decay
    schedule: str = "cosine"  # cosine: linear warm-up, then cosine decay to 1% over all epochs; or constant
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1  # bce only: targets 0/1 become s/2 and 1 - s/2 (missing tags cost less)
    group_loss: float = 1.0  # bce only: weight of a softmax term per group of exclusive tags (groups.py); 0 = off

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TrainConfig":
        """As JsonConfig's; a run recorded before ``group_loss`` existed trained without the group term."""
        if "group_loss" not in config:
            config = {**config, "group_loss": 0.0}
        return super().from_config(config)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UsageError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise UsageError(f"epochs must be >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size!r}")
        if self.lr is not None and not float(self.lr) > 0:
            raise UsageError(f"learning rate must be > 0, got {self.lr!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise UsageError(f"patience must be >= 0 (0 turns early stopping off), got {self.patience!r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(f"mixed precision must be one of {', '.join(MIXED_PRECISION)}, "
                             f"got {self.mixed_precision!r}")
        if not 0.0 <= float(self.zoom) < 1.0:
            raise UsageError("zoom must be in [0, 1)")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UsageError("steps_per_epoch must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not float(self.weight_decay) >= 0 or not float(self.warmup_epochs) >= 0:
            raise UsageError("weight decay and warm-up epochs must be >= 0")
        if not 0.0 <= float(self.label_smoothing) < 0.5:
            raise UsageError("label smoothing must be in [0, 0.5)")
        if not float(self.group_loss) >= 0:
            raise UsageError(f"group loss weight must be >= 0, got {self.group_loss!r}")


# ---------------------------------------------------------------------------------------------------------
# Web page and JSON API (serve/)


@dataclass(frozen=True)
class ServeConfig(JsonConfig):
    """``--serve``: where to listen and what an upload may be. Binds 127.0.0.1 unless told otherwise."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_bytes: int = 32 << 20  # an upload over this gets 413, before it is read into memory
    max_pixels: int | None = None  # None: the model's own decompression-bomb limit (ImageConfig.max_pixels)
    top_k: int = 12  # similar images shown per query
    max_batch: int = 32  # uploads answered by one forward pass at most
    body_timeout: float = 10.0  # seconds a request body may dawdle before it must average 8 KiB/s (else 408)

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UsageError(f"port must be an integer in 0..65535, got {self.port!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise UsageError(f"max bytes must be a positive integer, got {self.max_bytes!r}")
        if self.max_pixels is not None and (not isinstance(self.max_pixels, int) or self.max_pixels < 1):
            raise UsageError(f"max pixels must be a positive integer, got {self.max_pixels!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 100:
            raise UsageError(f"top k must be an integer in 1..100, got {self.top_k!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise UsageError(f"max batch must be >= 1, got {self.max_batch!r}")
        if isinstance(self.body_timeout, bool) or not isinstance(self.body_timeout, (int, float)) \
                or not 0 < self.body_timeout <= 3600:
            raise UsageError(f"body timeout must be a number of seconds in (0, 3600], got {self.body_timeout!r}")


__all__ = [
    "JsonConfig", "ImageConfig", "VocabConfig", "BuildConfig", "RESIZE_MODES", "TAG_CATEGORIES", "DEFAULT_CATEGORIES",
    "ALL_CATEGORIES", "resolve_workers", "field", "ModelConfig", "TrainConfig", "LOSSES",
    "MIXED_PRECISION", "OPTIMIZERS", "SCHEDULES", "POOLINGS", "TRUNKS", "TTAS", "ServeConfig",
]
