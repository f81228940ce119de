"""The embeddings file of ``--embed``: ``FILE.npy`` ((N, D) float32, L2-normalised rows, a plain ``.npy``)
and ``FILE.ids.json`` beside it (which image each row is, the model, the images that failed), both
written atomically. docs/formats.md describes it."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fsutil import atomic_write_bytes, atomic_write_json

EMBEDDINGS_VERSION = 1


def embeddings_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``(FILE.npy, FILE.ids.json)`` for ``--out``: ``.npy`` is added when ``out`` does not end in it."""
    out = Path(out)
    if out.suffix.lower() != ".npy":
        out = out.with_name(out.name + ".npy")
    return out, out.with_name(out.name[:-4] + ".ids.json")


def write_embeddings(out: str | os.PathLike, embeddings: np.ndarray, ids: Sequence[str], *, model: str | os.PathLike,
                     failed: Sequence[dict[str, Any]] = ()) -> tuple[Path, Path]:
    """Write ``embeddings`` (one row per id) and their ids file; returns both paths."""
    npy, ids_file = embeddings_paths(out)
    buf = io.BytesIO()
    np.save(buf, np.asarray(embeddings, np.float32), allow_pickle=False)
    atomic_write_bytes(npy, buf.getvalue())
    atomic_write_json(ids_file, {"version": EMBEDDINGS_VERSION, "count": int(len(embeddings)),
                                 "dim": int(embeddings.shape[1]), "normalized": True,
                                 "model": str(Path(model).resolve()), "ids": list(ids), "failed": list(failed)})
    return npy, ids_file


__all__ = ["write_embeddings", "embeddings_paths", "EMBEDDINGS_VERSION"]
