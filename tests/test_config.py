"""Every config dataclass round-trips: ``from_config(get_config())`` and through JSON text give it back equal."""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

import alt_i2v
from alt_i2v.config import BuildConfig, ImageConfig, JsonConfig, ModelConfig, TrainConfig, VocabConfig

# Settings unlike the defaults, with tuples and None/str unions, so a lossy round trip shows
SAMPLES = {
    ImageConfig: ImageConfig(image_size=224, resize="crop", max_pixels=1000, pad_color=(0, 0, 0)),
    VocabConfig: VocabConfig(size=10, min_count=3, categories=("general", "artist")),
    BuildConfig: BuildConfig(image_size=64, resize="stretch", workers=3, batch_size=8, val_fraction=0.2,
                             test_fraction=0.05),
    ModelConfig: ModelConfig(backbone="tiny", num_tags=7, image_size=48, weights=None, frozen=0, dense_units=32,
                             pooling="avg", dropout=0.25, filters=(8, 16)),
    TrainConfig: TrainConfig(epochs=3, batch_size=4, lr=0.01, loss="asl", patience=0, mixed_precision="bfloat16",
                             workers=2, augment=False, zoom=0.0, seed=9, min_positives=1, steps_per_epoch=5),
}


def _all_config_classes() -> list[type]:
    """Every JsonConfig subclass in the package (modules are imported so none is missed)."""
    for mod in pkgutil.walk_packages(alt_i2v.__path__, "alt_i2v."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    found, todo = [], list(JsonConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted(set(found), key=lambda c: c.__qualname__)


CLASSES = _all_config_classes()


def test_every_known_config_class_is_found():
    assert set(SAMPLES) <= set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_round_trips(cls):
    for config in (cls(), SAMPLES.get(cls)):
        if config is None:
            continue
        data = config.get_config()
        assert cls.from_config(data) == config
        assert cls.from_json(json.dumps(data)) == config  # tuples survive JSON's lists
        assert cls.from_config({**data, "a_later_field": 1}) == config  # unknown keys are ignored
