"""The model directory: every file named once, the one reader and the one writer of it.

``MODEL/``: ``model.keras``, ``config.json``, ``vocab.json``, ``thresholds.json``, ``history.csv``,
``curves.png``, ``checkpoints/`` (``state.json``, ``best.keras``, ``last-e<N>.keras``), ``reports/``.
docs/formats.md writes each one out. Training writes a model directory only through :class:`ModelDir`;
the tagger, evaluation, export, search and the benchmarks read it only through it (:meth:`ModelDir.read`
checks it, :func:`load_model` loads the network).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..config import ImageConfig
from ..data.layout import REPORTS_DIR, VOCAB_FILE
from ..errors import AltI2VError
from ..fsutil import atomic_copy, atomic_path, atomic_write_json, read_json_object, remove_stale_temps
from .thresholds import DEFAULT_THRESHOLD, read_thresholds

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from ..data.vocab import Vocab

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
THRESHOLDS_FILE = "thresholds.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"  # in checkpoints/: where a run stands (epoch, last and best checkpoint)
BEST_FILE = "best.keras"  # in checkpoints/: the best epoch's weights so far
CONFIG_VERSION = 1


@dataclass
class ModelFiles:
    """What a model directory holds, read and checked once (the Keras model itself loads separately)."""

    dir: "ModelDir"
    config: dict[str, Any]
    vocab: "Vocab"
    image: ImageConfig
    thresholds: dict[str, Any] | None  # None: no thresholds.json (calibration never finished)

    @property
    def tta(self) -> str:
        """What every prediction of this model averages over ("flip" or "none"; model/build.py with_tta):
        the thresholds were calibrated on the same."""
        from ..config import ModelConfig

        return str(ModelConfig.from_config(self.config.get("model") or {}).tta)


class ModelDir:
    """A model directory: every file's path, :meth:`read` to load and check it, ``write_*`` to write it."""

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
    def state_file(self) -> Path:
        return self.checkpoints / STATE_FILE

    @property
    def best_file(self) -> Path:
        return self.checkpoints / BEST_FILE

    @property
    def reports(self) -> Path:
        return self.root / REPORTS_DIR

    # -----------------------------------------------------------------------------------------------------
    # Reading

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
        from ..data.vocab import Vocab

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

    def read_thresholds(self) -> dict[str, Any] | None:
        """thresholds.json, checked; None when there is none."""
        return read_thresholds(self.thresholds_file)

    def read_state(self) -> dict[str, Any] | None:
        """checkpoints/state.json (where an interrupted run stands); None before the first epoch ended."""
        return read_json_object(self.state_file, "training state") if self.state_file.is_file() else None

    def read_history(self) -> list[dict[str, Any]]:
        """history.csv's rows (none when there is no file)."""
        from .history import read_history

        return read_history(self.history_file)

    def last_checkpoint(self) -> Path | None:
        """The newest ``checkpoints/last-e<N>.keras``, or None."""
        lasts = sorted(self.checkpoints.glob("last-e*.keras"))
        return lasts[-1] if lasts else None

    def load(self) -> "keras.Model":
        """model.keras, loaded for inference (:func:`load_model`)."""
        return load_model(self.root)

    def is_finished(self) -> bool:
        """A completed training run: model.keras, thresholds.json and a config.json that says finished."""
        if not (self.model_file.is_file() and self.thresholds_file.is_file()):
            return False
        try:
            return bool((self.read_config(required=False) or {}).get("finished"))
        except AltI2VError:
            return False

    # -----------------------------------------------------------------------------------------------------
    # Writing (every write atomic: a kill leaves the old file or the new one, never a torn one)

    def create(self) -> "ModelDir":
        """The directory and its checkpoints/, without the temporary files of writes a kill interrupted."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.root)
        return self

    def write_config(self, record: dict[str, Any]) -> Path:
        """config.json (see :func:`config_record`)."""
        return atomic_write_json(self.config_file, record)

    def write_vocab(self, vocab: "Vocab | str | os.PathLike") -> Path:
        """vocab.json: a copy of the file the model is trained with (a path), or a Vocab written out."""
        if isinstance(vocab, (str, os.PathLike)):
            return atomic_copy(vocab, self.vocab_file)
        vocab.save(self.vocab_file)
        return self.vocab_file

    def write_thresholds(self, record: dict[str, Any]) -> Path:
        """thresholds.json (a record of :func:`alt_i2v.training.thresholds.calibrate_thresholds`, or
        :func:`alt_i2v.model.thresholds.uniform_thresholds`)."""
        return atomic_write_json(self.thresholds_file, record)

    def write_model(self, model: "keras.Model | str | os.PathLike") -> Path:
        """model.keras: a Keras model saved, or a checkpoint file copied (``checkpoints/best.keras``)."""
        if isinstance(model, (str, os.PathLike)):
            return atomic_copy(model, self.model_file)
        return save_keras(model, self.model_file)

    def write_checkpoint(self, model: "keras.Model", name: str) -> Path:
        """``checkpoints/<name>`` (``best.keras``, ``last-e<N>.keras``), optimizer state included."""
        return save_keras(model, self.checkpoints / name)

    def write_state(self, state: dict[str, Any]) -> Path:
        """checkpoints/state.json."""
        return atomic_write_json(self.state_file, state)

    def write_history(self, rows: Sequence[dict[str, Any]]) -> None:
        """history.csv: one row per completed epoch."""
        from .history import write_history

        write_history(self.history_file, list(rows))

    def write_curves(self, rows: Sequence[dict[str, Any]]) -> None:
        """curves.png drawn from the history rows."""
        from .history import plot_curves

        plot_curves(list(rows), self.curves_file)

    def copy_files(self, dest: str | os.PathLike, names: Sequence[str] = (VOCAB_FILE, THRESHOLDS_FILE)
                   ) -> list[str]:
        """Copy the files ``names`` this directory has into the folder ``dest``; returns those copied."""
        copied = []
        for name in names:
            if (self.root / name).is_file():
                atomic_copy(self.root / name, Path(dest) / name)
                copied.append(name)
        return copied


def config_record(model: Any, train: Any, image: ImageConfig, vocab: "Vocab", embedding_dim: int | None,
                  **extra: Any) -> dict[str, Any]:
    """The config.json record: architecture (a ModelConfig), training settings (a TrainConfig or None),
    image settings, backend, the vocabulary's sha256 and ``extra`` (finished, scores, ...)."""
    import keras

    return {"version": CONFIG_VERSION, "model": model.get_config(),
            "train": train.get_config() if train is not None else None, "image": image.get_config(),
            "backend": keras.backend.backend(), "keras_version": keras.__version__, "num_tags": model.num_tags,
            "vocab_sha256": vocab.sha256, "embedding_dim": embedding_dim, **extra}


def save_keras(model: "keras.Model", path: str | os.PathLike) -> Path:
    """``model.save`` to a temporary name in the same directory, then rename: never a torn file."""
    with atomic_path(path, keep_suffix=True) as tmp:
        model.save(tmp)
    return Path(path)


def load_model(path: str | os.PathLike) -> "keras.Model":
    """Load ``MODEL/model.keras`` (or a ``.keras`` file) with safe_mode=True, uncompiled, for inference."""
    import keras

    from . import layers  # noqa: F401 - registers the layers a saved model names

    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.exists():  # there but not a regular file: check_keras_file says so
        hint = (" (a training run there has not finished: continue it with --train --resume)"
                if (path / CHECKPOINTS_DIR).is_dir() else "; train one with --train")
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


__all__ = ["ModelDir", "ModelFiles", "config_record", "save_keras", "load_model", "check_keras_file",
           "MODEL_FILE", "CONFIG_FILE", "THRESHOLDS_FILE", "HISTORY_FILE", "CURVES_FILE", "CHECKPOINTS_DIR",
           "STATE_FILE", "BEST_FILE", "CONFIG_VERSION"]
