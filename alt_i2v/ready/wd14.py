"""WD14 / wd-v3 tagger folders: ``model.onnx`` and ``selected_tags.csv``, as the SmilingWolf taggers ship.

``selected_tags.csv`` has the columns ``tag_id,name,category,count``, one row per output of the network
in order; ``category`` is Danbooru's number (9 rating, 0 general, 4 character; 1 artist, 3 copyright and
5 meta where present). The network takes NHWC float32 BGR pixel values 0-255 of the picture padded to a
white square and resized (bicubic) to the input size written in the graph (448 for the released models);
the image loader's ``square`` fit does the padding and resizing, :func:`to_input` the rest.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ImageConfig
from ..errors import AltI2VError
from .files import WD14, ReadyFiles

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
COLUMNS = ("tag_id", "name", "category", "count")
CATEGORY_OF = {9: "rating", 0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta"}
THRESHOLDS = {"general": 0.35, "character": 0.85}  # what the WD14 taggers' own tools default to
FIT = "square"  # pad to a white square at full size, then resize to the input size (bicubic)


def read_tags(path: str | os.PathLike) -> "Any":
    """``selected_tags.csv`` as a Vocab: names in output order, Danbooru category numbers as names,
    ``count`` kept. A missing column, an unknown category number or a repeated name is an error naming the
    line."""
    from ..data.vocab import Vocab

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            lacking = [c for c in ("name", "category") if c not in header]
            if lacking:
                raise AltI2VError(f"{path}: no {' or '.join(lacking)} column (a WD14 tag list has the columns "
                                  f"{','.join(COLUMNS)}; this one has {','.join(header) or 'none'})")
            tags, seen = [], set()
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                name = row["name"]
                try:
                    number = int(row["category"])
                except ValueError:
                    raise AltI2VError(f"{path}, line {line}: category {row['category']!r} is not a number "
                                      "(9 rating, 0 general, 4 character, ...)") from None
                if not name:
                    raise AltI2VError(f"{path}, line {line}: empty tag name")
                if number not in CATEGORY_OF:
                    raise AltI2VError(f"{path}, line {line}: unknown category number {number} for {name!r} "
                                      f"(known: {', '.join(f'{k} {v}' for k, v in CATEGORY_OF.items())})")
                if name in seen:
                    raise AltI2VError(f"{path}, line {line}: tag {name!r} appears twice")
                seen.add(name)
                count = row.get("count") or "0"
                tags.append({"name": name, "category": CATEGORY_OF[number],
                             "count": int(count) if count.isdigit() else 0})
    except UnicodeDecodeError as e:
        raise AltI2VError(f"{path}: not a UTF-8 text file ({e})") from None
    except csv.Error as e:
        raise AltI2VError(f"{path}: not a readable CSV file ({e})") from None
    if not tags:
        raise AltI2VError(f"{path}: no tags")
    order = ["general", "character", "copyright", "artist", "meta", "rating"]
    present = {t["category"] for t in tags}
    return Vocab(tags=tags, categories=[c for c in order if c in present], built_from=0)


def to_input(batch: np.ndarray) -> np.ndarray:
    """Loaded uint8 RGB squares (N, S, S, 3) as the network's input: float32 BGR 0-255."""
    return np.ascontiguousarray(np.asarray(batch)[..., ::-1], dtype=np.float32)


def read_wd14(path: str | os.PathLike) -> ReadyFiles:
    """A WD14 tagger folder: its tags, and its input size read from the ONNX graph (needs the ``wd14``
    extra: onnx and onnxruntime)."""
    from .onnxrun import input_geometry, load_onnx

    root = Path(path)
    vocab = read_tags(root / TAGS_FILE)
    proto = load_onnx(root / MODEL_FILE)
    size, _ = input_geometry(proto, root / MODEL_FILE)
    image = ImageConfig(image_size=size, resize=FIT)
    return ReadyFiles(family=WD14, root=root, vocab=vocab, image=image, weights=root / MODEL_FILE,
                      thresholds=dict(THRESHOLDS), info={"input_size": size, "proto": proto},
                      load=_load_runner)


def _load_runner(files: ReadyFiles, **kw: Any) -> Any:
    from .onnxrun import OnnxRunner

    proto = files.info.pop("proto", None)
    return OnnxRunner(files.weights, len(files.vocab), to_input, proto=proto, **kw)


__all__ = ["read_wd14", "read_tags", "to_input", "MODEL_FILE", "TAGS_FILE", "COLUMNS", "CATEGORY_OF", "THRESHOLDS"]
