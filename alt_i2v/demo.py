"""The demo: a generated illustration-like dataset and the whole pipeline run on it, offline.

:func:`generate_demo_dataset` draws small pictures of "girls" (head, hair, dress) on backgrounds with
floating items, and writes them in the contract layout with Danbooru-style tags: backgrounds, counts
(``solo``, ``2girls``, ``multiple_girls``), hair colours and lengths, accessories, two characters and
their copyright. Every tag is a function of what is drawn, so a model can learn all of them.
:func:`run_demo` then runs vocab -> build -> train (tiny backbone) -> evaluate -> tag -> similar, and
reuses whatever an earlier run already finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AltI2VError
from .fsutil import atomic_write_bytes

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
    data = buf.getvalue()
    md5 = hashlib.md5(data).hexdigest()
    ext = "jpg" if as_jpeg else "png"
    rel = f"images/{md5[:2]}/{md5}.{ext}"
    path = Path(data_dir) / rel
    if not (path.exists() and path.stat().st_size == len(data)):
        atomic_write_bytes(path, data)
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
    from .config import resolve_workers
    from .dataset import POSTS_FILE
    from .fsutil import atomic_write_json, atomic_write_text
    from .progress import bar

    data_dir = Path(data_dir)
    settings = {"version": DEMO_VERSION, "n_images": int(n_images), "seed": int(seed), "size": int(size)}
    marker = data_dir / MARKER
    if marker.exists() and (data_dir / POSTS_FILE).exists():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
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


# ---------------------------------------------------------------------------------------------------------
# The end-to-end run


@dataclass(frozen=True)
class DemoSettings:
    """One demo size: the data it generates and the training it runs (all passed to the stages)."""

    name: str
    n_images: int
    source_size: int  # pixels of the generated files
    image_size: int  # pixels of the store and the model
    train: dict = field(default_factory=dict)  # train() settings
    min_micro_f1: float = 0.95  # the test score this demo is expected to reach
    seed: int = 0
    show: int = 4  # images tagged on screen


FULL = DemoSettings("full", n_images=3000, source_size=64, image_size=48, min_micro_f1=0.95, train={
    "backbone": "tiny", "weights": None, "filters": (16, 32, 64), "epochs": 8, "batch_size": 32, "lr": 2e-3,
    "zoom": 0.0, "patience": 0})
QUICK = DemoSettings("quick", n_images=800, source_size=64, image_size=32, min_micro_f1=0.8, train={
    "backbone": "tiny", "weights": None, "filters": (16, 32, 64), "epochs": 5, "batch_size": 32, "lr": 3e-3,
    "zoom": 0.0, "patience": 0})


@dataclass
class DemoResult:
    """What a demo run produced: where everything is, the test scores, and what each stage took."""

    out_dir: Path
    data_dir: Path
    model_dir: Path
    quick: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    min_micro_f1: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    reused: list[str] = field(default_factory=list)
    tagged: list[dict[str, Any]] = field(default_factory=list)  # {"file", "predicted", "true"}
    similar: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def micro_f1(self) -> float:
        return float(self.metrics.get("micro_f1", 0.0))

    @property
    def passed(self) -> bool:
        return self.micro_f1 >= self.min_micro_f1

    def summary(self) -> dict[str, Any]:
        m = self.metrics
        rows: dict[str, Any] = {
            "demo": f"{'quick' if self.quick else 'full'} ({self.out_dir})",
            "test micro F1": f"{self.micro_f1:.4f} (expected >= {self.min_micro_f1}: "
                             f"{'yes' if self.passed else 'NO'})",
            "test macro F1 / mAP": f"{m.get('macro_f1', 0):.4f} / {m.get('map', 0):.4f}",
        }
        if self.similar.get("neighbour_jaccard") is not None:
            sim = self.similar
            rows["similar images"] = (f"top-{sim['k']} neighbours share {sim['neighbour_jaccard']:.0%} of their tags "
                                      f"(random pairs: {sim['random_jaccard']:.0%})")
        rows["stages (s)"] = {k: round(v, 1) for k, v in self.stages.items()}
        rows["reused"] = ", ".join(self.reused) or "nothing (first run)"
        rows["seconds"] = round(self.seconds, 1)
        return rows

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("out_dir", "data_dir", "model_dir"):
            out[k] = str(out[k])
        out["stages"] = {k: round(v, 2) for k, v in self.stages.items()}
        out["seconds"] = round(self.seconds, 2)
        out["micro_f1"], out["passed"] = self.micro_f1, self.passed
        return out


def _say(quiet: bool, text: str = "") -> None:
    if not quiet:
        print(text, flush=True)


def _finished_model(model_dir: Path) -> bool:
    """A completed training run: model.keras, thresholds.json and a config.json that says finished."""
    cfg = model_dir / "config.json"
    if not ((model_dir / "model.keras").exists() and (model_dir / "thresholds.json").exists() and cfg.exists()):
        return False
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("finished"))
    except (OSError, json.JSONDecodeError):
        return False


def _fresh_metrics(model_dir: Path) -> dict | None:
    """Test metrics of the current model.keras, if an earlier run already evaluated it."""
    path = model_dir / "reports" / "metrics.json"
    try:
        if path.stat().st_mtime < (model_dir / "model.keras").stat().st_mtime:
            return None
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if metrics.get("split") == "test" and "micro_f1" in metrics else None


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def run_demo(out_dir: str | os.PathLike = "alt-i2v-demo", *, quick: bool = False, quiet: bool = False
             ) -> DemoResult:
    """Generate the demo data in ``out_dir`` and run every stage on it, printing what each did.

    Layout: ``OUT/data`` (dataset, vocab, store), ``OUT/model`` (model directory with curves.png and
    reports/report.md), ``OUT/similar.index`` and ``OUT/demo.json`` (this run's summary); ``--quick`` uses
    ``OUT/quick/`` the same way. Anything an earlier run finished is reused, an interrupted training resumes.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter (CUDA probing)
    from .dataset import iter_posts, post_image_path
    from .fsutil import atomic_write_json
    from .progress import summary
    from .store import build_store
    from .vocab import VOCAB_FILE, Vocab, build_vocab

    cfg = QUICK if quick else FULL
    t_start = time.perf_counter()
    out = Path(out_dir) / "quick" if quick else Path(out_dir)
    data, model_dir = out / "data", out / "model"
    result = DemoResult(out_dir=out, data_dir=data, model_dir=model_dir, quick=quick, min_micro_f1=cfg.min_micro_f1)
    _say(quiet, f"alt-i2v demo ({cfg.name}): {cfg.n_images} generated illustrations -> vocab -> store -> "
                f"train (tiny CNN, {cfg.image_size}px) -> evaluate -> tags -> similar images, in {out}")

    def stage(name: str, t0: float, reused: bool = False) -> None:
        result.stages[name] = time.perf_counter() - t0
        if reused:
            result.reused.append(name)

    # 1. data
    t0 = time.perf_counter()
    gen = generate_demo_dataset(data, cfg.n_images, seed=cfg.seed, size=cfg.source_size, quiet=quiet)
    stage("generate", t0, gen["reused"])
    counts = gen.get("tag_counts", {})
    summary("1/7 generate", {
        "dataset": f"{data} ({'already there' if gen['reused'] else 'written'})",
        "images": f"{cfg.n_images} ({cfg.source_size}x{cfg.source_size}, seed {cfg.seed})",
        "tags": f"{len(counts)} distinct; most common: " + ", ".join(list(counts)[:6]),
        "rarest": ", ".join(f"{t} ({c})" for t, c in list(counts.items())[-3:]),
        "seconds": round(result.stages["generate"], 1)}, quiet=quiet)

    # 2. vocabulary
    t0 = time.perf_counter()
    vocab_reused = (data / VOCAB_FILE).exists()
    vocab = Vocab.load(data) if vocab_reused else build_vocab(data)
    stage("vocab", t0, vocab_reused)
    cats: dict[str, int] = {}
    for c in vocab.tag_categories:
        cats[c] = cats.get(c, 0) + 1
    summary("2/7 vocab", {"tags": len(vocab), "by category": cats, "written": str(data / VOCAB_FILE)}, quiet=quiet)

    # 3. store
    t0 = time.perf_counter()
    built = build_store(data, image_size=cfg.image_size, quiet=quiet)
    stage("build", t0, built.stored == 0)
    summary("3/7 build", {"store": str(built.path), "stored now": built.stored, "already stored": built.already,
                          "records per split": built.counts, "seconds": round(result.stages["build"], 1)},
            quiet=quiet)

    # 4. training
    from .train import train

    t0 = time.perf_counter()
    if _finished_model(model_dir):
        stage("train", t0, True)
        summary("4/7 train", {"model": f"{model_dir} (already trained; delete it to train again)"}, quiet=quiet)
    else:
        resume = (model_dir / "config.json").exists()
        trained = train(data, model_dir, resume=resume, quiet=quiet, **cfg.train)
        stage("train", t0)
        summary("4/7 train", trained.summary(), quiet=quiet)

    # 5. evaluation on the test split
    t0 = time.perf_counter()
    metrics = _fresh_metrics(model_dir)
    if metrics is None:
        from .evaluate import evaluate

        evaluated = evaluate(data, model_dir, split="test", quiet=quiet)
        metrics = evaluated.metrics
        stage("evaluate", t0)
        summary("5/7 evaluate", evaluated.summary(), quiet=quiet)
    else:
        stage("evaluate", t0, True)
        summary("5/7 evaluate", {"test micro F1": metrics["micro_f1"], "macro F1": metrics.get("macro_f1"),
                                 "mAP": metrics.get("map"), "report": str(model_dir / "reports" / "report.md"),
                                 "note": "already evaluated"}, quiet=quiet)
    result.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}

    # 6. tag a few test images
    from .tagger import Tagger

    t0 = time.perf_counter()
    tagger = Tagger(model_dir)
    posts = {p["id"]: p for p in iter_posts(data)}
    test_ids = [pid for pid in posts if _split_of(pid) == "test"]
    shown = test_ids[:cfg.show]
    files = [str(post_image_path(posts[pid], data)) for pid in shown]
    predicted = tagger.predict_tags(files)
    _say(quiet, "== 6/7 tags (test images the model never saw; calibrated thresholds) ==")
    for pid, file, pred in zip(shown, files, predicted):
        true = {t for c in vocab.categories for t in posts[pid]["tags"].get(c, ())}
        got = set(pred)
        result.tagged.append({"id": pid, "file": file, "predicted": pred, "true": sorted(true)})
        _say(quiet, f"  {os.path.relpath(file, out)}")
        _say(quiet, "    predicted: " + ", ".join(f"{t} {p:.2f}" for t, p in pred.items()))
        verdict = "all tags right" if got == true else \
            "; ".join(x for x in (f"missed {', '.join(sorted(true - got))}" if true - got else "",
                                  f"extra {', '.join(sorted(got - true))}" if got - true else "") if x)
        _say(quiet, f"    true tags: {len(true)}, {verdict}")
    stage("tag", t0)

    # 7. similar images
    t0 = time.perf_counter()
    result.similar, index_reused = _similar(tagger, data, out / "similar.index", posts, test_ids, shown[0], quiet)
    stage("similar", t0, index_reused)

    result.seconds = time.perf_counter() - t_start
    result.paths = {
        "posts": str(data / "posts.jsonl"), "vocab": str(data / VOCAB_FILE), "store": str(data / "store"),
        "model": str(model_dir / "model.keras"), "thresholds": str(model_dir / "thresholds.json"),
        "history": str(model_dir / "history.csv"), "curves": str(model_dir / "curves.png"),
        "metrics": str(model_dir / "reports" / "metrics.json"), "report": str(model_dir / "reports" / "report.md"),
        "index": str(out / "similar.index"), "summary": str(out / "demo.json")}
    atomic_write_json(out / "demo.json", {**result.to_json(), "settings": {**asdict(cfg), "train": {
        k: list(v) if isinstance(v, tuple) else v for k, v in cfg.train.items()}}})
    summary("demo done", {**result.summary(), **{k: result.paths[k] for k in
                                                  ("model", "curves", "report", "index", "summary")}}, quiet=quiet)
    if not result.passed:
        _say(quiet, f"note: test micro F1 {result.micro_f1:.4f} is below the {cfg.min_micro_f1} this demo usually "
                    "reaches (a busy machine does not change scores; a changed backbone or settings may)")
    _say(quiet, f"next: alt-i2v --pred {_short(files[0])} --model {_short(model_dir)}")
    return result


def _short(path: str | os.PathLike) -> str:
    """The shorter of a path relative to the working directory and its absolute form."""
    path = os.path.abspath(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return rel if len(rel) < len(path) else path


def _split_of(pid: Any) -> str:
    from .store import split_of

    return split_of(pid)


def _similar(tagger: Any, data: Path, index_path: Path, posts: dict, test_ids: list, query_id: Any,
             quiet: bool, k: int = 5) -> tuple[dict[str, Any], bool]:
    """Index every stored image (or reuse the index of this model), query one test image, and measure
    how many tags the nearest neighbours of each test image share with it versus random pairs."""
    from .dataset import id_key, post_image_path
    from .progress import bar, summary
    from .search import SimilarityIndex
    from .store import Store

    index = None
    if index_path.exists():
        try:
            index = SimilarityIndex.load(index_path)
            if (index.info.get("model") or {}).get("fingerprint") != tagger.fingerprint():
                index = None
        except Exception:  # noqa: BLE001 - a stale or damaged index is simply rebuilt
            index = None
    reused = index is not None
    if index is None:
        with Store(data) as store:
            keys = store.ids()
            by_key = {id_key(pid).encode(): pid for pid in posts}
            keys = [key for key in keys if key in by_key]
            embs = []
            for s in bar(range(0, len(keys), 256), total=math.ceil(len(keys) / 256), desc="index", unit="batch",
                         quiet=quiet):
                images, _ = store.get_batch(keys[s:s + 256])
                embs.append(tagger.embed_arrays(images))
            keys = [key for key in keys if key not in store.bad]  # records that did not decode are left out
        ids = [by_key[key] for key in keys]
        index = SimilarityIndex.build(np.concatenate(embs), ids,
                                      paths=[str(post_image_path(posts[i], data)) for i in ids],
                                      info={"model": tagger.identity(), "source": {"data": str(data.resolve())}})
        index.save(index_path)

    def tags(pid: Any) -> set:
        t = posts[pid]["tags"]
        return {x for c in tagger.vocab.categories for x in t.get(c, ())}

    query_file = str(post_image_path(posts[query_id], data))
    hits = [(i, s) for i, s in index.search(tagger.embed(query_file), k + 1) if i != query_id][:k]
    _say(quiet, f"== 7/7 similar images (cosine over {len(index)} embeddings) ==")
    _say(quiet, f"  query {os.path.relpath(query_file, data.parent)}: {', '.join(sorted(tags(query_id)))}")
    for rank, (pid, score) in enumerate(hits, 1):
        shared = tags(pid) & tags(query_id)
        _say(quiet, f"  {rank}. {score:.3f}  {os.path.relpath(index.path_at(index.position(pid)), data.parent)}  "
                    f"shares {len(shared)}/{len(tags(query_id))} tags")
    # how good the neighbourhoods are, over the whole test split
    indexed = set(index.ids)
    q_ids = [i for i in test_ids if i in indexed]
    vecs = index.vectors()[[index.position(i) for i in q_ids]].astype(np.float32)
    near = index.search(vecs, k + 1)
    jac = [np.mean([_jaccard(tags(q), tags(i)) for i, _ in row if i != q][:k]) for q, row in zip(q_ids, near)]
    rng = np.random.default_rng(0)
    all_ids = index.ids
    rand = [_jaccard(tags(q), tags(all_ids[int(j)])) for q in q_ids for j in rng.integers(len(all_ids), size=k)]
    out = {"query": query_file, "neighbours": [{"id": i, "cosine": s} for i, s in hits], "k": k,
           "neighbour_jaccard": float(np.mean(jac)), "random_jaccard": float(np.mean(rand)),
           "index": str(index_path), "images": len(index)}
    summary("similar", {"index": f"{index_path} ({'reused' if reused else 'built'}, {len(index)} images)",
                        "neighbour quality": f"top-{k} neighbours of the {len(q_ids)} test images share "
                                             f"{out['neighbour_jaccard']:.0%} of their tags (Jaccard); "
                                             f"random pairs {out['random_jaccard']:.0%}"}, quiet=quiet)
    return out, reused
