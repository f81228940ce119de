"""An index on disk: a directory written atomically and read back with every file checked (no pickle).

::

    INDEX/index.json     header: format, version, dim, count, dtype, files with sha256 and size, approx, info
    INDEX/vectors.npy    (count, dim) float32|float16, C order, read with allow_pickle=False (exact, ivf-sq8)
    INDEX/vectors.f16    ivf-pq: (count, dim) float16 rows, raw, memory-mapped (version 2)
    INDEX/ids.json       {"ids": [...] | null (= 0..count-1), "paths": [...] | null, "removed": [positions]}
    INDEX/approx.faiss   optional, faiss's own binary serialisation of the approximate index

Version 2 (written only when version 1 cannot say it: an ivf-pq index, or removed ids) adds
``vectors.f16`` and ``removed``. ``vectors.f16`` is the one file checked by size only: hashing 40 GB on
every open would take minutes, and adding to the index appends to it in place (a hard link into the new
directory, so the old index stays whole until the new one is renamed in); rows past ``count`` are the
leftovers of an add that was interrupted, and are ignored and overwritten by the next one.

A file whose size or sha256 differs from the header, a newer format version, or arrays that disagree with
the header are a clear :class:`IndexFileError` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AltI2VError, UsageError
from ..fsutil import atomic_dir, file_digest, read_json_object

INDEX_FORMAT = "alt-i2v-similarity-index"
INDEX_VERSION = 2
HEADER_FILE = "index.json"
VECTORS_FILE = "vectors.npy"
RAW_FILE = "vectors.f16"
IDS_FILE = "ids.json"
APPROX_FILE = "approx.faiss"
DTYPES = ("float32", "float16")
_IO_CHUNK = 16 << 20


class IndexFileError(AltI2VError):
    """An index on disk is damaged, incomplete, of a newer version, or does not fit what uses it."""


def _passive_threads() -> None:
    """OpenMP threads that sleep at barriers instead of spinning, set before faiss loads its runtime: on a
    busy machine spinning threads starve each other (training an ivf-pq index took 374 s instead of 8 s
    with the two cores shared). An OMP_WAIT_POLICY already set is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def faiss_available() -> bool:
    """Whether the optional approximate backend can be used (``pip install alt-i2v[faiss]``)."""
    _passive_threads()
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _import_faiss():
    _passive_threads()
    try:
        import faiss
    except ImportError:
        raise AltI2VError("the approximate index needs faiss: pip install 'alt-i2v[faiss]' (faiss-cpu), "
                          "or leave out --approx / approx=True to use exact search") from None
    return faiss


def save_index(index: Any, path: str | os.PathLike) -> Path:
    """Write ``index`` as a directory atomically (fsutil.atomic_dir: a temp directory renamed into place)."""
    path = Path(path)
    if path.exists() and not (path / HEADER_FILE).is_file():
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        else:
            raise UsageError(f"{path} exists and is not an alt-i2v index; choose another --out path")
    raw = index.kind == "ivf-pq"
    with atomic_dir(path) as tmp:
        if raw:
            files = {RAW_FILE: _write_raw(index, tmp / RAW_FILE, path / RAW_FILE)}
        else:
            files = {VECTORS_FILE: _write_vectors(index, tmp / VECTORS_FILE)}
        ids_doc = {"ids": index._ids, "paths": index._paths}
        if index._removed:
            ids_doc["removed"] = sorted(index._removed)
        files[IDS_FILE] = _write_file(tmp / IDS_FILE, json.dumps(ids_doc, ensure_ascii=False).encode())
        if index._approx is not None:
            faiss = _import_faiss()
            faiss.write_index(index._approx, str(tmp / APPROX_FILE))  # straight to disk: no copy in memory
            files[APPROX_FILE] = {"sha256": file_digest(tmp / APPROX_FILE, chunk=_IO_CHUNK),
                                  "bytes": (tmp / APPROX_FILE).stat().st_size}
        version = 2 if raw or index._removed else 1
        header = {"format": INDEX_FORMAT, "version": version, "dim": index.dim, "count": index.count,
                  "dtype": "float16" if raw else str(index.dtype), "metric": "cosine", "normalized": True,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
                  "approx": index.approx_params, "info": index.info}
        _write_file(tmp / HEADER_FILE, (json.dumps(header, indent=2, ensure_ascii=False) + "\n").encode())
    return path


def _write_vectors(index: Any, file: Path) -> dict:
    """Stream the blocks into one .npy (no full-size copy), hashing the bytes as they are written."""

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(index.dtype),
                                                "fortran_order": False, "shape": (index.count, index.dim)})
    h = hashlib.sha256(head.getvalue())
    size = len(head.getvalue())
    with open(file, "wb") as f:
        f.write(head.getvalue())
        step = max(1, _IO_CHUNK // (index.dtype.itemsize * index.dim))
        for block in index._blocks:
            for s in range(0, len(block), step):
                mv = memoryview(np.ascontiguousarray(block[s:s + step])).cast("B")
                f.write(mv)
                h.update(mv)
                size += mv.nbytes
    return {"sha256": h.hexdigest(), "bytes": size}


def _write_raw(index: Any, file: Path, existing: Path) -> dict:
    """The float16 rows of an ivf-pq index as ``vectors.f16``. When the index's first block is a map of
    ``existing`` (the file being replaced: a loaded index that grew) or of the streaming build's own
    file, that file is hard-linked in, cut to the rows it holds and only the new rows are appended;
    otherwise every row is written (a map of another index's file is copied, never shared)."""
    row = index.dim * 2
    first = index._blocks[0] if index._blocks else None
    mapped = isinstance(first, np.memmap) and first.filename is not None and Path(first.filename).is_file()
    own = getattr(index, "_staged", None)  # a file the streaming build wrote for this index alone
    reuse = mapped and ((existing.is_file() and os.path.samefile(first.filename, existing))
                        or (own is not None and os.path.samefile(first.filename, own)))
    if reuse:
        os.link(first.filename, file)
        blocks, start = index._blocks[1:], len(first)
        mode = "r+b"
    else:
        blocks, start, mode = index._blocks, 0, "wb"
    with open(file, mode) as f:
        f.truncate(start * row)
        f.seek(start * row)
        step = max(1, _IO_CHUNK // row)
        for block in blocks:
            for s in range(0, len(block), step):
                f.write(memoryview(np.ascontiguousarray(block[s:s + step], dtype=np.float16)).cast("B"))
    return {"bytes": index.count * row, "rows": index.count, "checked": "size"}


def _map_raw(path: Path, entry: Any, count: int, dim: int) -> np.ndarray:
    file = path / RAW_FILE
    if not isinstance(entry, dict) or "bytes" not in entry:
        raise IndexFileError(f"{path / HEADER_FILE}: no entry for {RAW_FILE}; rebuild the index")
    if not file.is_file():
        raise IndexFileError(f"{file}: missing; the index is incomplete, rebuild it")
    size, want = file.stat().st_size, count * dim * 2
    if size < want or int(entry["bytes"]) != want:
        raise IndexFileError(f"{file}: {size} bytes, the header needs {want} ({count} x {dim} float16): the "
                             "index is damaged (truncated); rebuild it")
    return np.memmap(file, dtype=np.float16, mode="r", shape=(count, dim))


def load_index(cls: type, path: str | os.PathLike, *, verify: bool = True, mmap: bool = False) -> Any:
    """Read an index directory into a ``cls`` (SimilarityIndex). ``verify`` checks every file's sha256 (one
    pass over the data); ``mmap`` maps the vectors read-only instead of reading them into memory."""
    path = Path(path)
    header_file = path / HEADER_FILE
    if not path.exists():
        raise IndexFileError(f"{path}: no such index; build one with `alt-i2v --index --model DIR "
                             f"--images DIR --out {path}`")
    if not header_file.is_file():
        raise IndexFileError(f"{path}: not an alt-i2v index (no {HEADER_FILE})")
    header = read_json_object(header_file, "index header", error=IndexFileError, hint="; rebuild the index")
    if header.get("format") != INDEX_FORMAT:
        raise IndexFileError(f"{header_file}: not an alt-i2v similarity index header")
    if int(header.get("version", 0)) > INDEX_VERSION:
        raise IndexFileError(f"{path}: index format version {header.get('version')} is newer than this "
                             f"alt-i2v reads ({INDEX_VERSION}); upgrade alt-i2v or rebuild the index")
    try:
        dim, count, dtype = int(header["dim"]), int(header["count"]), str(header["dtype"])
        files = dict(header["files"])
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFileError(f"{header_file}: header lacks {e}; rebuild the index") from None
    if dtype not in DTYPES:
        raise IndexFileError(f"{header_file}: unsupported dtype {dtype!r}")
    raw = RAW_FILE in files
    for name in (IDS_FILE,) + ((APPROX_FILE,) if header.get("approx") else ()) + (() if raw else (VECTORS_FILE,)):
        _check_file(path, name, files.get(name), verify=verify and name != VECTORS_FILE)
    if raw:
        vectors = _map_raw(path, files[RAW_FILE], count, dim)
    else:
        vectors = _read_vectors(path / VECTORS_FILE, files[VECTORS_FILE], (count, dim), np.dtype(dtype),
                                verify=verify, mmap=mmap)
    ids_doc = read_json_object(path / IDS_FILE, "id list", error=IndexFileError, hint="; rebuild the index")
    try:
        ids, paths = ids_doc.get("ids"), ids_doc.get("paths")
        removed = {int(r) for r in ids_doc.get("removed") or []}
    except (TypeError, ValueError) as e:
        raise IndexFileError(f"{path / IDS_FILE}: damaged ({e}); rebuild the index") from None
    if any(not 0 <= r < count for r in removed):
        raise IndexFileError(f"{path / IDS_FILE}: removed positions outside 0..{count - 1}; rebuild the index")
    for name, lst in (("ids", ids), ("paths", paths)):
        if lst is not None and (not isinstance(lst, list) or len(lst) != count):
            raise IndexFileError(f"{path / IDS_FILE}: {name} has {len(lst) if isinstance(lst, list) else '?'} "
                                 f"entries for {count} vectors; the index is inconsistent, rebuild it")
    index = cls(dim, dtype=dtype, info=header.get("info") or {})
    index._blocks = [vectors]
    index._ids = ids
    index._paths = paths
    index._removed = removed
    index.count = count
    if header.get("approx"):
        index.approx_params = dict(header["approx"])
        if faiss_available():
            faiss = _import_faiss()
            try:
                index._approx = faiss.read_index(str(path / APPROX_FILE))
            except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError with its own text
                raise IndexFileError(f"{path / APPROX_FILE}: faiss cannot read it ({e}); rebuild the index") from None
            if index._approx.d != dim or index._approx.ntotal != count - len(removed):
                raise IndexFileError(f"{path / APPROX_FILE}: holds {index._approx.ntotal} x {index._approx.d}, "
                                     f"the index {count - len(removed)} x {dim}; rebuild the index")
            index._ivf().nprobe = int(index.approx_params.get("nprobe", 1))
        elif raw:
            raise IndexFileError(f"{path} is an ivf-pq index: it needs faiss (pip install 'alt-i2v[faiss]')")
        else:
            print("alt-i2v: note: faiss is not installed, so this index is searched exactly "
                  "(pip install 'alt-i2v[faiss]' for the approximate backend)", file=sys.stderr)
            index.approx_params = None
    return index


def _write_file(file: Path, data: bytes | memoryview) -> dict:
    """Write one file of a new index directory (made durable with it) and return its checksum entry."""
    with open(file, "wb") as f:
        f.write(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": memoryview(data).nbytes}


def _check_file(root: Path, name: str, entry: Any, *, verify: bool) -> None:
    file = root / name
    if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
        raise IndexFileError(f"{root / HEADER_FILE}: no checksum entry for {name}; rebuild the index")
    if not file.is_file():
        raise IndexFileError(f"{file}: missing; the index is incomplete, rebuild it")
    size = file.stat().st_size
    if size != int(entry["bytes"]):
        raise IndexFileError(f"{file}: {size} bytes, the header says {entry['bytes']}: the index is damaged "
                             "(truncated or overwritten); rebuild it")
    if verify:
        if file_digest(file, chunk=_IO_CHUNK) != entry["sha256"]:
            raise IndexFileError(f"{file}: checksum mismatch, the index is damaged; rebuild it")


def _read_vectors(file: Path, entry: dict, shape: tuple, dtype: np.dtype, *, verify: bool,
                  mmap: bool) -> np.ndarray:
    """Read vectors.npy (no pickle), hashing the bytes in the same pass, and check shape and dtype."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                fshape, fortran, fdtype = np.lib.format.read_array_header_1_0(f)
            else:
                fshape, fortran, fdtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise IndexFileError(f"{file}: not a readable .npy file ({e}); the index is damaged, rebuild it") from None
    if tuple(fshape) != tuple(shape) or fdtype != dtype or fortran or fdtype.hasobject:
        raise IndexFileError(f"{file}: holds {fdtype} {tuple(fshape)}, the header says {dtype} {tuple(shape)}: "
                             "the files do not belong together; rebuild the index")
    if mmap:
        if verify:
            _check_file(file.parent, file.name, entry, verify=True)
        return np.load(file, mmap_mode="r", allow_pickle=False)
    out = np.empty(shape, dtype=dtype)
    h = hashlib.sha256()
    with open(file, "rb") as f:
        h.update(f.read(offset))
        mv = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < mv.nbytes:
            n = f.readinto(mv[done:done + _IO_CHUNK])
            if not n:
                raise IndexFileError(f"{file}: truncated; the index is damaged, rebuild it")
            if verify:
                h.update(mv[done:done + n])
            done += n
    if verify and h.hexdigest() != entry.get("sha256"):
        raise IndexFileError(f"{file}: checksum mismatch, the index is damaged; rebuild it")
    return out
