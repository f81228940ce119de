"""What one client, or many, may take from the server: decoding memory, request slots and time.

* :class:`PixelBudget`: concurrent decodes share one budget of pixels (the largest picture the server
  accepts), so four pictures just under ``--max-pixels`` decode one after another instead of holding
  four times the memory; after a large decode the freed memory is handed back to the system.
* :class:`RequestGate`: at most :data:`MAX_REQUESTS` requests at once, each over answers 503
  ``{"error", "reason": "busy"}``; ``GET /api/health`` always has its own slots, so a monitor sees the
  server alive while every request slot is taken.
* :func:`timed_body`: a request body must keep arriving (``body_timeout`` seconds of grace, then at
  least :data:`MIN_BODY_RATE` bytes a second on average) or the request is answered 408 and its
  connection closed: slow clients cannot hold slots for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import io
import json
from typing import Any, AsyncIterator

from .uploads import UploadError

MAX_REQUESTS = 64  # requests in flight at once (every route but the health check)
HEALTH_SLOTS = 4  # connections kept beyond MAX_REQUESTS so that /api/health still answers
MAX_CONNECTIONS = MAX_REQUESTS + HEALTH_SLOTS  # uvicorn answers 503 to a request beyond this many connections
MIN_BODY_RATE = 8 << 10  # bytes a second a body must average once its grace period is over
TRIM_PIXELS = 4_000_000  # decodes at least this large hand their freed memory back to the system
HEALTH_PATH = "/api/health"


def declared_pixels(data: bytes) -> int:
    """Width x height an image's header declares (0 when it has none: the decoder reports that)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - not an image, or a broken header: the decoder says what is wrong
        return 0
    return max(0, int(w)) * max(0, int(h))


class PixelBudget:
    """``capacity`` pixels shared by every decode in flight: :meth:`reserve` waits until the picture's
    pixels fit, so decoding memory stays near that of one largest picture however many arrive at once."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self.in_use = 0
        self.peak = 0
        self._cond: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        cost = min(max(0, int(pixels)), self.capacity)  # a larger picture is refused by the decoder anyway
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_use + cost <= self.capacity)
            self.in_use += cost
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            async with self._cond:
                self.in_use -= cost
                self._cond.notify_all()


def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_TRIM = _malloc_trim()


def give_back_memory() -> None:
    """Return freed heap memory to the system (glibc keeps a large decode's pages otherwise, per thread
    arena, and the server would go on holding gigabytes after one decompression-bomb-sized picture)."""
    if _TRIM is not None:
        _TRIM(0)


class RequestGate:
    """Pure ASGI middleware: at most ``limit`` HTTP requests in the application at once; the health check
    is never counted and never refused."""

    def __init__(self, app: Any, limit: int = MAX_REQUESTS):
        self.app = app
        self.limit = limit
        self.active = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == HEALTH_PATH:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            body = json.dumps({"error": f"the server is busy ({self.limit} requests at once); try again shortly",
                               "reason": "busy"}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


async def timed_body(stream: AsyncIterator[bytes], grace: float, rate: float = MIN_BODY_RATE
                     ) -> AsyncIterator[bytes]:
    """The chunks of ``stream``, as long as they keep coming: after ``grace`` seconds the body must have
    averaged ``rate`` bytes a second, otherwise an UploadError 408 ``timeout``."""
    loop = asyncio.get_running_loop()
    start, size = loop.time(), 0
    chunks = stream.__aiter__()
    while True:
        left = start + grace + size / rate - loop.time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), left)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadError(408, "timeout", f"the request body arrived too slowly ({size:,} bytes in "
                                              f"{loop.time() - start:.0f} s); send it at once") from None
        size += len(chunk)
        yield chunk


__all__ = ["PixelBudget", "RequestGate", "timed_body", "declared_pixels", "give_back_memory", "MAX_REQUESTS",
           "HEALTH_SLOTS", "MAX_CONNECTIONS", "MIN_BODY_RATE"]
