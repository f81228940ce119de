"""One tiny trained model per test session, shared by the inference test modules (tagger, captions,
search), so the ~10 s training runs once. Not a test module; imported by them."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

_cache: dict[str, Path] = {}

# Categories given to the shapes vocabulary in the "categorised" copy of the model: the vocabulary's
# sha256 covers names only, so this copy is a valid model directory with three categories.
CATEGORY_OF = {"red": "character", "green": "character", "blue": "copyright"}


def trained_model(built_data: Path, tmp_path_factory) -> Path:
    """``alt_i2v.training.run.train`` of the tiny backbone (2 epochs, 32px) on the conftest ``built_data``."""
    if "model" not in _cache:
        from alt_i2v.training.run import train

        model_dir = tmp_path_factory.mktemp("inference") / "model"
        train(built_data, model_dir, backbone="tiny", weights=None, epochs=2, image_size=32, quiet=True)
        _cache["model"] = model_dir
    return _cache["model"]


def categorised_model(built_data: Path, tmp_path_factory) -> Path:
    """A copy of the trained model whose vocab.json puts colours in the character/copyright categories."""
    if "categorised" not in _cache:
        src = trained_model(built_data, tmp_path_factory)
        dst = tmp_path_factory.mktemp("inference_cat") / "model"
        shutil.copytree(src, dst)
        vocab = json.loads((dst / "vocab.json").read_text())
        for t in vocab["tags"]:
            t["category"] = CATEGORY_OF.get(t["name"], "general")
        vocab["categories"] = ["general", "character", "copyright"]
        (dst / "vocab.json").write_text(json.dumps(vocab))
        _cache["categorised"] = dst
    return _cache["categorised"]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def truncated_png(img: Image.Image) -> bytes:
    """A PNG cut in the middle of its pixel data: the header reads, the decode fails."""
    data = png_bytes(img)
    return data[: len(data) // 2]


def near_duplicate(img: Image.Image, size: int, quality: int = 85) -> bytes:
    """``img`` resized to ``size`` and re-encoded as JPEG: what a re-upload of the same picture looks like."""
    buf = io.BytesIO()
    img.resize((size, size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def shapes(n: int, seed: int, size: int = 64) -> list[Image.Image]:
    from conftest import shapes_image

    rng = np.random.default_rng(seed)
    return [shapes_image(rng, size)[0] for _ in range(n)]
