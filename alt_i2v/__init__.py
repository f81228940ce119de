"""alt-i2v: learn to tag anime-style illustrations with many labels at once.

The package is laid out by stage (``data``, ``store``, ``model``, ``training``, ``tagging``, ``search``,
``serve``, ``demo``, ``scraper``, ``cli``; see docs/development.md). The public API is re-exported here
lazily, so ``import alt_i2v`` stays fast and does not import TensorFlow/Keras until a model is needed;
``alt_i2v.train``, ``alt_i2v.evaluate``, ``alt_i2v.explain``, ``alt_i2v.screen`` and ``alt_i2v.export``
are plain functions.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # inference and search
    "predict_tags": "tagging.tagger", "extract_embeddings": "tagging.tagger", "Tagger": "tagging.tagger",
    "SimilarityIndex": "search", "explain": "tagging.gradcam", "screen": "tagging.screening",
    "export": "tagging.exporting",
    # web page and JSON API (needs the serve extra)
    "create_app": "serve", "run_server": "serve",
    # model and training
    "build_model": "model.build", "train": "training.run", "evaluate": "training.evaluation",
    "compare": "tagging.compare",
    "load_model": "model.modeldir", "embedding_model": "model.build", "with_tta": "model.build",
    "ModelConfig": "config",
    "TrainConfig": "config", "DistConfig": "training.distribute",
    # data stages
    "scrape": "scraper", "import_folder": "data.posts", "read_posts": "data.posts", "build_vocab": "data.vocab",
    "Vocab": "data.vocab", "build_store": "store", "Store": "store", "open_store": "store",
    "load_image": "data.imaging", "run_demo": "demo", "generate_demo_dataset": "data.synthetic",
    "DataDir": "data.layout", "ModelDir": "model.modeldir",
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
