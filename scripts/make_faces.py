"""Hard, face-crop illustrations with Danbooru colour tags: the stand-in for real data in bench_quality.

No public set of real tagged illustrations could be fetched from this workplace (docs/quality.md says
where we looked), so this draws the most realistic stand-in we could make for the common real case, a
96px face crop tagged with hair colour, eye colour and hair style. Unlike the demo, it is hard the way
real data is: colours are sampled from wide, touching HSV regions (orange/brown/blonde/red blur into each
other), shaded hair with highlights and strands, small eyes that may be closed or hidden by glasses or
bangs, busy backgrounds and accessories in every colour (a blue bow is not blue hair), crops that are
shifted, scaled and rotated, colour casts, blur and JPEG, and noisy labels (tags left out, a neighbouring
colour named instead), so no model reaches a perfect score.

    python scripts/make_faces.py /work/data/faces-src --n 15000 --seed 0
    python -m alt_i2v --import /work/data/faces-src --data /work/data/faces --mode captions
    python -m alt_i2v --vocab --data /work/data/faces --min-count 20
    python -m alt_i2v --build --data /work/data/faces --image-size 96

Writes ``face_NNNNNN.jpg`` + ``face_NNNNNN.txt`` (comma-separated tags); deterministic in (n, seed).
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SS = 3  # supersampling factor
# name: (probability, hue range (deg), saturation range, value range); neighbours overlap on purpose
HAIR = {
    "blonde_hair": (0.17, (40, 56), (0.45, 0.85), (0.82, 1.0)),
    "brown_hair": (0.17, (14, 36), (0.40, 0.80), (0.30, 0.62)),
    "black_hair": (0.14, (0, 360), (0.0, 0.35), (0.06, 0.24)),
    "blue_hair": (0.09, (205, 240), (0.45, 0.90), (0.45, 0.95)),
    "pink_hair": (0.08, (320, 350), (0.25, 0.60), (0.80, 1.0)),
    "purple_hair": (0.07, (262, 300), (0.30, 0.75), (0.40, 0.90)),
    "silver_hair": (0.06, (180, 260), (0.0, 0.12), (0.72, 0.90)),
    "white_hair": (0.05, (0, 360), (0.0, 0.07), (0.90, 1.0)),
    "red_hair": (0.05, (352, 372), (0.60, 0.95), (0.55, 0.92)),
    "green_hair": (0.04, (90, 150), (0.35, 0.85), (0.40, 0.85)),
    "orange_hair": (0.04, (20, 38), (0.70, 1.0), (0.80, 1.0)),
    "aqua_hair": (0.04, (168, 198), (0.40, 0.85), (0.60, 0.95)),
}
EYES = {
    "blue_eyes": (0.25, (200, 240), (0.45, 0.95), (0.50, 0.95)),
    "red_eyes": (0.15, (350, 372), (0.60, 0.95), (0.50, 0.90)),
    "brown_eyes": (0.13, (15, 35), (0.45, 0.85), (0.30, 0.60)),
    "green_eyes": (0.11, (85, 150), (0.45, 0.90), (0.40, 0.85)),
    "purple_eyes": (0.11, (262, 300), (0.35, 0.85), (0.45, 0.90)),
    "yellow_eyes": (0.09, (42, 60), (0.60, 0.95), (0.75, 1.0)),
    "aqua_eyes": (0.06, (168, 198), (0.45, 0.90), (0.55, 0.95)),
    "pink_eyes": (0.05, (318, 348), (0.35, 0.70), (0.75, 1.0)),
    "black_eyes": (0.03, (0, 360), (0.0, 0.3), (0.05, 0.22)),
    "orange_eyes": (0.02, (20, 38), (0.75, 1.0), (0.80, 1.0)),
}
NEIGHBOURS = {"blonde_hair": "orange_hair", "orange_hair": "blonde_hair", "brown_hair": "orange_hair",
              "red_hair": "orange_hair", "silver_hair": "white_hair", "white_hair": "silver_hair",
              "blue_hair": "aqua_hair", "aqua_hair": "blue_hair", "pink_hair": "purple_hair",
              "purple_hair": "pink_hair", "black_hair": "brown_hair", "green_hair": "aqua_hair",
              "blue_eyes": "aqua_eyes", "aqua_eyes": "blue_eyes", "red_eyes": "orange_eyes",
              "orange_eyes": "yellow_eyes", "yellow_eyes": "orange_eyes", "brown_eyes": "red_eyes",
              "purple_eyes": "pink_eyes", "pink_eyes": "purple_eyes", "green_eyes": "aqua_eyes",
              "black_eyes": "brown_eyes"}


def _pick(rng, table):
    names = list(table)
    p = np.array([table[n][0] for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _colour(rng, spec, dv=0.0):
    _, hue, sat, val = spec
    h = (rng.uniform(*hue) % 360) / 360
    s = rng.uniform(*sat)
    v = float(np.clip(rng.uniform(*val) + dv, 0, 1))
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))


def _shade(rgb, f):
    return tuple(int(np.clip(c * f, 0, 255)) for c in rgb)


def _mix(a, b, t):
    return tuple(int(x * (1 - t) + y * t) for x, y in zip(a, b))


def _random_rgb(rng):
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _background(rng, s):
    from PIL import Image, ImageDraw

    kind = rng.choice(["plain", "gradient", "shapes", "noise", "bokeh"], p=[0.25, 0.2, 0.25, 0.1, 0.2])
    base = _random_rgb(rng) if rng.random() < 0.6 else tuple(int(c) for c in rng.integers(200, 256, 3))
    img = Image.new("RGB", (s, s), base)
    d = ImageDraw.Draw(img)
    if kind == "gradient":
        other = _random_rgb(rng)
        for y in range(0, s, SS):
            d.rectangle((0, y, s, y + SS), fill=_mix(base, other, y / s))
    elif kind == "shapes":
        for _ in range(int(rng.integers(3, 12))):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.05, 0.35) * s
            box = (x - r, y - r, x + r, y + r)
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=_random_rgb(rng))
    elif kind == "noise":
        blotches = rng.normal(0, 40, (s // 8 + 1, s // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:s, :s]
        arr = np.asarray(img, np.float32) + blotches
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    elif kind == "bokeh":
        for _ in range(int(rng.integers(5, 15))):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.03, 0.12) * s
            d.ellipse((x - r, y - r, x + r, y + r), fill=_mix(base, _random_rgb(rng), 0.5))
    return img


def _eye(d, rng, ex, ey, w, h, iris, closed, outline):
    if closed:
        d.arc((ex - w, ey - h * 0.5, ex + w, ey + h * 0.5), 200, 340, fill=outline, width=2 * SS)
        return
    d.ellipse((ex - w, ey - h, ex + w, ey + h), fill=(250, 250, 252))
    iw, ih = w * rng.uniform(0.62, 0.8), h * rng.uniform(0.8, 0.95)
    d.ellipse((ex - iw, ey - ih, ex + iw, ey + ih), fill=iris)
    d.chord((ex - iw, ey - ih, ex + iw, ey + ih), 180, 360, fill=_shade(iris, 0.6))
    pw = iw * 0.45
    d.ellipse((ex - pw, ey - pw * 1.2, ex + pw, ey + pw * 1.2), fill=_shade(iris, 0.3))
    hr = iw * 0.3
    d.ellipse((ex - iw * 0.4 - hr, ey - ih * 0.5 - hr, ex - iw * 0.4 + hr, ey - ih * 0.5 + hr), fill=(255, 255, 255))
    d.line((ex - w * 1.1, ey - h * 1.05, ex + w * 1.1, ey - h * 0.95), fill=outline, width=int(2.5 * SS))


def draw_face(seed: int, index: int, size: int = 96):
    """One picture and its tags; depends only on (seed, index)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, index, 7])
    s = size * SS
    img = _background(rng, s)
    d = ImageDraw.Draw(img)
    tags: list[str] = []
    hair_tag = _pick(rng, HAIR)
    hair = _colour(rng, HAIR[hair_tag])
    second = None
    if rng.random() < 0.05:  # two-tone hair carries both tags
        second = _pick(rng, HAIR)
        tags.append(second)
    tags.append(hair_tag)
    eye_tag = _pick(rng, EYES)
    iris = _colour(rng, EYES[eye_tag])
    if rng.random() < 0.5:
        outline = _shade(hair, rng.uniform(0.2, 0.5))
    else:
        outline = tuple(int(c) for c in rng.integers(20, 70, 3))
    skin = _colour(rng, (0, (15, 30), (0.08, 0.3), (0.85, 1.0)))
    style = rng.choice(["long", "short", "twintails", "ponytail"], p=[0.45, 0.3, 0.13, 0.12])
    cx, cy = s * rng.uniform(0.42, 0.58), s * rng.uniform(0.46, 0.6)
    r = s * rng.uniform(0.24, 0.34)
    w_line = int(rng.uniform(1.0, 2.5) * SS)
    # hair behind the head
    if style in ("long", "twintails"):
        if style == "long":
            d.rounded_rectangle((cx - 1.3 * r, cy - 0.9 * r, cx + 1.3 * r, cy + 2.6 * r), radius=r * 0.5,
                                fill=_shade(hair, 0.8))
        else:
            for sg in (-1, 1):
                d.ellipse((cx + sg * 1.25 * r - 0.45 * r, cy - 0.6 * r, cx + sg * 1.25 * r + 0.45 * r, cy + 2.2 * r),
                          fill=_shade(hair, 0.85), outline=outline, width=w_line)
    if style == "ponytail":
        d.ellipse((cx + 0.6 * r, cy - 1.3 * r, cx + 1.6 * r, cy + 0.6 * r), fill=_shade(hair, 0.85), outline=outline,
                  width=w_line)
    # neck and clothes
    d.rectangle((cx - 0.3 * r, cy + 0.7 * r, cx + 0.3 * r, cy + 1.4 * r), fill=_shade(skin, 0.92))
    cloth = _random_rgb(rng)
    d.polygon([(cx - 1.6 * r, s), (cx - 0.9 * r, cy + 1.25 * r), (cx + 0.9 * r, cy + 1.25 * r), (cx + 1.6 * r, s)],
              fill=cloth, outline=outline, width=w_line)
    # face
    d.ellipse((cx - 0.9 * r, cy - 0.95 * r, cx + 0.9 * r, cy + 0.95 * r), fill=skin, outline=outline, width=w_line)
    d.polygon([(cx - 0.85 * r, cy + 0.2 * r), (cx, cy + 1.0 * r), (cx + 0.85 * r, cy + 0.2 * r)], fill=skin)
    # eyes
    closed = rng.random() < 0.08
    ew, eh = r * rng.uniform(0.17, 0.25), r * rng.uniform(0.2, 0.3)
    ey = cy + r * rng.uniform(0.0, 0.15)
    other_iris = iris
    if rng.random() < 0.02:  # heterochromia
        other = _pick(rng, EYES)
        other_iris = _colour(rng, EYES[other])
        tags.append(other)
    for sg, col in ((-1, iris), (1, other_iris)):
        _eye(d, rng, cx + sg * 0.4 * r, ey, ew, eh, col, closed, outline)
    d.arc((cx - 0.12 * r, cy + 0.45 * r, cx + 0.12 * r, cy + 0.6 * r), 20, 160, fill=_shade(skin, 0.55), width=SS)
    if rng.random() < 0.3:  # blush
        for sg in (-1, 1):
            d.ellipse((cx + sg * 0.55 * r - 0.15 * r, ey + 0.3 * r, cx + sg * 0.55 * r + 0.15 * r, ey + 0.4 * r),
                      fill=_mix(skin, (240, 120, 140), 0.5))
    tags.append(eye_tag)
    glasses = rng.random() < 0.08
    if glasses:
        gcol = tuple(int(c) for c in rng.integers(0, 160, 3))
        for sg in (-1, 1):
            gx = cx + sg * 0.4 * r
            d.rectangle((gx - ew * 1.5, ey - eh * 1.3, gx + ew * 1.5, ey + eh * 1.3), outline=gcol, width=w_line)
        tags.append("glasses")
    # hair on top: cap + bangs with strands and a highlight
    top = _shade(hair, rng.uniform(0.9, 1.05))
    d.chord((cx - 1.05 * r, cy - 1.2 * r, cx + 1.05 * r, cy + 0.5 * r), 180, 360, fill=top, outline=outline,
            width=w_line)
    bang_len = rng.uniform(0.05, 0.4) * r
    for k in range(int(rng.integers(4, 8))):
        bx = cx - 0.95 * r + (k + rng.uniform(0.2, 0.8)) * (1.9 * r / 7)
        tip = (bx + rng.uniform(-0.05, 0.05) * r, ey - eh + bang_len)
        d.polygon([(bx - 0.18 * r, cy - 0.4 * r), (bx + 0.18 * r, cy - 0.4 * r), tip], fill=top)
    if second:
        d.chord((cx - 1.05 * r, cy - 1.2 * r, cx + 1.05 * r, cy + 0.1 * r), 180, 270, fill=_colour(rng, HAIR[second]))
    hl = _mix(top, (255, 255, 255), rng.uniform(0.2, 0.5))
    d.arc((cx - 0.7 * r, cy - 0.95 * r, cx + 0.7 * r, cy - 0.2 * r), 200, 340, fill=hl, width=int(0.08 * r))
    for _ in range(int(rng.integers(3, 8))):
        x0 = cx + rng.uniform(-0.9, 0.9) * r
        d.line((x0, cy - 1.1 * r, x0 + rng.uniform(-0.2, 0.2) * r, cy - 0.45 * r), fill=_shade(top, 0.7), width=SS)
    if style == "twintails":
        tags.append("twintails")
    if style == "ponytail":
        tags.append("ponytail")
    tags.append("long_hair" if style in ("long", "twintails", "ponytail") else "short_hair")
    # accessories in any colour: a bow, a hat
    if rng.random() < 0.25:
        bcol, bx, by = _random_rgb(rng), cx + rng.choice([-0.8, 0.8]) * r, cy - 0.9 * r
        d.polygon([(bx, by), (bx - 0.3 * r, by - 0.2 * r), (bx - 0.3 * r, by + 0.2 * r)], fill=bcol, outline=outline)
        d.polygon([(bx, by), (bx + 0.3 * r, by - 0.2 * r), (bx + 0.3 * r, by + 0.2 * r)], fill=bcol, outline=outline)
        tags.append("hair_bow")
    if rng.random() < 0.1:
        d.rectangle((cx - 1.2 * r, cy - 1.05 * r, cx + 1.2 * r, cy - 0.8 * r), fill=_random_rgb(rng), outline=outline)
        d.rectangle((cx - 0.75 * r, cy - 1.7 * r, cx + 0.75 * r, cy - 0.95 * r), fill=_random_rgb(rng), outline=outline)
        tags.append("hat")
    # camera: rotation, colour cast, blur, downsample, JPEG later
    img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, fillcolor=tuple(img.getpixel((1, 1))))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0) * SS))
    img = img.resize((size, size), Image.LANCZOS)
    arr = np.asarray(img, np.float32)
    arr = arr * rng.uniform(0.85, 1.12) + rng.normal(0, 8, 3) + rng.uniform(-15, 15)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    # labels as people write them: some left out, some colours named as their neighbour
    out = []
    for t in tags:
        if rng.random() < 0.07:
            continue
        if t in NEIGHBOURS and rng.random() < 0.05:
            t = NEIGHBOURS[t]
        if closed and t == eye_tag and rng.random() < 0.5:
            continue
        out.append(t)
    return img, sorted(set(out))


def _write(task):
    seed, index, size, out = task
    img, tags = draw_face(seed, index, size)
    base = Path(out) / f"face_{index:06d}"
    img.save(f"{base}.jpg", "JPEG", quality=int(60 + (index * 7919) % 36))
    Path(f"{base}.txt").write_text(", ".join(tags) + "\n", encoding="utf-8")
    return index


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=15000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(a.seed, i, a.size, str(out)) for i in range(a.n)]
    with ProcessPoolExecutor(a.workers) as ex:
        for _ in ex.map(_write, tasks, chunksize=256):
            pass
    h = hashlib.sha256()
    for i in range(a.n):
        base = out / f"face_{i:06d}"
        h.update(Path(f"{base}.jpg").read_bytes())
        h.update(Path(f"{base}.txt").read_bytes())
    print(f"{a.n} images in {out}; sha256 of all files in order: {h.hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
