"""The one image loader: any file an illustration collection holds becomes a uint8 square RGB array.

``--build`` and prediction both call :func:`load_image`, so training and serving see identical pixels.
It orients by EXIF, flattens transparency on white, converts every mode to 8-bit RGB, takes the first
frame of animations, refuses decompression bombs from the header alone, and lets the JPEG decoder scale
down while decoding (``draft``), which is most of the speed of a build.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..config import MAX_PIXELS_CAP, RESIZE_MODES, ImageConfig
from ..errors import ImageLoadError

DEFAULT_MAX_PIXELS = ImageConfig.max_pixels
WHITE = (255, 255, 255)
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp",
              "TIFF": "tiff"}

# Our own header check below is the bomb guard; Pillow's warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray


def describe(source: ImageSource) -> str:
    """A short name for a source, for error messages and reports."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL {source.mode} {source.size[0]}x{source.size[1]}>"
    return f"<{type(source).__name__}>"


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    raise ImageLoadError("bad_array", f"array of shape {arr.shape} is not an HxW, HxWx3 or HxWx4 image")


def _open(source: ImageSource) -> Image.Image:
    """Open lazily (header only) from any supported source, mapping failures to ImageLoadError."""
    name = describe(source)
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _array_to_pil(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageLoadError("empty", "empty image data (0 bytes)")
        fp: Any = io.BytesIO(data)
        head = data[:512]
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError("missing", f"{name}: file not found")
        if not path.is_file():
            raise ImageLoadError("unreadable", f"{name}: not a regular file")
        try:
            if path.stat().st_size == 0:
                raise ImageLoadError("empty", f"{name}: empty file (0 bytes)")
            with open(path, "rb") as f:
                head = f.read(512)
        except PermissionError as e:
            raise ImageLoadError("unreadable", f"{name}: {e.strerror or e}") from None
        fp = path
    else:
        raise ImageLoadError("bad_input", f"cannot load an image from {type(source).__name__}; "
                                          "give a path, bytes, a PIL image or a uint8 array")
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageLoadError("too_large", f"{name}: refused, {e}") from None
    except UnidentifiedImageError:
        lowered = head.lstrip().lower()
        if lowered.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in lowered:
            raise ImageLoadError("html", f"{name}: this is an HTML page, not an image "
                                         "(a failed or blocked download saved under an image name?)") from None
        raise ImageLoadError("not_an_image", f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError("corrupt", f"{name}: unreadable image header ({e})") from None


def _check_size(img: Image.Image, max_pixels: int, name: str) -> None:
    """The bomb guard, from the header: at most ``max_pixels``, never more than MAX_PIXELS_CAP (this call
    only: Pillow's process-wide limit is never changed)."""
    max_pixels = min(int(max_pixels), MAX_PIXELS_CAP)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageLoadError("corrupt", f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageLoadError("too_large", f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of "
                                          f"{max_pixels:,} (a decompression bomb?); raise max_pixels to allow it")


def _target_scale(w: int, h: int, size: int, resize: str) -> tuple[float, float]:
    if resize == "stretch":
        return size / w, size / h
    s = size / max(w, h) if resize in ("pad", "square") else size / min(w, h)
    return s, s


def _to_rgb(img: Image.Image, pad_color: Sequence[int]) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on ``pad_color`` (white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr.astype(np.float32) / 257.0
        elif mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
        or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, tuple(pad_color) + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def fit_geometry(w: int, h: int, size: int, resize: str) -> tuple[int, int, int, int]:
    """How a ``w`` x ``h`` picture becomes the ``size`` square: it is resized to ``(nw, nh)``, then, for
    ``pad``, pasted at ``(dx, dy)`` of the square, for ``crop``, the square is cut at ``(dx, dy)`` of it.
    Returns ``(nw, nh, dx, dy)``; heat maps use it to go back from the square to the picture."""
    sx, sy = _target_scale(w, h, size, resize)
    nw, nh = max(1, round(w * sx)), max(1, round(h * sy))
    if resize == "stretch":
        return size, size, 0, 0
    if resize == "square":  # padded to a max(w, h) square first: the same place, rounded on the square
        m = max(w, h)
        return nw, nh, round((m - w) // 2 * size / m), round((m - h) // 2 * size / m)
    if resize == "crop":
        nw, nh = max(nw, size), max(nh, size)
        return nw, nh, (nw - size) // 2, (nh - size) // 2
    return nw, nh, (size - nw) // 2, (size - nh) // 2


def _fit(img: Image.Image, size: int, resize: str, pad_color: Sequence[int]) -> Image.Image:
    w, h = img.size
    if resize == "square":  # the WD14 taggers' own order: pad to a square at full size, then bicubic
        m = max(w, h)
        if (w, h) != (m, m):
            canvas = Image.new("RGB", (m, m), tuple(pad_color))
            canvas.paste(img, ((m - w) // 2, (m - h) // 2))
            img = canvas
        return img.resize((size, size), Image.Resampling.BICUBIC) if m != size else img
    nw, nh, dx, dy = fit_geometry(w, h, size, resize)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if resize == "pad" and (nw, nh) != (size, size):
        canvas = Image.new("RGB", (size, size), tuple(pad_color))
        canvas.paste(img, (dx, dy))
        return canvas
    if resize == "crop" and (nw, nh) != (size, size):
        return img.crop((dx, dy, dx + size, dy + size))
    return img


def load_image(source: ImageSource, image_size: int = 150, resize: str = "pad", *,
               max_pixels: int = DEFAULT_MAX_PIXELS, pad_color: Sequence[int] = WHITE) -> np.ndarray:
    """Decode ``source`` (path, bytes, PIL image or array) into a uint8 ``(size, size, 3)`` RGB array.

    ``resize``: ``pad`` keeps the aspect and pads to a square (default), ``stretch`` ignores the aspect
    (the original design), ``crop`` fills the square and cuts the centre, ``square`` pads to a square at
    full size and then resizes it (bicubic, no draft decoding: the WD14 taggers' preprocessing). Raises
    ImageLoadError with a ``reason`` code (missing, empty, html, not_an_image, truncated, corrupt, too_large,
    ...).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    img = _decode(source, max_pixels, pad_color, (image_size, resize))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (image_size, image_size, 3):  # pragma: no cover - defensive
        raise ImageLoadError("corrupt", f"{describe(source)}: decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def _decode_error(name: str, e: Exception) -> ImageLoadError:
    """A decoder's exception as a per-file error: ``truncated`` (cut short) or ``corrupt``."""
    msg = str(e)
    reason = "truncated" if ("truncated" in msg or "broken data stream" in msg or isinstance(e, EOFError)) \
        else "corrupt"
    return ImageLoadError(reason, f"{name}: {reason} image ({msg or type(e).__name__})")


def open_rgb(source: ImageSource, config: ImageConfig) -> Image.Image:
    """The whole picture as 8-bit RGB at its own size, oriented by EXIF, with the same checks and
    errors as :func:`load_image` (for showing a result over the original, e.g. a heat map)."""
    return _decode(source, config.max_pixels, config.pad_color)


def _decode(source: ImageSource, max_pixels: int, pad_color: Sequence[int],
            fit: tuple[int, str] | None = None) -> Image.Image:
    """Open, check, decode, orient by EXIF and convert to RGB; with ``fit`` = (size, resize) also fit it
    to the square, letting the JPEG decoder scale down on the way. Failures become ImageLoadError."""
    name = describe(source)
    img = _open(source)
    try:
        _check_size(img, max_pixels, name)
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if fit and fit[1] != "square" and img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
            w, h = img.size
            sx, sy = _target_scale(w, h, fit[0], fit[1])
            img.draft(None, (max(1, math.ceil(w * sx)), max(1, math.ceil(h * sy))))
        img.load()
        img = _to_rgb(ImageOps.exif_transpose(img), pad_color)
        return _fit(img, fit[0], fit[1], pad_color) if fit else img
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError("too_large", f"{name}: refused, {e}") from None
    except _DECODE_ERRORS as e:
        raise _decode_error(name, e) from None


def load_image_config(source: ImageSource, config: ImageConfig) -> np.ndarray:
    """:func:`load_image` with an :class:`ImageConfig` (what a store or a model directory records)."""
    return load_image(source, config.image_size, config.resize, max_pixels=config.max_pixels,
                      pad_color=config.pad_color)


def load_many(sources: Iterable[ImageSource], config: ImageConfig, workers: int = 4
              ) -> list[np.ndarray | ImageLoadError]:
    """Load several images on threads (Pillow releases the GIL while decoding); errors are returned
    in place, so one bad file never loses the others."""

    def one(src: ImageSource) -> np.ndarray | ImageLoadError:
        try:
            return load_image_config(src, config)
        except ImageLoadError as e:
            return e

    sources = list(sources)
    if workers <= 1 or len(sources) <= 1:
        return [one(s) for s in sources]
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, sources))


def decode_files(paths: Sequence[str], config: ImageConfig) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Load ``paths`` (one task of a :class:`DecodePool` process): the images that loaded, stacked in
    order, and ``(position, reason, message)`` of the others."""
    out = np.empty((len(paths), config.image_size, config.image_size, 3), np.uint8)
    bad: list[tuple[int, str, str]] = []
    n = 0
    for i, path in enumerate(paths):
        try:
            out[n] = load_image_config(path, config)
            n += 1
        except ImageLoadError as e:
            bad.append((i, e.reason, str(e)))
        except Exception as e:  # noqa: BLE001 - a decoder bug costs this image, never the batch
            bad.append((i, "error", f"{describe(path)}: {type(e).__name__}: {e}"))
    return out[:n], bad


class DecodePool:
    """Image files decoded by ``processes`` worker processes, batch after batch in order, with ``ahead``
    batches in flight: JPEG/PNG decoding holds the GIL long enough that threads stop scaling, processes
    do not. Workers import only this module (no Keras), so they start in about a second."""

    def __init__(self, config: ImageConfig, processes: int):
        import multiprocessing as mp

        self.config = config
        self.processes = max(1, int(processes))
        self._pool = mp.get_context("spawn").Pool(self.processes)

    def batches(self, files: Sequence[str], batch_size: int, ahead: int = 2
                ) -> Iterable[list[np.ndarray | ImageLoadError]]:
        """Per batch of ``files``: each file's array or ImageLoadError, in order."""
        from collections import deque

        step = max(1, math.ceil(batch_size / self.processes))
        starts = iter(range(0, len(files), batch_size))
        pending: deque = deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                part = [str(f) for f in files[start:start + batch_size]]
                pending.append((len(part), [self._pool.apply_async(decode_files, (part[i:i + step], self.config))
                                            for i in range(0, len(part), step)]))

        for _ in range(ahead + 1):
            submit()
        while pending:
            n, chunks = pending.popleft()
            submit()
            batch: list[np.ndarray | ImageLoadError] = []
            for chunk in chunks:
                images, bad = chunk.get()
                failed = {i: ImageLoadError(reason, msg) for i, reason, msg in bad}
                it = iter(images)
                size = len(images) + len(bad)
                batch += [failed[i] if i in failed else next(it) for i in range(size)]
            assert len(batch) == n
            yield batch

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def identify(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """``(extension, width, height)`` of an image from its content, not its name; fully decodes it once
    so a broken file is caught here. Raises ImageLoadError."""
    name = describe(source)
    img = _open(source)
    _check_size(img, max_pixels, name)
    ext = FORMAT_EXT.get(img.format or "")
    if ext is None:
        raise ImageLoadError("unsupported", f"{name}: image format {img.format} is not supported")
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise _decode_error(name, e) from None
    return ext, img.size[0], img.size[1]
