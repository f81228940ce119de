"""Uploads: a multipart body read into memory under a size cap, and decoded by the one image loader.

Nothing of an upload touches the disk: the body is counted while it streams in (a request over the cap
is answered 413 as soon as its ``Content-Length`` says so, or once that many bytes have arrived), parsed
in memory, and decoded by :func:`alt_i2v.data.imaging.load_image` with the model's settings and its
decompression-bomb guard. Every refusal is an :class:`UploadError` carrying an HTTP status, a stable
``reason`` code and a message that says what to send instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..errors import AltI2VError, ImageLoadError
from ..data.imaging import describe, load_image

FILE_FIELD = "file"
MULTIPART_SLACK = 64 << 10  # boundaries, part headers and small form fields around the file
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) this far, so the client sees the 413
MAX_PARTS = 8
HOW_TO_SEND = "send the image as multipart/form-data in the field 'file' (curl -F file=@picture.jpg URL)"

# ImageLoadError.reason -> HTTP status
STATUS = {"empty": 400, "not_an_image": 415, "html": 415, "unsupported": 415, "bad_input": 415,
          "too_large": 413, "truncated": 422, "corrupt": 422}


class UploadError(AltI2VError):
    """An upload the server refuses: ``status`` (4xx), ``reason`` (a stable code) and the message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason

    def as_json(self) -> dict[str, Any]:
        return {"error": str(self), "reason": self.reason}


@dataclass
class Upload:
    """The image part of a form (bytes and the name the browser gave) and its small text fields."""

    data: bytes
    filename: str
    fields: dict[str, str] = field(default_factory=dict)


async def read_body(headers: Any, stream: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The request body, at most ``max_bytes`` plus the multipart slack; 413 beyond that."""
    limit = max_bytes + MULTIPART_SLACK
    too_big = UploadError(413, "too_large", f"upload larger than the server's limit of {max_bytes:,} bytes "
                                            "(--max-bytes); send a smaller image")
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise UploadError(400, "bad_request", "the Content-Length header is not a number") from None
        if declared > limit:
            if declared > limit + DRAIN_LIMIT:
                raise too_big
            async for _ in stream:  # drop the body so the client reads the answer instead of a reset
                pass
            raise too_big
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            if size > limit + DRAIN_LIMIT:
                raise too_big
            chunks = []
            continue
        chunks.append(chunk)
    if size > limit:
        raise too_big
    return b"".join(chunks)


def parse_form(body: bytes, content_type: str | None, max_bytes: int) -> Upload:
    """The ``file`` part and the text fields of a multipart/form-data body (all in memory)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError(415, "not_multipart", f"expected multipart/form-data, got "
                                                f"{(content_type or 'no Content-Type')!r}: {HOW_TO_SEND}")
    parts: list[dict[str, Any]] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise UploadError(400, "bad_request", f"more than {MAX_PARTS} form fields; {HOW_TO_SEND}")
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][bytes(header["field"]).lower()] = bytes(header["value"])
        header["field"], header["value"] = bytearray(), bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except UploadError:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart raises its own parse errors
        raise UploadError(400, "bad_request", f"malformed multipart body ({e}); {HOW_TO_SEND}") from None
    upload: Upload | None = None
    fields: dict[str, str] = {}
    for part in parts:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            filename = disp.get(b"filename", b"").decode("utf-8", "replace")
            upload = Upload(bytes(part["data"]), filename.replace("\\", "/").rsplit("/", 1)[-1] or "upload")
        elif name:
            fields[name] = bytes(part["data"][:4096]).decode("utf-8", "replace")
    if upload is None:
        raise UploadError(400, "no_file", f"no 'file' field in the form: {HOW_TO_SEND}")
    if len(upload.data) > max_bytes:
        raise UploadError(413, "too_large", f"{upload.filename}: {len(upload.data):,} bytes, over the server's "
                                            f"limit of {max_bytes:,} bytes (--max-bytes); send a smaller image")
    upload.fields = fields
    return upload


def decode(upload: Upload, image_size: int, resize: str, max_pixels: int, pad_color: Any) -> Any:
    """The upload through :func:`alt_i2v.data.imaging.load_image` (uint8 (S, S, 3)), or an UploadError."""
    try:
        return load_image(upload.data, image_size, resize, max_pixels=max_pixels, pad_color=pad_color)
    except ImageLoadError as e:
        message = str(e)
        prefix = describe(upload.data) + ": "
        if message.startswith(prefix):
            message = message[len(prefix):]
        what = f"{upload.filename} ({len(upload.data):,} bytes)"
        raise UploadError(STATUS.get(e.reason, 422), e.reason, f"{what}: {message}") from None
    except Exception as e:  # noqa: BLE001 - a decoder bug costs this upload, never the server
        raise UploadError(422, "corrupt", f"{upload.filename}: cannot decode ({type(e).__name__}: {e})") from None


__all__ = ["Upload", "UploadError", "read_body", "parse_form", "decode", "FILE_FIELD", "STATUS"]
