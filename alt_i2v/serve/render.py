"""Pictures the page shows: a Grad-CAM map coloured and laid over the upload, and index thumbnails.

Both go through the one image loader, so the overlay is the model's own view of the upload (the same
padding, crop or stretch) at a size a screen can use, and a thumbnail is refused like any upload would
be if its file is damaged or a decompression bomb.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from ..config import ImageConfig
from ..imaging import load_image

DISPLAY_SIZE = 384  # pixels of the overlay's square side
THUMB_SIZE = 192
COLORMAP = "turbo"


def colorize(heat: np.ndarray, size: int) -> np.ndarray:
    """A map (H, W) in [0, 1] resized to (size, size) and coloured: float32 RGB (size, size, 3) in [0, 1]
    plus its resized values (size, size)."""
    from matplotlib import colormaps

    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
    big = Image.fromarray(np.ascontiguousarray(np.clip(heat, 0.0, 1.0)))
    big = big.resize((size, size), Image.Resampling.BILINEAR)
    values = np.clip(np.asarray(big, dtype=np.float32), 0.0, 1.0)
    return colormaps[COLORMAP](values)[..., :3].astype(np.float32), values


def overlay_png(source: Any, heat: np.ndarray, config: ImageConfig, size: int = DISPLAY_SIZE) -> tuple[bytes, bytes]:
    """``(overlay, heatmap)`` PNG bytes: the picture as the model sees it at ``size`` pixels with the map
    blended in where it is high, and the coloured map alone with its values as alpha."""
    picture = load_image(source, size, config.resize, max_pixels=config.max_pixels,
                         pad_color=config.pad_color).astype(np.float32) / 255.0
    colors, values = colorize(heat, size)
    alpha = (0.15 + 0.6 * values)[..., None]
    blended = picture * (1.0 - alpha) + colors * alpha
    rgba = np.concatenate([colors, (0.25 + 0.75 * values)[..., None]], axis=-1)
    return _png(blended), _png(rgba)


def thumbnail_jpeg(path: str, config: ImageConfig, size: int = THUMB_SIZE) -> bytes:
    """A square JPEG of an indexed image, through the one loader (white padding keeps the aspect)."""
    arr = load_image(path, size, "pad", max_pixels=config.max_pixels, pad_color=config.pad_color)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(rgb: np.ndarray) -> bytes:
    arr = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


__all__ = ["overlay_png", "thumbnail_jpeg", "colorize", "data_url", "DISPLAY_SIZE", "THUMB_SIZE"]
