"""Ready models of other tools, used as they lie on disk: WD14 / wd-v3 tagger folders (``model.onnx`` +
``selected_tags.csv``) and DeepDanbooru projects (``project.json``, ``tags.txt``, ``model-<model>.h5``).

:func:`detect` tells the three kinds of model directory apart by their files (an alt-i2v model, a WD14
folder, a DeepDanbooru project) and names every missing file when a folder is none of them;
:func:`read_ready` reads a ready model's tags, categories, input size and default thresholds into a
:class:`ReadyFiles`, whose ``runner()`` loads the network itself. Each family keeps its own input
conventions (documented in docs/ready-models.md): WD14 takes BGR float32 0-255 padded to a white square,
DeepDanbooru RGB in [0, 1].
"""

from __future__ import annotations

import os

from ..errors import AltI2VError
from .files import ALT_I2V, DEEPDANBOORU, FAMILIES, WD14, ReadyFiles, detect, is_ready


def read_ready(path: str | os.PathLike) -> ReadyFiles:
    """The ready model at ``path`` (a WD14 folder or a DeepDanbooru project), its files read and checked."""
    family = detect(path)
    if family == WD14:
        from .wd14 import read_wd14

        return read_wd14(path)
    if family == DEEPDANBOORU:
        from .deepdanbooru import read_project

        return read_project(path)
    raise AltI2VError(f"{path}: an alt-i2v model directory, not a WD14 folder or a DeepDanbooru project")


__all__ = ["detect", "is_ready", "read_ready", "ReadyFiles", "FAMILIES", "ALT_I2V", "WD14", "DEEPDANBOORU"]
