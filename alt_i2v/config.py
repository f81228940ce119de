"""Settings as dataclasses that round-trip through JSON (``get_config`` / ``from_config``).

Each stage stores the config it ran with beside what it made (store meta, model config.json), so a
result can always be traced back to, and rebuilt from, its settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import UsageError

T = TypeVar("T", bound="JsonConfig")

RESIZE_MODES = ("pad", "stretch", "crop")
DEFAULT_CATEGORIES = ("general", "character", "copyright")
ALL_CATEGORIES = ("general", "character", "copyright", "artist", "meta", "rating")


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
                default = names[k].default
                kwargs[k] = tuple(v) if isinstance(default, tuple) and isinstance(v, list) else v
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.get_config(), indent=2)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_config(json.loads(text))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


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


def load_config(cls: type[T], path: str | Path) -> T:
    return cls.from_json(Path(path).read_text(encoding="utf-8"))


__all__ = [
    "JsonConfig", "ImageConfig", "VocabConfig", "BuildConfig", "RESIZE_MODES", "DEFAULT_CATEGORIES",
    "ALL_CATEGORIES", "resolve_workers", "load_config", "field",
]
