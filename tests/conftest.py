"""Shared fixtures: small generated datasets (posts.jsonl + images), vocabularies and stores.

Everything is generated in code with a seed; nothing touches the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def save_image(data_dir: Path, img: Image.Image, fmt: str = "PNG") -> tuple[str, str]:
    """Save into the contract layout; returns (md5, ext)."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    md5 = hashlib.md5(data).hexdigest()
    ext = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp"}[fmt]
    path = data_dir / "images" / md5[:2] / f"{md5}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return md5, ext


def shapes_image(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, list[str]]:
    """A learnable picture: one or two coloured shapes on a light background; tags name them."""
    img = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    tags = []
    for _ in range(int(rng.integers(1, 3))):
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        r = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
        tags += [color, shape]
    return img, sorted(set(tags))


def make_dataset(data_dir: Path, n: int = 120, seed: int = 0, size: int = 64, fmt: str = "PNG") -> list[dict]:
    """Write ``n`` shape posts (posts.jsonl + images) into ``data_dir``; returns the posts."""
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    posts = []
    for i in range(n):
        img, tags = shapes_image(rng, size)
        md5, ext = save_image(data_dir, img, fmt)
        posts.append({"id": i + 1, "md5": md5, "file_ext": ext, "file": f"images/{md5[:2]}/{md5}.{ext}",
                      "tags": {"general": tags}, "rating": "g", "source": "test"})
    with open(data_dir / "posts.jsonl", "a", encoding="utf-8") as f:
        for p in posts:
            f.write(json.dumps(p) + "\n")
    return posts


def temp_files(root: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes under ``root`` (fsutil.temp_path names them)."""
    from alt_i2v.fsutil import TMP_SUFFIX

    return [p for p in Path(root).rglob(".*") if TMP_SUFFIX in p.name]


def rerun_killed_build(data: Path, cmd: list[str], total: int, timeout: float, size: int = 64) -> int:
    """After a ``--build`` was SIGKILLed: every record present is whole and decodable, and running ``cmd``
    again exits 0 having stored exactly the rest. Returns how many records the killed build had kept."""
    from alt_i2v.store import open_store

    with open_store(data) as s:
        partial = s.count()
        for k in s.ids():
            assert s.get(k)["image"].shape == (size, size, 3)
    assert 0 < partial < total, partial
    done = subprocess.run(cmd, capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    report = json.loads((data / "reports" / "build_report.json").read_text())
    assert report["already stored"] == partial and report["stored now"] == total - partial
    return partial


def jpeg_dataset(data_dir: Path, n: int, seed: int) -> Path:
    """``n`` posts of 640x800 JPEGs, big enough that building them takes seconds (for kill tests), with
    vocab.json."""
    from alt_i2v.data.vocab import build_vocab

    rng = np.random.default_rng(seed)
    posts = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).resize((640, 800))
        md5, ext = save_image(data_dir, img, "JPEG")
        posts.append({"id": i, "md5": md5, "file_ext": ext, "tags": {"general": [f"t{i % 7}"]}})
    (data_dir / "posts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in posts))
    build_vocab(data_dir)
    return data_dir


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """A fresh 120-post shapes dataset (no vocab, no store)."""
    make_dataset(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(scope="session")
def built_data(tmp_path_factory) -> Path:
    """A session-wide 400-post shapes dataset with vocab.json and a 32px store (read-only for tests)."""
    from alt_i2v.store import build_store
    from alt_i2v.data.vocab import build_vocab

    data = tmp_path_factory.mktemp("built") / "data"
    make_dataset(data, n=400, seed=1, size=48)
    build_vocab(data)
    build_store(data, image_size=32, workers=1, quiet=True)
    return data
