"""The one image loader: every hostile or unusual image either loads correctly or fails with its reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from alt_i2v.errors import ImageLoadError
from alt_i2v.data.imaging import identify, load_image, load_many
from alt_i2v.config import ImageConfig

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def close(pixel, color, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, color))


def halves(w: int, h: int, left, right) -> Image.Image:
    img = Image.new("RGB", (w, h), left)
    img.paste(Image.new("RGB", (w - w // 2, h), right), (w // 2, 0))
    return img


def test_exif_orientation_is_applied():
    img = halves(200, 100, RED, BLUE)  # stored landscape: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    arr = load_image(encode(img, "JPEG", exif=exif, quality=95), 32, "stretch")
    assert close(arr[4, 16], RED) and close(arr[28, 16], BLUE)  # left column became the top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    base = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    base.paste(Image.new("RGBA", (20, 40), (0, 0, 0, 255)), (0, 0))  # left opaque black, right transparent
    if mode == "LA":
        img = base.convert("LA")
    elif mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        alpha_idx = img.getpixel((30, 20))
        img.info["transparency"] = alpha_idx
    else:
        img = base
    arr = load_image(encode(img, "PNG"), 40, "stretch")
    assert close(arr[20, 5], (0, 0, 0)) and close(arr[20, 35], WHITE)


def test_semi_transparent_pixels_blend_with_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 128))
    arr = load_image(encode(img, "PNG"), 10, "stretch")
    assert 120 <= arr[5, 5, 0] <= 135


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("RGB", (32, 32), (200, 30, 30)).convert("CMYK")
    arr = load_image(encode(img, "JPEG", quality=95), 32)
    assert arr.dtype == np.uint8 and close(arr[16, 16], (200, 30, 30), tol=45)


def test_16bit_greyscale_png_is_scaled_to_8bit():
    arr16 = np.full((20, 20), 32768, dtype=np.uint16)
    img = Image.fromarray(arr16)
    assert img.mode.startswith("I;16")
    arr = load_image(encode(img, "PNG"), 20, "stretch")
    assert 125 <= arr[10, 10, 0] <= 130 and (arr[..., 0] == arr[..., 1]).all()


def test_greyscale_and_bilevel_become_rgb():
    for mode, value in (("L", 90), ("1", 255)):
        arr = load_image(encode(Image.new(mode, (16, 16), value), "PNG"), 16)
        assert arr.shape == (16, 16, 3) and (arr[..., 0] == arr[..., 2]).all() and arr[8, 8, 0] == value


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (30, 30), RED), Image.new("RGB", (30, 30), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    arr = load_image(data, 30)
    assert close(arr[15, 15], RED)


def test_tiny_and_extreme_aspect_images():
    assert load_image(encode(Image.new("RGB", (1, 1), RED), "PNG"), 64).shape == (64, 64, 3)
    thin = load_image(encode(Image.new("RGB", (3000, 3), BLUE), "PNG"), 50, "pad")
    assert thin.shape == (50, 50, 3)
    assert close(thin[24, 25], BLUE) and close(thin[2, 25], WHITE)  # a 1px line, padded above and below
    tall = load_image(encode(Image.new("RGB", (2, 2000), BLUE), "PNG"), 50, "crop")
    assert close(tall[0, 0], BLUE) and close(tall[49, 49], BLUE)


def test_resize_modes_geometry():
    img = Image.new("RGB", (300, 100), RED)
    img.paste(Image.new("RGB", (100, 100), BLUE), (0, 0))
    img.paste(Image.new("RGB", (100, 100), GREEN), (200, 0))
    data = encode(img, "PNG")
    pad = load_image(data, 60, "pad")
    assert close(pad[2, 30], WHITE) and close(pad[30, 30], RED) and close(pad[30, 3], BLUE)
    crop = load_image(data, 60, "crop")
    assert close(crop[30, 2], RED) and close(crop[30, 57], RED)  # only the red centre survives
    stretch = load_image(data, 60, "stretch")
    assert close(stretch[2, 3], BLUE) and close(stretch[57, 57], GREEN)


def test_jpeg_draft_fast_path_matches_a_full_decode():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((1200, 1600), Image.Resampling.BICUBIC)
    data = encode(img, "JPEG", quality=92)
    fast = load_image(data, 150, "stretch").astype(np.int16)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((150, 150), Image.Resampling.LANCZOS),
                      dtype=np.int16)
    assert np.abs(fast - full).mean() < 4.0


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageLoadError) as e:
        load_image(png_header_only(30000, 30000), 150)
    assert e.value.reason == "too_large"


def test_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    with pytest.raises(ImageLoadError) as e:
        load_image(data, 32, max_pixels=5000)
    assert e.value.reason == "too_large"
    assert load_image(data, 32, max_pixels=10_000).shape == (32, 32, 3)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"<!DOCTYPE html><html><body>429 Too Many Requests</body></html>", "html"),
    (bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)), "not_an_image"),
])
def test_bad_files_give_a_clear_reason(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as e:
        load_image(path, 32)
    assert e.value.reason == reason and str(path) in str(e.value)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as e:
        load_image(path, 32)
    assert e.value.reason == "truncated"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "nope.png", 32)
    assert e.value.reason == "missing"
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path, 32)
    assert e.value.reason == "unreadable"


def test_wrong_extension_is_decoded_by_content(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(Image.new("RGB", (20, 20), GREEN), "PNG"))
    assert close(load_image(path, 20)[10, 10], GREEN)
    assert identify(path)[0] == "png"


def test_every_source_kind_gives_the_same_pixels(tmp_path):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    data = encode(img, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    ref = load_image(path, 24)
    for src in (data, str(path), Image.open(io.BytesIO(data)), np.asarray(img)):
        np.testing.assert_array_equal(load_image(src, 24), ref)


def test_load_many_keeps_good_results_beside_errors(tmp_path):
    good = encode(Image.new("RGB", (10, 10), RED), "PNG")
    out = load_many([good, b"", good], ImageConfig(image_size=8), workers=2)
    assert isinstance(out[1], ImageLoadError) and out[1].reason == "empty"
    assert out[0].shape == (8, 8, 3) and close(out[2][4, 4], RED)
