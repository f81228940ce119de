"""The store's record format: keys, msgpack values (never pickle), the checks every decoded record passes.

Keys of one LevelDB (``id_key`` is ``i<int id>`` or ``s<str id>``)::

    __meta__                 msgpack {version, image_size, resize, vocab_sha256, num_tags, split, counts}
    r/<id_key>               msgpack {"id", "image": uint8 HxWx3 (msgpack-numpy), "labels", "split"}
    s/<split>/<id_key>       msgpack [labels]  (a small index: splits and labels without touching images)
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import msgpack
import msgpack_numpy
import numpy as np

from ..errors import BadRecordError, StoreMismatchError
from ..data.vocab import Vocab

STORE_VERSION = 1
META_KEY = b"__meta__"
REC = b"r/"
IDX = b"s/"
SPLITS = ("train", "val", "test")
LAYOUT_FILE = "meta.json"  # a sharded store's layout (alt_i2v.store.layout); absent in a one-shard store


def split_of(pid: Any, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """A stable split from a hash of the id: rebuilding never moves an image between splits."""
    from ..data.posts import id_key

    h = int.from_bytes(hashlib.sha256(id_key(pid).encode()).digest()[:8], "big") / 2.0 ** 64
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=msgpack_numpy.encode, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """msgpack (+ msgpack-numpy arrays of plain numeric dtypes only); nothing is ever unpickled.

    Anything else (object or structured dtypes, a shape that disagrees with the bytes, broken msgpack)
    is a :class:`BadRecordError`, never a crash or a half-decoded array.
    """
    try:
        return msgpack.unpackb(data, object_hook=_decode_array, raw=False, strict_map_key=False)
    except BadRecordError:
        raise
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
        raise BadRecordError(f"undecodable msgpack ({type(e).__name__}: {str(e)[:100]})") from None


# The dtypes a store ever holds (images are uint8; counts and scalars are plain numbers). A dtype outside
# this list, such as a structured one with an object field, would let the record's bytes become pointers.
ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in (
    "|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8",
    ">u2", ">i2", ">u4", ">i4", ">u8", ">i8", ">f2", ">f4", ">f8"))


def _decode_array(obj: dict) -> Any:
    if b"nd" not in obj:
        return obj
    typ, kind, shape, data = obj.get(b"type"), obj.get(b"kind", b""), obj.get(b"shape", ()), obj.get(b"data")
    typ = typ.decode("ascii", "replace") if isinstance(typ, bytes) else typ
    if kind or not isinstance(typ, str) or typ not in ALLOWED_DTYPES or not isinstance(data, bytes):
        raise BadRecordError(f"array of dtype {str(typ)[:60]} (kind {kind!r}) is not a plain numeric array; "
                             "refusing to decode it")
    dtype = np.dtype(typ)
    if obj[b"nd"] is not True:
        if len(data) != dtype.itemsize:
            raise BadRecordError("numpy scalar with the wrong number of bytes")
        return np.frombuffer(data, dtype=dtype)[0]
    if not (isinstance(shape, (list, tuple)) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 31 for d in shape)):
        raise BadRecordError(f"array shape {str(shape)[:60]} is not a list of sizes")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
        raise BadRecordError(f"array of shape {tuple(shape)} {typ} does not match its {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def check_record(rec: Any, image_size: int, num_tags: int) -> dict:
    """``rec`` if it is the record the store's meta promises (uint8 SxSx3 image, labels below num_tags),
    else BadRecordError: a damaged or foreign record never reaches training as a wrong array."""
    if not isinstance(rec, dict):
        raise BadRecordError("record is not a map")
    img, labels = rec.get("image"), rec.get("labels")
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != (image_size, image_size, 3):
        what = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise BadRecordError(f"image is {what}, the store holds uint8 ({image_size}, {image_size}, 3)")
    if not (isinstance(labels, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                             and 0 <= x < num_tags for x in labels)):
        raise BadRecordError(f"labels are not tag indices below {num_tags}")
    return rec


def encode_record(pid: Any, image: np.ndarray, labels: Sequence[int], split: str) -> bytes:
    return pack({"id": pid, "image": np.ascontiguousarray(image, dtype=np.uint8),
                 "labels": [int(x) for x in labels], "split": split})


def multi_hot(labels: Sequence[Sequence[int]], num_tags: int, dtype: Any = np.float32) -> np.ndarray:
    """Label index lists to an ``(N, num_tags)`` 0/1 matrix."""
    y = np.zeros((len(labels), num_tags), dtype=dtype)
    for i, lab in enumerate(labels):
        if len(lab):
            y[i, np.asarray(lab, dtype=np.int64)] = 1
    return y


def check_meta(meta: dict, *, vocab: Vocab | None = None, image_size: int | None = None,
               resize: str | None = None, where: str = "store") -> None:
    """Raise StoreMismatchError when a store's meta disagrees with what the caller expects."""
    problems = []
    if vocab is not None and meta.get("vocab_sha256") != vocab.sha256:
        problems.append(f"it was built with a different vocabulary ({meta.get('num_tags')} tags, "
                        f"sha256 {str(meta.get('vocab_sha256'))[:12]}…) than the one given ({len(vocab)} tags, "
                        f"{vocab.sha256[:12]}…)")
    if image_size is not None and int(meta.get("image_size", -1)) != int(image_size):
        problems.append(f"its images are {meta.get('image_size')}px, not {image_size}px")
    if resize is not None and meta.get("resize") != resize:
        problems.append(f"its resize mode is {meta.get('resize')!r}, not {resize!r}")
    if problems:
        raise StoreMismatchError(f"{where}: " + "; ".join(problems) +
                                 ". Rebuild it (`--build --rebuild`) or use matching settings.")
