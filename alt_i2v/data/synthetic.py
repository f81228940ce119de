"""Generated pictures (the demo's dataset, export's parity images): small illustration-like images of "girls" (head, hair, dress) on backgrounds with
floating items, written in the contract layout with Danbooru-style tags: backgrounds, counts (``solo``,
``2girls``, ``multiple_girls``), hair colours and lengths, accessories, two characters and their
copyright. Every tag is a function of what is drawn, so a model can learn all of them.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AltI2VError
from .layout import DataDir

DEMO_VERSION = 1
MARKER = "demo_dataset.json"
SUPERSAMPLE = 2  # draw at 2x and box-downsample: anti-aliased edges like a real illustration

# -- what can be drawn ---------------------------------------------------------------------------------
BACKGROUNDS = {  # name: (probability, tags)
    "white": (0.26, ["white_background", "simple_background"]),
    "gradient": (0.16, ["gradient_background", "simple_background"]),
    "striped": (0.12, ["striped_background", "simple_background"]),
    "polka_dot": (0.10, ["polka_dot_background", "simple_background"]),
    "blue_sky": (0.20, ["blue_sky", "sky", "day", "outdoors"]),
    "night_sky": (0.16, ["night_sky", "sky", "night", "outdoors"]),
}
HAIR = {  # name: (probability for an ordinary girl, RGB)
    "blonde_hair": (0.26, (246, 214, 92)),
    "black_hair": (0.24, (34, 30, 42)),
    "pink_hair": (0.18, (246, 150, 196)),
    "blue_hair": (0.14, (58, 104, 226)),
    "red_hair": (0.12, (206, 38, 38)),
    "green_hair": (0.06, (52, 170, 84)),
}
DRESSES = [(150, 60, 190), (240, 140, 40), (40, 160, 150), (120, 200, 80), (230, 90, 140), (110, 120, 140)]
CHARACTERS = {  # name: (probability per girl, hair tag, dress RGB); the dress colour is theirs alone
    "aoi_(shape_academy)": (0.10, "blue_hair", (250, 250, 250)),
    "akane_(shape_academy)": (0.06, "red_hair", (24, 24, 28)),
}
COPYRIGHT = "shape_academy"
SKIN = (252, 220, 196)
OUTLINE = (60, 40, 40)
GIRLS = {0: 0.12, 1: 0.48, 2: 0.27, 3: 0.13}  # how many girls a picture holds
COUNT_TAGS = {0: ["no_humans"], 1: ["1girl", "solo"], 2: ["2girls", "multiple_girls"],
              3: ["3girls", "multiple_girls"]}
ARTISTS = ["pixel_sensei", "kumo_works", "hoshi_no_e"]  # artist category: present, not learned by default


def _pick(rng: np.random.Generator, table: dict) -> str:
    names = list(table)
    p = np.array([table[n][0] if isinstance(table[n], tuple) else table[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _jitter(rng: np.random.Generator, rgb: tuple, amount: int = 12) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _pastel(rng: np.random.Generator, warm: bool = False, dark: bool = False) -> tuple:
    """A light colour; ``warm`` keeps to purple..yellow hues (never sky blue), ``dark`` deepens it."""
    import colorsys

    hue = float(rng.uniform(0.72, 1.15) % 1.0) if warm else float(rng.random())
    sat = float(rng.uniform(0.35, 0.55)) if dark else float(rng.uniform(0.15, 0.35))
    val = float(rng.uniform(0.75, 0.85)) if dark else float(rng.uniform(0.9, 1.0))
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _vertical_gradient(s: int, top: tuple, bottom: tuple) -> np.ndarray:
    t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None]
    col = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return np.broadcast_to(col, (s, s, 3)).astype(np.uint8)


def _background(rng: np.random.Generator, kind: str, s: int) -> tuple[np.ndarray, list[str]]:
    """The background as an (s, s, 3) array, plus the tags of its optional extras."""
    extra: list[str] = []
    if kind == "white":
        return np.full((s, s, 3), int(rng.integers(246, 256)), np.uint8), extra
    if kind == "gradient":
        return _vertical_gradient(s, _pastel(rng, warm=True), _pastel(rng, warm=True, dark=True)), extra
    if kind == "striped":
        a, b = _pastel(rng), _jitter(rng, (200, 120, 150), 50)
        period = int(rng.integers(10, 15)) * SUPERSAMPLE // 2 * 2
        yy, xx = np.mgrid[0:s, 0:s]
        phase = (xx + yy) if rng.random() < 0.5 else xx
        mask = ((phase + int(rng.integers(period))) % period) < period // 2
        return np.where(mask[..., None], np.array(a, np.uint8), np.array(b, np.uint8)), extra
    if kind == "polka_dot":
        base, dot = _jitter(rng, (250, 200, 210), 30), (255, 255, 255)
        img = np.empty((s, s, 3), np.uint8)
        img[:] = base
        step = int(rng.integers(12, 16)) * SUPERSAMPLE
        r = step // 4
        yy, xx = np.mgrid[0:s, 0:s]
        off = int(rng.integers(step))
        dy, dx = (yy + off) % step - step // 2, (xx + off) % step - step // 2
        img[dy * dy + dx * dx <= r * r] = dot
        return img, extra
    if kind == "blue_sky":
        img = _vertical_gradient(s, _jitter(rng, (84, 150, 232)), _jitter(rng, (176, 214, 250)))
        if rng.random() < 0.55:
            extra.append("cloud")
        return img, extra
    if kind == "night_sky":
        img = _vertical_gradient(s, _jitter(rng, (12, 16, 52)), _jitter(rng, (44, 40, 96))).copy()
        if rng.random() < 0.7:
            extra.append("starry_sky")
            for _ in range(int(rng.integers(14, 26))):
                y, x = int(rng.integers(2, s - 3)), int(rng.integers(2, s - 3))
                img[y - 1:y + 2, x] = 255
                img[y, x - 1:x + 2] = 255
        if rng.random() < 0.3:
            extra.append("moon")
        return img, extra
    raise ValueError(kind)


def _star_points(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = rot + k * math.pi / 5 - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _heart_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(24):
        t = 2 * math.pi * k / 24
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + r * x / 17, cy - r * y / 17))
    return pts


def _draw_girl(d, rng: np.random.Generator, cx: float, s: int, hair_rgb: tuple, dress_rgb: tuple,
               long_hair: bool, hat: bool, ears: bool, swimsuit: bool) -> None:
    """A chibi figure: hair behind, dress or swimsuit body, head, hair cap, then ears or a hat on top."""
    r = s * rng.uniform(0.105, 0.115)  # head radius
    cy = s * rng.uniform(0.39, 0.42)  # head centre
    w = 2 * SUPERSAMPLE
    bottom = s * rng.uniform(0.90, 0.96)
    hair = _jitter(rng, hair_rgb, 10)
    if long_hair:
        d.rounded_rectangle((cx - 1.3 * r, cy - 0.6 * r, cx + 1.3 * r, cy + 3.2 * r), radius=r * 0.6,
                            fill=hair, outline=OUTLINE, width=w)
    body = [(cx - 0.55 * r, cy + 0.8 * r), (cx + 0.55 * r, cy + 0.8 * r), (cx + 1.3 * r, bottom),
            (cx - 1.3 * r, bottom)]
    if swimsuit:
        d.polygon(body, fill=SKIN, outline=OUTLINE, width=w)
        band = _jitter(rng, (30, 60, 200), 25)
        d.rectangle((cx - 0.95 * r, cy + 1.9 * r, cx + 0.95 * r, cy + 2.9 * r), fill=band)
    else:
        d.polygon(body, fill=_jitter(rng, dress_rgb, 8), outline=OUTLINE, width=w)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=SKIN, outline=OUTLINE, width=w)
    d.chord((cx - 1.15 * r, cy - 1.2 * r, cx + 1.15 * r, cy + 0.5 * r), 165, 375, fill=hair, outline=OUTLINE,
            width=w)
    eye = max(1.0, 0.14 * r)
    for ex in (cx - 0.38 * r, cx + 0.38 * r):
        d.ellipse((ex - eye, cy + 0.1 * r - eye, ex + eye, cy + 0.1 * r + eye), fill=OUTLINE)
    if ears:
        for sgn in (-1, 1):
            d.polygon([(cx + sgn * 0.35 * r, cy - 0.85 * r), (cx + sgn * 1.0 * r, cy - 0.55 * r),
                       (cx + sgn * 0.85 * r, cy - 1.75 * r)], fill=hair, outline=OUTLINE, width=w)
    if hat:
        hat_rgb = _jitter(rng, (70, 50, 40), 12)
        d.rectangle((cx - 1.45 * r, cy - 0.95 * r, cx + 1.45 * r, cy - 0.7 * r), fill=hat_rgb, outline=OUTLINE,
                    width=w)
        d.rectangle((cx - 0.8 * r, cy - 1.75 * r, cx + 0.8 * r, cy - 0.9 * r), fill=hat_rgb, outline=OUTLINE,
                    width=w)


def draw_demo_image(seed: int, index: int, size: int = 64) -> tuple[Any, dict]:
    """Draw picture ``index`` of the dataset ``seed``; returns the PIL image and ``{"tags": {category:
    [tags]}, "rating"}``. A picture depends only on (seed, index), so any subset can be redrawn."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index, DEMO_VERSION])
    s = size * SUPERSAMPLE
    kind = _pick(rng, BACKGROUNDS)
    bg, extra = _background(rng, kind, s)
    tags = list(BACKGROUNDS[kind][1]) + extra
    img = Image.fromarray(np.ascontiguousarray(bg), "RGB")
    d = ImageDraw.Draw(img)
    if "moon" in extra:
        mx, my, mr = s * rng.uniform(0.78, 0.86), s * rng.uniform(0.1, 0.14), s * 0.075
        d.ellipse((mx - mr, my - mr, mx + mr, my + mr), fill=(250, 240, 170))
    if "cloud" in extra:
        for _ in range(int(rng.integers(1, 3))):
            x, y, w = s * rng.uniform(0.1, 0.8), s * rng.uniform(0.06, 0.14), s * rng.uniform(0.18, 0.28)
            for k in range(3):
                d.ellipse((x + k * w / 3 - w / 4, y - w / 5, x + k * w / 3 + w / 4, y + w / 5), fill=(252, 252, 255))

    n = int(_pick(rng, {k: (v,) for k, v in GIRLS.items()}))
    tags += COUNT_TAGS[n]
    characters: list[str] = []
    swimsuit_any = False
    slots = {0: [], 1: [0.5], 2: [0.29, 0.71], 3: [0.18, 0.5, 0.82]}[n]
    for frac in slots:
        cx = s * (frac + rng.uniform(-0.03, 0.03) * (1.0 if n < 3 else 0.5))
        char = None
        u = rng.random()
        acc = 0.0
        for name, (p, _, _) in CHARACTERS.items():
            acc += p
            if u < acc:
                char = name
                break
        long_hair = bool(rng.random() < 0.55)
        hat = bool(rng.random() < 0.14)
        ears = bool(not hat and rng.random() < 0.14)
        if char:
            hair_tag, dress, swimsuit = CHARACTERS[char][1], CHARACTERS[char][2], False
            characters.append(char)
        else:
            hair_tag = _pick(rng, HAIR)
            dress = DRESSES[int(rng.integers(len(DRESSES)))]
            swimsuit = bool(rng.random() < 0.08)
        swimsuit_any |= swimsuit
        _draw_girl(d, rng, cx, s, HAIR[hair_tag][1], dress, long_hair, hat, ears, swimsuit)
        tags += [hair_tag, "long_hair" if long_hair else "short_hair"]
        tags += ["hat"] * hat + ["animal_ears"] * ears + ["swimsuit"] * swimsuit

    # Floating items: a band above the heads, or anywhere when nobody is there.
    n_items = int(rng.integers(0, 3)) if n else int(rng.integers(1, 4))
    xs = rng.permutation(np.linspace(0.12, 0.88, 5))[:n_items]
    for x in xs:
        kind_item = "heart" if rng.random() < 0.5 else "star_(symbol)"
        r = s * (rng.uniform(0.05, 0.065) if n else rng.uniform(0.08, 0.12))
        y = s * (rng.uniform(0.08, 0.12) if n else rng.uniform(0.25, 0.75))
        cx = s * (x + rng.uniform(-0.03, 0.03))
        if kind_item == "heart":
            d.polygon(_heart_points(cx, y, r), fill=_jitter(rng, (236, 52, 96)), outline=OUTLINE, width=SUPERSAMPLE)
        else:
            d.polygon(_star_points(cx, y, r * 1.15, float(rng.uniform(-0.3, 0.3))), fill=_jitter(rng, (250, 200, 30)),
                      outline=OUTLINE, width=SUPERSAMPLE)
        tags.append(kind_item)

    img = img.reduce(SUPERSAMPLE) if SUPERSAMPLE > 1 else img
    general = sorted(set(tags))
    chars = sorted(set(characters))
    out = {"general": general, "character": chars, "copyright": [COPYRIGHT] if chars else [],
           "artist": [ARTISTS[int(rng.integers(len(ARTISTS)))]]}
    return img, {"tags": out, "rating": "s" if swimsuit_any else "g"}


def _make_one(task: tuple) -> dict:
    """Draw, encode and save one picture; returns its post (runs in a worker process)."""
    seed, index, size, data_dir = task
    img, info = draw_demo_image(seed, index, size)
    buf = io.BytesIO()
    as_jpeg = (index % 9) == 4  # a few JPEGs, as real collections have
    if as_jpeg:
        img.save(buf, "JPEG", quality=92)
    else:
        img.save(buf, "PNG", compress_level=1)
    ext = "jpg" if as_jpeg else "png"
    md5, rel = DataDir(data_dir).save_image(buf.getvalue(), ext)
    tags = {k: v for k, v in info["tags"].items() if v}
    return {"id": index + 1, "md5": md5, "file_ext": ext, "file": rel, "tags": tags, "rating": info["rating"],
            "score": int(index * 7919 % 50), "width": size, "height": size, "source": "alt-i2v-demo"}


def generate_demo_dataset(data_dir: str | os.PathLike, n_images: int = 3000, seed: int = 0, size: int = 64, *,
                          workers: int = 0, quiet: bool = True) -> dict[str, Any]:
    """Write ``n_images`` generated pictures and their posts into ``data_dir`` (contract layout).

    Deterministic for (n_images, seed, size). Already generated with the same settings: nothing is
    redone. Images go in first and ``posts.jsonl`` is written atomically last, so an interrupted run
    leaves no half dataset. Returns the marker record (settings, counts of each tag, seconds).
    """
    from ..config import resolve_workers
    from ..fsutil import atomic_write_json, atomic_write_text, read_json_object
    from .layout import POSTS_FILE
    from ..progress import bar

    data_dir = Path(data_dir)
    settings = {"version": DEMO_VERSION, "n_images": int(n_images), "seed": int(seed), "size": int(size)}
    marker = data_dir / MARKER
    if marker.exists() and (data_dir / POSTS_FILE).exists():
        try:
            old = read_json_object(marker, "demo dataset marker")
        except (OSError, AltI2VError):
            old = {}
        if all(old.get(k) == v for k, v in settings.items()):
            return {**old, "reused": True}
        raise AltI2VError(f"{data_dir} holds a demo dataset made with other settings "
                          f"({ {k: old.get(k) for k in settings} }); use another directory or delete it")
    if (data_dir / POSTS_FILE).exists() and not marker.exists():
        raise AltI2VError(f"{data_dir / POSTS_FILE} exists and is not a demo dataset; "
                          "the demo will not write into it: choose an empty directory")
    if n_images < 1 or not 16 <= size <= 512:
        raise AltI2VError("the demo dataset needs n_images >= 1 and size in 16..512")
    t0 = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(seed, i, size, str(data_dir)) for i in range(n_images)]
    nworkers = min(resolve_workers(workers), max(1, n_images // 500))
    if nworkers > 1:
        with ProcessPoolExecutor(nworkers) as ex:
            posts = list(bar(ex.map(_make_one, tasks, chunksize=64), total=n_images, desc="generate",
                             unit="img", quiet=quiet))
    else:
        posts = [_make_one(t) for t in bar(tasks, total=n_images, desc="generate", unit="img", quiet=quiet)]
    counts: dict[str, int] = {}
    for p in posts:
        for names in p["tags"].values():
            for t in names:
                counts[t] = counts.get(t, 0) + 1
    lines = "".join(json.dumps(p, ensure_ascii=False, separators=(",", ":")) + "\n" for p in posts)
    atomic_write_text(data_dir / POSTS_FILE, lines)
    record = {**settings, "tag_counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
              "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(marker, record)
    return {**record, "reused": False}
