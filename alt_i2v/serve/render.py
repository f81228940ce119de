"""Pictures the page shows: a tag's Grad-CAM map over the uploaded picture, and index thumbnails.

The map comes from :mod:`alt_i2v.tagging.gradcam` (its Grad-CAM, its way back from the model's square to the
picture, its colours); here it is only laid over the picture at a size a screen can use. Pictures are
decoded by the one image loader, so a damaged file or a decompression bomb is refused as on upload.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from ..config import ImageConfig
from ..data.imaging import load_image

DISPLAY_MIN, DISPLAY_MAX = 256, 640  # the long side of a shown heat map, in pixels
THUMB_SIZE = 192
ALPHA = 0.45  # how much of the colour map covers the picture


def display_size(width: int, height: int) -> tuple[int, int]:
    """The picture's size scaled so its long side is within [DISPLAY_MIN, DISPLAY_MAX]."""
    long_side = max(width, height)
    scale = min(max(long_side, DISPLAY_MIN), DISPLAY_MAX) / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def heat_pictures(data: bytes, cam: np.ndarray, config: ImageConfig) -> tuple[bytes, bytes, tuple[int, int]]:
    """``(overlay PNG, heat-map PNG, (width, height) of the picture)`` for a Grad-CAM map ``cam`` over the
    model's input square: the map is taken back to the whole picture (pad / crop / stretch undone) at the
    display size; the overlay is the picture with the coloured map blended in, the heat map the values
    as 8-bit grey (255 = strongest evidence)."""
    from ..tagging.gradcam import colorize, to_picture
    from ..data.imaging import open_rgb

    picture = open_rgb(data, config)
    width, height = picture.size
    dw, dh = display_size(width, height)
    shown = picture.resize((dw, dh), Image.Resampling.LANCZOS) if (dw, dh) != (width, height) else picture
    heat = to_picture(cam, dw, dh, config)
    overlay = Image.blend(shown, Image.fromarray(colorize(heat)), ALPHA)
    grey = Image.fromarray(np.clip(np.round(heat * 255.0), 0, 255).astype(np.uint8))
    return _png(overlay), _png(grey), (width, height)


def thumbnail_jpeg(path: str, config: ImageConfig, size: int = THUMB_SIZE) -> bytes:
    """A square JPEG of an indexed image, through the one loader (white padding keeps the aspect)."""
    arr = load_image(path, size, "pad", max_pixels=config.max_pixels, pad_color=config.pad_color)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


__all__ = ["heat_pictures", "thumbnail_jpeg", "display_size", "data_url", "THUMB_SIZE"]
