"""What a tagging call was given: one image or a batch, the files of folders, the checked options, and the
error that keeps the good results of a batch when some of its images fail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import AltI2VError, ImageLoadError, UsageError
from ..fsutil import list_image_files


class BatchImageError(AltI2VError):
    """Some images of a list could not be used. The others' results are kept in ``results`` (failed
    slots hold None, or NaN rows for embeddings); ``failures`` is ``[(index, ImageLoadError), ...]``."""

    def __init__(self, failures: list[tuple[int, ImageLoadError]], total: int, results: Any):
        self.failures = failures
        self.results = results
        shown = "; ".join(f"[{i}] {e}" for i, e in failures[:3]) + ("; ..." if len(failures) > 3 else "")
        super().__init__(f"{len(failures)} of {total} images could not be read: {shown}. The other results are "
                         "in this error's .results; errors='return' puts each error in its place instead")


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    return not hasattr(images, "__iter__")


def as_list(images: Any) -> tuple[list, bool]:
    """``(sources, single)``: a path, PIL image, array or bytes is one image; a list, tuple, iterable or
    4-D array (N, H, W, C) is a batch."""
    if _is_single(images):
        return [images], True
    return list(images), False


def list_images(paths: Sequence[str | os.PathLike], recursive: bool = False) -> list[str]:
    """Files to tag: folders expand to their image files (sorted; sub-folders with ``recursive``), files
    are kept as given whatever their extension, and missing paths are kept so they fail one by one."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(f) for f in list_image_files(path, recursive=recursive)[0])
        else:
            out.append(os.fspath(p))
    return out


def _check_errors(errors: str) -> None:
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")


def check_top_k(top_k: Any) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise UsageError(f"top_k must be a positive integer, got {top_k!r}")
    return int(top_k)
