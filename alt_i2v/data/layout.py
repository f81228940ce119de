"""The two directories every stage works in, each file named once: ``DataDir`` (a dataset) and ``ModelDir``
(a trained model). ``ModelDir.read()`` is the one place a model directory is read and checked.

``DATA/``: ``posts.jsonl`` (one post a line), ``images/<md5[:2]>/<md5>.<ext>``, ``vocab.json``, ``store/``
(LevelDB), ``reports/``, ``.scrape.lock``. ``MODEL/``: ``model.keras``, ``config.json``, ``vocab.json``, ``thresholds.json``,
``history.csv``, ``curves.png``, ``checkpoints/``, ``reports/``. docs/formats.md writes each one out.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ImageConfig
from ..errors import AltI2VError
from ..fsutil import atomic_write_bytes, image_relpath, read_json_object, safe_join

if TYPE_CHECKING:  # pragma: no cover
    from .vocab import Vocab

# DATA
POSTS_FILE = "posts.jsonl"
POSTS_LOCK = ".scrape.lock"  # held by every writer of posts.jsonl (--scrape, --import)
IMAGES_DIR = "images"
VOCAB_FILE = "vocab.json"
STORE_DIR = "store"
REPORTS_DIR = "reports"
# MODEL (and VOCAB_FILE, REPORTS_DIR)
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
THRESHOLDS_FILE = "thresholds.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"


class DataDir:
    """A dataset directory: where each of its files lives, and the one way to add an image file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    @property
    def posts(self) -> Path:
        return self.root / POSTS_FILE

    @property
    def posts_lock(self) -> Path:
        return self.root / POSTS_LOCK

    @property
    def images(self) -> Path:
        return self.root / IMAGES_DIR

    @property
    def vocab(self) -> Path:
        return self.root / VOCAB_FILE

    @property
    def store(self) -> Path:
        return self.root / STORE_DIR

    @property
    def reports(self) -> Path:
        return self.root / REPORTS_DIR

    def report(self, name: str) -> Path:
        return self.reports / f"{name}.json"

    def image_path(self, rel: str) -> Path:
        """The file a post's ``file`` names, refused (UnsafePathError) unless it lies inside ``images/``."""
        return safe_join(self.root, rel, inside=IMAGES_DIR)

    def save_image(self, data: bytes, ext: str) -> tuple[str, str]:
        """Store image bytes under their md5 (``images/<md5[:2]>/<md5>.<ext>``, written atomically; an
        identical file already there is kept). Returns ``(md5, path relative to DATA)``."""
        md5 = hashlib.md5(data).hexdigest()
        rel = image_relpath(md5, ext)
        path = self.root / rel
        if not (path.is_file() and path.stat().st_size == len(data)):
            atomic_write_bytes(path, data)
        return md5, rel


@dataclass
class ModelFiles:
    """What a model directory holds, read and checked once (the Keras model itself loads separately)."""

    dir: "ModelDir"
    config: dict[str, Any]
    vocab: "Vocab"
    image: ImageConfig
    thresholds: dict[str, Any] | None  # None: no thresholds.json (calibration never finished)


class ModelDir:
    """A model directory written by ``--train``: every file's path, and :meth:`read` to load and check it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    @property
    def model_file(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def vocab_file(self) -> Path:
        return self.root / VOCAB_FILE

    @property
    def thresholds_file(self) -> Path:
        return self.root / THRESHOLDS_FILE

    @property
    def history_file(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def curves_file(self) -> Path:
        return self.root / CURVES_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def reports(self) -> Path:
        return self.root / REPORTS_DIR

    def require(self) -> "ModelDir":
        """This directory, or a clear error when there is none."""
        if not self.root.is_dir():
            raise AltI2VError(f"{self.root}: no such model directory; train one with "
                              "`alt-i2v --train --data DIR --model DIR`")
        return self

    def read_config(self, *, required: bool = True) -> dict[str, Any] | None:
        """config.json as a dict; None when absent and not ``required``."""
        path = self.config_file
        if not path.is_file():
            if required:
                raise AltI2VError(f"{path}: missing model configuration; this is not a complete model directory "
                                  "(train one with --train, or finish an interrupted run with --train --resume)")
            return None
        return read_json_object(path, "model configuration")

    def image_config(self, config: dict[str, Any] | None = None) -> ImageConfig:
        """The image settings the model was trained with: ``config["image"]``; runs that predate it record
        only the size (``model.image_size``), with the default resize mode."""
        config = self.read_config() if config is None else config
        image = config.get("image")
        if isinstance(image, dict) and image.get("image_size"):
            return ImageConfig.from_config(image)
        size = (config.get("model") or {}).get("image_size")
        if not size:
            raise AltI2VError(f"{self.config_file}: records no image size; the model directory is incomplete")
        return ImageConfig(image_size=int(size))

    def read(self) -> ModelFiles:
        """Config, vocabulary (checked against the one the model was trained with), image settings and
        thresholds (checked; a missing thresholds.json warns, as every tag then gets the default)."""
        from ..training.thresholds import DEFAULT_THRESHOLD, read_thresholds
        from .vocab import Vocab

        self.require()
        config = self.read_config()
        vocab = Vocab.load(self.vocab_file)
        want = config.get("vocab_sha256")
        if want and want != vocab.sha256:
            raise AltI2VError(f"{self.root}: vocab.json does not match the one the model was trained with "
                              "(sha256 differs); restore the model directory's own vocab.json")
        thresholds = read_thresholds(self.thresholds_file)
        if thresholds is None:
            warnings.warn(f"{self.root}: no {THRESHOLDS_FILE} (training did not finish calibrating?); "
                          f"using {DEFAULT_THRESHOLD} for every tag", UserWarning, stacklevel=3)
        return ModelFiles(self, config, vocab, self.image_config(config), thresholds)

    def is_finished(self) -> bool:
        """A completed training run: model.keras, thresholds.json and a config.json that says finished."""
        if not (self.model_file.is_file() and self.thresholds_file.is_file()):
            return False
        try:
            return bool((self.read_config(required=False) or {}).get("finished"))
        except AltI2VError:
            return False


def store_matches(image: ImageConfig, store: Any) -> bool:
    """Whether a store's pixels are what a model trained with ``image`` expects (same size and resize)."""
    return store.image_size == image.image_size and store.resize == image.resize


__all__ = ["DataDir", "ModelDir", "ModelFiles", "store_matches", "POSTS_FILE", "POSTS_LOCK", "IMAGES_DIR", "VOCAB_FILE",
           "STORE_DIR", "REPORTS_DIR", "MODEL_FILE", "CONFIG_FILE", "THRESHOLDS_FILE", "HISTORY_FILE",
           "CURVES_FILE", "CHECKPOINTS_DIR"]
