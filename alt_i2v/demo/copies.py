"""Pictures and their near-copies, made in code: what ``--dedupe`` is tested and benchmarked on.

A picture is a smooth colour field with four to eight filled ellipses and rectangles (no two alike); its
copies are the kinds a booru collects: resized to half, recompressed as a JPEG at quality 25, cropped by 5%
on two sides, mirrored, and recoloured (hue turned, saturation down, brighter).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

COPY_KINDS = ("resized", "recompressed", "cropped", "flipped", "recoloured")


def picture(seed: int, size: int = 256) -> Image.Image:
    """A distinct picture for each ``seed``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = rng.uniform(-2, 2, (3, 3))
    field = np.stack([128 + 100 * np.sin(a[c, 0] * 3 * xx + a[c, 1] * 3 * yy + a[c, 2] * 6) for c in range(3)], -1)
    img = Image.fromarray(field.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 40, 2))
        w, h = (int(v) for v in rng.integers(30, size // 2, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    return img


def copy_of(img: Image.Image, kind: str) -> Image.Image:
    """One near-copy of ``img`` (``kind`` from COPY_KINDS)."""
    w, h = img.size
    if kind == "resized":
        return img.resize((w // 2, h // 2), Image.LANCZOS)
    if kind == "recompressed":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=25)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "cropped":
        c = int(w * 0.05)
        return img.crop((c, c // 2, w - c // 2, h - c))
    if kind == "flipped":
        return ImageOps.mirror(img)
    if kind == "recoloured":
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + 12) % 256
        hsv[..., 1] = (hsv[..., 1] * 0.8).astype(np.uint8)
        return ImageEnhance.Brightness(Image.fromarray(hsv, "HSV").convert("RGB")).enhance(1.1)
    raise ValueError(f"kind must be one of {COPY_KINDS}, got {kind!r}")


def write_copies_dataset(data_dir: str | os.PathLike, originals: int, with_copies: int, *, parent_pairs: int = 0,
                         seed: int = 0, size: int = 256) -> list[list[int]]:
    """A dataset (posts.jsonl + images) of ``originals`` distinct pictures, the first ``with_copies`` of them
    followed by one copy of each kind, and ``parent_pairs`` more pairs of distinct pictures linked as
    Danbooru parent and child (``parent_id``). Returns the true groups of post ids."""
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    posts, groups = [], []
    rng = np.random.default_rng(seed)

    def add(img: Image.Image, **extra) -> int:
        fmt = "JPEG" if rng.random() < 0.5 else "PNG"
        buf = io.BytesIO()
        img.convert("RGB").save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        raw = buf.getvalue()
        md5 = hashlib.md5(raw).hexdigest()
        ext = "jpg" if fmt == "JPEG" else "png"
        path = data / "images" / md5[:2] / f"{md5}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        pid = len(posts) + 1
        tags = ["picture", "copy" if extra.pop("copy", False) else "original"]
        posts.append({"id": pid, "md5": md5, "file_ext": ext, "file": f"images/{md5[:2]}/{md5}.{ext}",
                      "tags": {"general": tags}, "rating": "g", "source": "copies", **extra})
        return pid

    for i in range(originals):
        img = picture(seed * 100_003 + i, size)
        first = add(img)
        if i < with_copies:
            groups.append([first] + [add(copy_of(img, kind), copy=True) for kind in COPY_KINDS])
    for i in range(parent_pairs):
        parent = add(picture(seed * 100_003 + originals + 2 * i, size))
        child = add(picture(seed * 100_003 + originals + 2 * i + 1, size), parent_id=parent)
        groups.append([parent, child])
    with open(data / "posts.jsonl", "w", encoding="utf-8") as f:
        for p in posts:
            f.write(json.dumps(p) + "\n")
    return groups


def pair_scores(found: list[list], truth: list[list]) -> tuple[float, float]:
    """Precision and recall of a grouping over pairs: the pairs inside found groups against those inside
    the true groups."""
    def pairs(groups: list[list]) -> set:
        return {(a, b) for g in groups for a in g for b in g if _key(a) < _key(b)}

    got, want = pairs(found), pairs(truth)
    both = len(got & want)
    return (both / len(got) if got else 1.0), (both / len(want) if want else 1.0)


def _key(pid) -> tuple:
    return (0, pid, "") if isinstance(pid, int) else (1, 0, str(pid))
