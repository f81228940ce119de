"""The FastAPI application: one page, its static files and the JSON API over one loaded model.

``POST /api/tags``, ``/api/similar`` and ``/api/explain`` take an image in the multipart field ``file``;
``GET /api/health`` and ``/api/model`` describe the server; ``POST /api/caption`` formats a caption the
way ``--write-captions`` does; ``GET /api/indexed/{position}/thumbnail`` shows an indexed image by its
row in the index (never by a path from the request). The schema is at ``/openapi.json``. Errors are
``{"error": message, "reason": code}`` with a 4xx status; the server keeps running.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..config import MAX_PIXELS_CAP, ServeConfig
from ..data.captions import CATEGORY_ORDER, format_caption
from ..errors import AltI2VError, ImageLoadError, UsageError
from .engine import ModelEngine
from .limits import TRIM_PIXELS, PixelBudget, RequestGate, declared_pixels, give_back_memory, timed_body
from .render import data_url, heat_pictures, thumbnail_jpeg
from .uploads import FILE_FIELD, Upload, UploadError, decode, parse_form, read_body

STATIC = Path(__file__).resolve().parent / "static"
MAX_JSON_BYTES = 4 << 20
INLINE_PARSE_BYTES = 256 << 10  # smaller uploads are parsed on the event loop (a thread hop costs more)  # a /api/caption body: every tag of a large vocabulary with its probability
SECURITY_HEADERS = {
    # everything the page needs comes from this server: no CDN, no inline script, no framing
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILE_FIELD],
    "properties": {FILE_FIELD: {"type": "string", "format": "binary", "description": "the image"}}}}}}}
EXPLAIN_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILE_FIELD],
    "properties": {FILE_FIELD: {"type": "string", "format": "binary", "description": "the image"},
                   "tag": {"type": "string", "description": "the tag to explain (default: the most probable)"}}}}}}}


class SecurityHeaders:
    """Pure ASGI middleware adding :data:`SECURITY_HEADERS` to every response (Starlette's
    ``@app.middleware("http")`` wraps each request in extra tasks and streams; this only edits headers)."""

    def __init__(self, app: Any):
        self.app = app
        self.extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in self.extra if h[0] not in have]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Service:
    """What the routes share: the model (behind its engine thread), the index, the limits."""

    def __init__(self, model: Any, index: Any, config: ServeConfig):
        from ..search import open_index
        from ..tagging.tagger import Tagger, get_tagger

        self.config = config
        self.index = None
        if index is not None:  # the index's own model unless one is given, checked to be the one it was built with
            self.index, self.tagger = open_index(index, model.model_dir if isinstance(model, Tagger) else model)
        elif model is not None:
            self.tagger = get_tagger(model)
        else:
            raise UsageError("give a model directory (or an index that names its model)")
        image = self.tagger.image_config
        if config.max_pixels is not None:
            image = image.replace(max_pixels=config.max_pixels)
        self.image_config = image
        self.categories = self.tagger.tag_categories
        self.model_name = "/".join(self.tagger.model_dir.resolve().parts[-2:])  # "run/model": no full path
        self.names = list(self.tagger.vocab.names)
        self._zeros = np.zeros(len(self.names), np.float32)
        self.engine = ModelEngine(self.tagger, max_batch=config.max_batch)
        self.pixels = PixelBudget(min(image.max_pixels, MAX_PIXELS_CAP))
        self.thumbnail = functools.lru_cache(maxsize=512)(self._thumbnail)

    # -------------------------------------------------------------------------------------------- uploads
    async def receive(self, request: Request) -> tuple[Upload, np.ndarray]:
        """The request's upload and its decoded model input (an UploadError when refused)."""
        body = await self.body(request, self.config.max_bytes)
        ctype = request.headers.get("content-type")
        upload = parse_form(body, ctype, self.config.max_bytes) if len(body) <= INLINE_PARSE_BYTES else \
            await run_in_threadpool(parse_form, body, ctype, self.config.max_bytes)
        cfg = self.image_config
        image = await self.decoding(upload.data, decode, upload, cfg.image_size, cfg.resize, cfg.max_pixels,
                                    cfg.pad_color)
        return upload, image

    async def body(self, request: Request, limit: int) -> bytes:
        """The request body under the size cap and the slow-body timeout."""
        return await read_body(request.headers, timed_body(request.stream(), self.config.body_timeout), limit)

    async def decoding(self, data: bytes, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the thread pool once the pixels ``data`` declares fit the shared budget; memory
        a large decode freed is handed back to the system."""
        pixels = declared_pixels(data)

        def run() -> Any:
            try:
                return fn(*args)
            finally:
                if pixels >= TRIM_PIXELS:
                    give_back_memory()

        async with self.pixels.reserve(pixels):
            return await run_in_threadpool(run)

    def thresholds(self, threshold: str | None) -> np.ndarray:
        """Per-tag thresholds for the ``threshold`` query parameter (``--threshold`` syntax)."""
        if threshold is None or threshold.strip() in ("", "calibrated"):
            return self.tagger.thresholds_for(None)
        return self.tagger.thresholds_for(threshold)

    def all_tags(self, probs: np.ndarray, top_k: int | None = None) -> dict[str, float]:
        """Every tag with its probability, most probable first: ``predict_tags(image, threshold=0.0)``."""
        return self.tagger.tags_from_probs(probs, self._zeros, top_k)

    def caption(self, tags: dict[str, float]) -> str:
        """The caption ``--write-captions`` would write for these tags (default style)."""
        return format_caption(tags, self.categories)

    # -------------------------------------------------------------------------------------------- index
    def _thumbnail(self, position: int) -> bytes:
        path = self.index.path_at(position)
        if path is None:
            raise UploadError(404, "no_paths", "this index records no image files, so it has no thumbnails")
        try:
            return thumbnail_jpeg(path, self.image_config)
        except ImageLoadError as e:
            raise UploadError(404, e.reason, f"indexed image {position} cannot be shown: {e.reason}") from None

    def neighbour(self, position: int, score: float, rank: int) -> dict[str, Any]:
        ident = self.index.id_at(position)
        path = self.index.path_at(position)
        if isinstance(ident, str) and ident == path:
            ident = Path(path).name  # an image-folder index: its ids are server paths, show only the name
        return {"rank": rank, "id": ident, "position": position, "similarity": round(float(score), 6),
                "thumbnail": f"/api/indexed/{position}/thumbnail" if path is not None else None}

    def close(self) -> None:
        self.engine.close()


def create_app(model: Any, index: Any = None, config: ServeConfig | None = None) -> FastAPI:
    """The web application over ``model`` (a model directory or a loaded Tagger; None: the one ``index``
    names) and optionally ``index`` (a similarity-index directory built with that model). The model is
    loaded here, once; every forward pass runs on one engine thread that batches concurrent requests."""
    config = config or ServeConfig()
    service = Service(model, index, config)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="alt-i2v", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Tag an illustration, see why (Grad-CAM) and find similar indexed images. "
                              "Images are sent as multipart/form-data in the field `file`.")
    app.state.service = service
    _add_error_handlers(app)

    app.add_middleware(RequestGate)
    app.add_middleware(SecurityHeaders)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health", summary="Is the server up, and what does it serve")
    async def health() -> dict[str, Any]:
        t = service.tagger
        return {"status": "ok", "version": __version__, "model": service.model_name, "tags": len(service.names),
                "image_size": t.image_config.image_size, "resize": t.image_config.resize,
                "index": len(service.index) if service.index is not None else None,
                "max_bytes": config.max_bytes, "max_pixels": service.image_config.max_pixels,
                "engine": service.engine.stats.as_dict()}

    @app.get("/api/model", summary="The vocabulary with categories and calibrated thresholds")
    async def model_info() -> dict[str, Any]:
        t = service.tagger
        present = [c for c in CATEGORY_ORDER if c in set(service.categories.values())]
        present += sorted(set(service.categories.values()) - set(present))
        return {"model": service.model_name, "family": t.family, "calibrated": bool(t.calibrated),
                "thresholds": t.threshold_source, "explain": t.model is not None,
                "global_threshold": float(t.global_threshold), "categories": present,
                "tags": [{"name": n, "category": service.categories[n], "threshold": float(thr)}
                         for n, thr in zip(service.names, t.thresholds)],
                "index": len(service.index) if service.index is not None else None, "top_k": config.top_k,
                "max_bytes": config.max_bytes}

    @app.post("/api/tags", summary="Tag an image", openapi_extra=UPLOAD_BODY)
    async def tags(request: Request,
                   threshold: str | None = Query(None, description="calibrated (default), a number, or "
                                                                   "'general=0.4,character=0.8'"),
                   top_k: int | None = Query(None, ge=1, description="only the k most probable in `tags`")
                   ) -> dict[str, Any]:
        """``tags``: every tag with its probability, most probable first (``predict_tags(image,
        threshold=0.0)``); ``selected``: those at or above the threshold; ``caption``: them as
        ``--write-captions`` writes them; ``rating``: a ready model's rating outputs, apart from the tags
        (empty for alt-i2v models)."""
        t0 = time.perf_counter()
        thr = service.thresholds(threshold)
        upload, image = await service.receive(request)
        probs = await asyncio.wrap_future(service.engine.tags(image))
        selected = service.tagger.tags_from_probs(probs, thr)
        return {"file": upload.filename, "tags": service.all_tags(probs, top_k), "selected": list(selected),
                "rating": service.tagger.ratings_from_probs(probs),
                "threshold": threshold or "calibrated", "caption": service.caption(selected),
                "seconds": round(time.perf_counter() - t0, 4)}

    @app.post("/api/similar", summary="The most similar indexed images", openapi_extra=UPLOAD_BODY)
    async def similar(request: Request, k: int | None = Query(None, ge=1, le=100)) -> dict[str, Any]:
        if service.index is None:
            raise UploadError(404, "no_index", "this server has no index: start it with --index INDEX "
                                               "(made by --index or --demo)")
        t0 = time.perf_counter()
        upload, image = await service.receive(request)
        emb = await asyncio.wrap_future(service.engine.embed(image))
        scores, pos = await run_in_threadpool(service.index.search_positions, emb[None, :], k or config.top_k)
        results = [service.neighbour(int(p), float(s), r) for r, (s, p) in enumerate(zip(scores[0], pos[0]), 1)
                   if p >= 0]
        return {"file": upload.filename, "results": results, "indexed": len(service.index),
                "search": "approximate" if service.index.has_approx else "exact",
                "seconds": round(time.perf_counter() - t0, 4)}

    @app.post("/api/explain", summary="Grad-CAM heat map of one tag", openapi_extra=EXPLAIN_BODY)
    async def explain_tag(request: Request, tag: str | None = Query(None),
                          format: str = Query("json", pattern="^(json|png)$")) -> Any:
        """Where the model finds ``tag`` (form field or query; default the most probable tag) in the
        picture: the map of :func:`alt_i2v.tagging.gradcam.explain`, as ``overlay`` (the picture with the map
        laid over it) and ``heatmap`` (the map alone, grey 0-255), PNG data URLs at display size (long
        side 256-640 px). ``?format=png`` answers the overlay as a PNG."""
        from ..tagging.gradcam import get_explainer

        t0 = time.perf_counter()
        if service.tagger.model is None:
            raise UploadError(400, "no_gradients", "heat maps need gradients through a Keras model; this "
                              f"{service.tagger.family} model runs on onnxruntime, which gives none")
        upload, image = await service.receive(request)
        tagger = service.tagger
        tag = upload.fields.get("tag") or tag
        if tag and tag not in tagger.vocab.index:
            raise UploadError(400, "unknown_tag", f"{tag!r} is not a tag of this model's vocabulary")
        wanted = None if not tag else [tagger.vocab.index[tag]]
        # the gradients run on the model thread; decoding the whole picture and drawing do not
        cams, indices, probs = await asyncio.wrap_future(service.engine.call(
            lambda: get_explainer(tagger).cams(image, wanted)))
        overlay, grey, (width, height) = await service.decoding(
            upload.data, heat_pictures, upload.data, cams[0], service.image_config)
        if format == "png":
            return Response(overlay, media_type="image/png")
        return {"file": upload.filename, "tag": service.names[indices[0]], "probability": float(probs[indices[0]]),
                "width": width, "height": height, "overlay": data_url(overlay), "heatmap": data_url(grey),
                "seconds": round(time.perf_counter() - t0, 4)}

    @app.post("/api/caption", summary="Format tags as a caption, as --write-captions does")
    async def caption(request: Request) -> dict[str, Any]:
        """Body ``{"tags": {tag: probability}, "threshold": null | number | "general=0.4,..."}``: the tags
        at or above the threshold (calibrated by default), in the caption format."""
        body = await service.body(request, MAX_JSON_BYTES)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: brackets nested too deep
            raise UploadError(400, "bad_json", 'send JSON: {"tags": {"tag": probability}, "threshold": null}') \
                from None
        tags = doc.get("tags") if isinstance(doc, dict) else None
        if not isinstance(tags, dict) or not all(_is_probability(v) for v in tags.values()):
            raise UploadError(400, "bad_json", '"tags" must map tag names to probabilities (finite numbers)')
        index = service.tagger.vocab.index
        unknown = [t for t in tags if t not in index]
        if unknown:
            raise UploadError(400, "unknown_tag", f"not tags of this model: {unknown[:5]}")
        threshold = doc.get("threshold")
        thr = service.thresholds(None if threshold is None else str(threshold))
        kept = {t: float(p) for t, p in tags.items() if float(p) >= thr[index[t]]}
        return {"caption": service.caption(kept), "tags": len(kept)}

    @app.get("/api/indexed/{position}/thumbnail", summary="Thumbnail of an indexed image, by its row",
             response_class=Response)
    async def thumbnail(position: int) -> Response:
        if service.index is None or not 0 <= position < len(service.index):
            raise UploadError(404, "not_found", f"no indexed image {position}")
        jpeg = await run_in_threadpool(service.thumbnail, position)
        return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    return app


def _is_probability(value: Any) -> bool:
    """A finite JSON number (a 400-digit integer is too large for a float: refused, not a crash)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure answers ``{"error", "reason"}``: 4xx for what the client can fix, 500 otherwise."""

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        logging.getLogger("uvicorn.error").info("%s disconnected before its request to %s was complete",
                                                client, request.url.path)
        return Response(status_code=400)  # nobody reads it; the connection is gone

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse(exc.as_json(), status_code=exc.status)

    @app.exception_handler(UsageError)
    async def usage_error(request: Request, exc: UsageError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "reason": "bad_request"}, status_code=400)

    @app.exception_handler(AltI2VError)
    async def alt_error(request: Request, exc: AltI2VError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "reason": "failed"}, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), "reason": "http"}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server goes on",
                             "reason": "internal"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"bad request: {problems}", "reason": "bad_request"}, status_code=400)


__all__ = ["create_app", "Service", "STATIC"]
