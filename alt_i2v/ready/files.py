"""Telling ready models apart by their files (:func:`detect`) and what reading one gives
(:class:`ReadyFiles`); the package docstring says what ready models are."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..config import ImageConfig
from ..errors import AltI2VError

if TYPE_CHECKING:  # pragma: no cover
    from ..data.vocab import Vocab

ALT_I2V, WD14, DEEPDANBOORU = "alt-i2v", "wd14", "deepdanbooru"
FAMILIES = (ALT_I2V, WD14, DEEPDANBOORU)
# The files that make each family, in the words the error messages use
ALT_I2V_FILES = ("model.keras", "config.json", "vocab.json")
WD14_FILES = ("model.onnx", "selected_tags.csv")
DEEPDANBOORU_FILES = ("project.json", "tags.txt", "model-<model>.h5")


@dataclass
class ReadyFiles:
    """A ready model's files, read and checked (the network itself loads with :meth:`runner`).

    ``vocab`` holds the tags in output order with their categories; ``image`` the square input size
    and fit; ``thresholds`` the family's default threshold per category; ``weights`` the file whose
    sha256 identifies the model (indexes and reports record it)."""

    family: str
    root: Path
    vocab: "Vocab"
    image: ImageConfig
    weights: Path
    thresholds: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    load: Callable[..., Any] | None = None

    def runner(self, **kw: Any) -> Any:
        """The loaded network: a Keras model (DeepDanbooru) or an :class:`~.onnxrun.OnnxRunner` (WD14)."""
        assert self.load is not None
        return self.load(self, **kw)


def _missing(root: Path, names: tuple[str, ...]) -> list[str]:
    out = []
    for name in names:
        if name == "model-<model>.h5":
            if not any(root.glob("model-*.h5")):
                out.append(name)
        elif not (root / name).is_file():
            out.append(name)
    return out


def detect(path: str | os.PathLike) -> str:
    """Which kind of model directory ``path`` is: ``"alt-i2v"``, ``"wd14"`` or ``"deepdanbooru"``, told by
    the files it holds. A folder holding some files of one family names the ones it lacks; a folder of
    none names what each family needs."""
    from ..model.modeldir import ModelDir

    root = Path(path)
    if not root.exists():
        ModelDir(root).require()  # the one message for a model directory that is not there
    if not root.is_dir():
        raise AltI2VError(f"{root}: a model is a directory, not a file (an alt-i2v model directory, a WD14 "
                          "tagger folder with model.onnx + selected_tags.csv, or a DeepDanbooru project)")

    def has(*names: str) -> bool:
        return any((root / n).exists() for n in names)

    if has("model.keras", "checkpoints", "history.csv"):
        return ALT_I2V
    # a WD14 snapshot from the hub also holds a (timm) config.json: the ready files decide first
    if has(*WD14_FILES):
        _require(root, WD14, WD14_FILES)
        return WD14
    if has("project.json", "tags.txt") or any(root.glob("model-*.h5")):
        _require(root, DEEPDANBOORU, DEEPDANBOORU_FILES)
        return DEEPDANBOORU
    if has("config.json", "vocab.json", "thresholds.json"):
        return ALT_I2V  # an incomplete alt-i2v directory: ModelDir names what is missing
    raise AltI2VError(
        f"{root}: not a model directory alt-i2v can read. It needs one of: an alt-i2v model directory "
        f"({', '.join(ALT_I2V_FILES)}; train one with --train), a WD14 tagger folder "
        f"({' + '.join(WD14_FILES)}), or a DeepDanbooru project ({', '.join(DEEPDANBOORU_FILES)})")


_HINTS = {
    "model.onnx": "the ONNX network, from the same model page as selected_tags.csv",
    "selected_tags.csv": "the tag list (columns tag_id,name,category,count), from the same model page as "
                         "model.onnx",
    "project.json": "the project settings (image_width, image_height, model, ...)",
    "tags.txt": "the tag list, one tag a line in output order",
    "model-<model>.h5": "the Keras weights named after project.json's \"model\", e.g. model-resnet_custom_v3.h5",
}
_LABEL = {WD14: "a WD14 tagger folder", DEEPDANBOORU: "a DeepDanbooru project"}


def _require(root: Path, family: str, names: tuple[str, ...]) -> None:
    missing = _missing(root, names)
    if missing:
        what = "; ".join(f"{m} is missing ({_HINTS[m]})" for m in missing)
        raise AltI2VError(f"{root}: looks like {_LABEL[family]}, but {what}")


def is_ready(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a WD14 folder or a DeepDanbooru project (and not an alt-i2v model)."""
    try:
        return detect(path) != ALT_I2V
    except AltI2VError:
        return False


__all__ = ["detect", "is_ready", "ReadyFiles", "FAMILIES", "ALT_I2V", "WD14", "DEEPDANBOORU"]
