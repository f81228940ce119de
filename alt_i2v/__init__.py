"""alt-i2v: learn to tag anime-style illustrations with many labels at once.

The public API is re-exported here lazily, so ``import alt_i2v`` stays fast and does not import
TensorFlow/Keras until a model is actually needed.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # inference and search
    "predict_tags": "tagger", "extract_embeddings": "tagger", "Tagger": "tagger",
    "SimilarityIndex": "search", "explain": "explain", "screen": "screen",
    "export": "export",
    # web page and JSON API (needs the serve extra)
    "create_app": "serve", "run_server": "serve",
    # model and training
    "build_model": "model", "train": "train", "evaluate": "evaluate", "load_model": "model",
    "embedding_model": "model", "ModelConfig": "config", "TrainConfig": "config", "DistConfig": "distribute",
    # data stages
    "scrape": "scraper", "import_folder": "dataset", "read_posts": "dataset", "build_vocab": "vocab",
    "Vocab": "vocab", "build_store": "store", "Store": "store", "load_image": "imaging",
    "run_demo": "demo", "generate_demo_dataset": "demo", "DataDir": "layout", "ModelDir": "layout",
    # settings and errors
    "ImageConfig": "config", "AltI2VError": "errors", "ImageLoadError": "errors",
}

__all__ = ["__version__", *_EXPORTS]

# Functions that share their module's name: ``alt_i2v.explain`` is always the module, and the module is
# callable as its function, so ``from alt_i2v import explain; explain(...)`` and ``alt_i2v.explain.render``
# both work whatever was imported first.
_CALLABLE_MODULES = {"explain", "screen", "export", "train", "evaluate"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alt_i2v' has no attribute {name!r}")
    value = importlib.import_module(f".{module}", __name__)
    if name not in _CALLABLE_MODULES:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class CallableModule(types.ModuleType):
    """A module that, called, calls its function of the same name (see ``_CALLABLE_MODULES``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)
