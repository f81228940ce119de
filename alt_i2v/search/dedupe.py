"""Groups of near-copies in a dataset: the same picture resized, recompressed, cropped a little, flipped or
recoloured, and Danbooru's parent/child posts, so ``--build`` can keep each group inside one split.

Two ways to call two pictures copies of each other:

- a perceptual signature when there is no model yet: the 8x8 lowest frequencies of the picture's 32x32
  luminance DCT without the constant term (what pHash keeps, 63 numbers) as a unit vector, so brightness
  and contrast do not count; two pictures are copies when the cosine of their signatures is at least
  ``min_cosine`` (0.87). A mirrored picture has the same DCT with the odd horizontal frequencies negated,
  so each picture is also looked up as its mirror image, for free. pHash's own 64 bits (each coefficient
  against their median, compared by Hamming distance) threw away what tells a crop from a stranger: on
  the test pictures, copies cropped by 5% or recoloured reached 14-16 bits of 64 while distinct pictures
  came as close as 16; the cosines keep them apart (docs/search.md);
- cosine similarity of a model's embeddings (at least ``min_cosine``, 0.95 by default).

Either way the pairs come from the similarity index (each picture's nearest few, never all pairs: exact
search, or an approximate index for large sets), so it scales like ``--index``. Danbooru's
``parent_id`` links join their posts' groups too. Groups are the connected components of the pairs. The
report ``DATA/reports/dedupe.json`` holds ``{"groups": [[post id, ...], ...]}`` (groups of two or more),
the method and its thresholds, and is written atomically; ``DATA/reports/dedupe/`` holds one contact
sheet of thumbnails a group.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..data.groups import REPORT
from ..errors import AltI2VError

SIGNATURE_SIZE = 8  # 8 x 8 DCT coefficients, the constant one dropped: 63 numbers
_DCT_SIZE = 32
DEFAULT_MIN_COSINE = {"signature": 0.87, "embedding": 0.95}
SHEETS_DIR = "dedupe"
_MAX_SHEETS = 1000
_THUMB = 96
_FLAT = 1e-3  # a signature this short is a picture of one colour: nothing to compare


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_DCT_SIZE)
_MIRROR = np.where(np.arange(SIGNATURE_SIZE) % 2 == 1, -1.0, 1.0)[None, :]  # odd horizontal frequencies


def signature_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(signature, signature of the mirror image)``, unit float32 vectors of 63, of a uint8
    ``(32, 32, 3)`` picture; None for a picture of one colour."""
    x = np.asarray(rgb, dtype=np.float64)
    if x.shape != (_DCT_SIZE, _DCT_SIZE, 3):
        raise ValueError(f"pixels must be ({_DCT_SIZE}, {_DCT_SIZE}, 3), got {x.shape}")
    lum = x @ np.array([0.299, 0.587, 0.114]) / 255.0
    coef = (_DCT @ lum @ _DCT.T)[:SIGNATURE_SIZE, :SIGNATURE_SIZE]
    a, b = coef.ravel()[1:], (coef * _MIRROR).ravel()[1:]
    norm = float(np.linalg.norm(a))
    if norm < _FLAT:
        return None
    return (a / norm).astype(np.float32), (b / norm).astype(np.float32)


def signature(source: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`signature_pixels` of a picture (a path, bytes, PIL image or array), decoded by the one image
    loader and squeezed to 32x32 (a crop or a resize changes the picture less than its aspect would)."""
    from ..data.imaging import load_image

    return signature_pixels(load_image(source, _DCT_SIZE, "stretch"))


def similar_pairs(vectors: np.ndarray, min_cosine: float, *, mirrored: np.ndarray | None = None, k: int = 10
                  ) -> np.ndarray:
    """Pairs ``(i, j)``, i < j, of rows whose cosine is at least ``min_cosine``; with ``mirrored``, also
    rows whose mirror image is that close. Each row's ``k`` nearest are looked at through the similarity
    index (``--index-type auto``: exact while small, approximate when large)."""
    from .index import SimilarityIndex

    vectors = np.asarray(vectors, np.float32)
    n = len(vectors)
    if n < 2:
        return np.empty((0, 2), np.int64)
    index = SimilarityIndex.build(vectors, kind="auto")
    pairs = []
    step = 1024
    for queries in ([vectors] if mirrored is None else [vectors, np.asarray(mirrored, np.float32)]):
        for s in range(0, n, step):
            scores, pos = index.search_positions(queries[s:s + step], min(k + 1, n))
            rows = np.broadcast_to(np.arange(s, s + len(scores))[:, None], pos.shape)
            keep = (scores >= min_cosine) & (pos >= 0) & (pos != rows)
            pairs.append(np.sort(np.stack([rows[keep], pos[keep]], axis=1), axis=1))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), np.int64)


def groups_of(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of two or more) of the pairs over rows 0..n-1, each sorted, largest first."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for x in range(n):
        comps.setdefault(root(x), []).append(x)
    return sorted((c for c in comps.values() if len(c) > 1), key=lambda c: (-len(c), c[0]))


def _id_order(pid: Any) -> tuple:
    return (0, pid, "") if isinstance(pid, int) else (1, 0, str(pid))


def find_groups(data_dir: str | os.PathLike, *, model: str | os.PathLike | None = None,
                min_cosine: float | None = None, quiet: bool = True) -> dict:
    """The dedupe report of a dataset (see the module doc): groups of post ids, each sorted, the method and
    its threshold, counts, and the posts whose image could not be read."""
    from ..errors import ImageLoadError
    from ..data.posts import iter_posts, post_image_path
    from ..progress import bar

    data = Path(data_dir)
    posts = list(iter_posts(data))
    if not posts:
        raise AltI2VError(f"{data}: no posts to look at (posts.jsonl is missing or empty)")
    t0 = time.perf_counter()
    method = "signature" if model is None else "embedding"
    threshold = float(DEFAULT_MIN_COSINE[method] if min_cosine is None else min_cosine)
    if not -1.0 <= threshold <= 1.0:
        raise AltI2VError(f"the cosine threshold must lie in [-1, 1], got {threshold}")
    files = [post_image_path(p, data) for p in posts]
    unreadable: list[dict] = []
    about: dict[str, Any] = {"min_cosine": threshold}
    if model is None:
        ok, sigs, mirrors, flat = [], [], [], 0
        with bar(total=len(posts), desc="signatures", unit="img", quiet=quiet) as progress:
            for i, file in enumerate(files):
                try:
                    got = signature(file)
                except (ImageLoadError, OSError) as e:
                    unreadable.append({"id": posts[i]["id"], "error": str(e)})
                else:
                    if got is None:
                        flat += 1
                    else:
                        ok.append(i)
                        sigs.append(got[0])
                        mirrors.append(got[1])
                progress.update(1)
        about.update(signature="8x8 low DCT of 32x32 luminance, constant term dropped; mirror looked up too",
                     one_colour_pictures=flat)
        pairs = similar_pairs(np.asarray(sigs).reshape(-1, SIGNATURE_SIZE ** 2 - 1), threshold,
                              mirrored=np.asarray(mirrors).reshape(-1, SIGNATURE_SIZE ** 2 - 1))
    else:
        from ..tagging.tagger import get_tagger

        tagger = get_tagger(model)
        emb, ok, fails = tagger.embed_files([str(f) for f in files], quiet=quiet, desc="embed")
        unreadable = [{"file": f.get("file"), "error": f.get("error")} for f in fails]
        about["model"] = tagger.identity().get("path")
        pairs = similar_pairs(emb, threshold)
    row_pairs = [(ok[a], ok[b]) for a, b in pairs]
    by_id = {p["id"]: i for i, p in enumerate(posts)}
    parent_links = [(i, by_id[p["parent_id"]]) for i, p in enumerate(posts)
                    if p.get("parent_id") is not None and p["parent_id"] in by_id and by_id[p["parent_id"]] != i]
    groups = [sorted((posts[r]["id"] for r in g), key=_id_order)
              for g in groups_of(len(posts), row_pairs + parent_links)]
    return {"version": 1, "method": method, "thresholds": about, "groups": groups,
            "posts": len(posts), "grouped_posts": sum(len(g) for g in groups), "similar_pairs": len(row_pairs),
            "parent_links": len(parent_links), "unreadable": unreadable,
            "seconds": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_report(data_dir: str | os.PathLike, report: dict, *, sheets: bool = True) -> Path:
    """Write ``DATA/reports/dedupe.json`` atomically, and (``sheets``) a contact sheet a group under
    ``DATA/reports/dedupe/`` (the first 1,000 groups; the old sheets are replaced)."""
    from ..data.layout import DataDir
    from ..fsutil import atomic_dir, atomic_write_json

    d = DataDir(data_dir)
    if sheets:
        with atomic_dir(d.reports / SHEETS_DIR) as tmp:
            write_sheets(data_dir, report["groups"][:_MAX_SHEETS], tmp)
    return atomic_write_json(d.report(REPORT), report)


def write_sheets(data_dir: str | os.PathLike, groups: Sequence[Sequence[Any]], out: Path) -> list[Path]:
    """One JPEG a group: its pictures' thumbnails side by side, each captioned with its post id."""
    from PIL import Image, ImageDraw

    from ..data.imaging import load_image
    from ..errors import ImageLoadError
    from ..data.posts import iter_posts, post_image_path

    data = Path(data_dir)
    by_id = {p["id"]: p for p in iter_posts(data)}
    written = []
    for n, group in enumerate(groups, 1):
        per_row = min(len(group), 8)
        rows = -(-len(group) // per_row)
        sheet = Image.new("RGB", (per_row * (_THUMB + 4) + 4, rows * (_THUMB + 18) + 4), "white")
        draw = ImageDraw.Draw(sheet)
        for k, pid in enumerate(group):
            x, y = 4 + (k % per_row) * (_THUMB + 4), 4 + (k // per_row) * (_THUMB + 18)
            try:
                thumb = load_image(post_image_path(by_id[pid], data), _THUMB, "pad")
                sheet.paste(Image.fromarray(thumb), (x, y))
            except (ImageLoadError, OSError, KeyError):
                draw.rectangle([x, y, x + _THUMB - 1, y + _THUMB - 1], outline="red")
            draw.text((x, y + _THUMB + 2), str(pid)[:16], fill="black")
        path = out / f"group_{n:04d}.jpg"
        sheet.save(path, quality=85)
        written.append(path)
    return written
