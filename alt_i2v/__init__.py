"""alt-i2v: learn to tag anime-style illustrations with many labels at once.

The public API is re-exported here lazily, so ``import alt_i2v`` stays fast and does not import
TensorFlow/Keras until a model is actually needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # inference and search
    "predict_tags": "tagger", "extract_embeddings": "tagger", "Tagger": "tagger",
    "SimilarityIndex": "search",
    # model and training
    "build_model": "model", "train": "train", "evaluate": "evaluate", "load_model": "model",
    "embedding_model": "model", "ModelConfig": "config", "TrainConfig": "config", "DistConfig": "distribute",
    # data stages
    "scrape": "scraper", "import_folder": "dataset", "read_posts": "dataset", "build_vocab": "vocab",
    "Vocab": "vocab", "build_store": "store", "Store": "store", "load_image": "imaging",
    "run_demo": "demo", "generate_demo_dataset": "demo",
    # settings and errors
    "ImageConfig": "config", "AltI2VError": "errors", "ImageLoadError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alt_i2v' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
