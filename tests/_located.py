"""Generated pictures whose tagged objects sit at known places, and one tiny model trained on them per
test session: the ground truth of the Grad-CAM localisation tests. Not a test module; imported by them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 48
KINDS = {"red_circle": ((220, 40, 40), "circle"), "blue_square": ((40, 70, 220), "square"),
         "yellow_triangle": ((235, 200, 30), "triangle")}
_cache: dict[str, Path] = {}


def located_image(rng: np.random.Generator, n_objects: int | None = None, size: int = SIZE
                  ) -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """A light background with 1-2 objects of different kinds, apart from each other; returns the
    picture and ``{tag: (x0, y0, x1, y1)}`` of each object's box."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    n = int(rng.integers(1, 3)) if n_objects is None else n_objects
    kinds = list(rng.permutation(list(KINDS)))[:n]
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for kind in kinds:
        color, shape = KINDS[kind]
        r = int(rng.integers(size // 8, size // 6 + 1))
        for _ in range(100):
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            if all(abs(cx - (b[0] + b[2]) / 2) > 2 * r + 4 or abs(cy - (b[1] + b[3]) / 2) > 2 * r + 4
                   for b in boxes.values()):
                break
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=color)
        elif shape == "square":
            d.rectangle(box, fill=color)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        boxes[kind] = box
    return img, boxes


def make_located_dataset(data_dir: Path, n: int, seed: int) -> None:
    """``n`` located pictures as a dataset (posts.jsonl + images in the contract layout)."""
    from conftest import save_image

    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img, boxes = located_image(rng)
        md5, ext = save_image(data_dir, img)
        lines.append(json.dumps({"id": i + 1, "md5": md5, "file_ext": ext, "file": f"images/{md5[:2]}/{md5}.{ext}",
                                 "tags": {"general": sorted(boxes)}, "rating": "g", "source": "test"}))
    (data_dir / "posts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def located_model(tmp_path_factory) -> Path:
    """The tiny backbone trained on 600 located pictures at 48px (a 6x6 feature map), once per session."""
    if "model" not in _cache:
        from alt_i2v.store import build_store
        from alt_i2v.training.run import train
        from alt_i2v.data.vocab import build_vocab

        root = tmp_path_factory.mktemp("located")
        make_located_dataset(root / "data", 600, seed=3)
        build_vocab(root / "data")
        build_store(root / "data", image_size=SIZE, workers=1, quiet=True)
        train(root / "data", root / "model", backbone="tiny", weights=None, epochs=4, image_size=SIZE,
              quiet=True)
        _cache["model"] = root / "model"
    return _cache["model"]
