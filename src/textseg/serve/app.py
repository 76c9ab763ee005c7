"""The textseg web app and REST API (FastAPI).

``create_app(model)`` builds the ASGI app around one loaded :class:`~textseg.models.base.DualEncoder`:

- ``GET /``: a single page (static, no CDN, no build step): drop an image, type labels, see the overlay.
- ``POST /v1/segment``: multipart ``image`` (or ``image_id`` of an earlier upload) + ``labels``
  (``"cat, sofa; couch"``, the one label grammar of :mod:`textseg.text`) + options -> the per-image
  record of :meth:`~textseg.segment.SegmentResult.to_record` (the one ``textseg segment`` writes:
  ``labels``, ``legend`` with colours, pixel ``fractions``, timings, ...) plus ``image_id``, ``mode``
  and, on request, the label-map PNG and the overlay PNG (base64).
- ``POST /v1/classify``: multipart ``image`` + ``labels`` -> zero-shot probabilities.
- ``GET /v1/models``, ``GET /healthz``; the OpenAPI schema at ``/openapi.json``.

Safety: uploads and image pixels are bounded (413), labels are bounded and never used as paths or
HTML (422), work runs on a bounded thread pool with a bounded queue (503 when full) and a per-request
timeout (504). Uploads are spooled by Starlette into the system temp dir only; nothing else is written.
Image features are cached per (image hash, mode) so relabelling an image skips the image tower; text
embeddings are cached per model across all requests (:class:`~textseg.text.TextEmbeddingCache`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from textseg import __version__
from textseg.errors import ImageError, TextsegError
from textseg.io import load_image
from textseg.prompts import resolve_templates
from textseg.text import parse_labels

STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one server. Defaults suit a CPU demo; raise them for a GPU box."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_labels: int = 100
    max_label_chars: int = 200
    timeout_s: float = 120.0
    workers: int = 1  # threads running the model (torch already uses every core in one)
    max_queue: int = 32  # requests admitted at once (running + waiting); more -> 503
    image_cache: int = 16  # images whose features are kept for relabelling by image_id


class _Busy(Exception):
    pass


class _Entry:
    """A cached image: its bytes' hash, its Segmenter (features computed once) and a lock."""

    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.lock = threading.Lock()


class SegmentService:
    """Model + caches + bounded execution, independent of HTTP (usable from tests)."""

    def __init__(self, model, settings: ServeSettings, templates: str = "imagenet"):
        from textseg.segment.segmenter import SegmentCfg

        self.model = model
        self.settings = settings
        self.templates = resolve_templates(templates)  # segment and classify alike
        self.base_cfg = SegmentCfg(templates=self.templates)
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="textseg")
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._images: OrderedDict[tuple[str, str | None], _Entry] = OrderedDict()
        self._bytes: OrderedDict[str, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.model_lock = threading.Lock()  # torch modules are not re-entrant across threads

    # ------------------------------------------------------------------ bounded execution
    async def run(self, fn, *args):
        with self._admit_lock:
            if self._admitted >= self.settings.max_queue:
                raise _Busy()
            self._admitted += 1
        try:
            loop = asyncio.get_running_loop()
            return await asyncio.wait_for(loop.run_in_executor(self.pool, fn, *args), self.settings.timeout_s)
        finally:
            with self._admit_lock:
                self._admitted -= 1

    # ------------------------------------------------------------------ caches
    def remember(self, data: bytes) -> str:
        image_id = hashlib.sha256(data).hexdigest()[:32]
        with self._cache_lock:
            self._bytes[image_id] = data
            self._bytes.move_to_end(image_id)
            while len(self._bytes) > self.settings.image_cache:
                self._bytes.popitem(last=False)
        return image_id

    def image_bytes(self, image_id: str) -> bytes | None:
        with self._cache_lock:
            return self._bytes.get(image_id)

    def entry(self, image_id: str, mode: str | None) -> _Entry:
        from textseg.segment.segmenter import Segmenter

        key = (image_id, mode)
        with self._cache_lock:
            hit = self._images.get(key)
            if hit is not None:
                self._images.move_to_end(key)
                return hit
            data = self._bytes.get(image_id)
        if data is None:
            raise KeyError(image_id)
        seg = Segmenter(self.model, replace(self.base_cfg, mode=mode))
        with self.model_lock:
            seg.set_image(data)
        entry = _Entry(seg)
        with self._cache_lock:
            self._images[key] = entry
            while len(self._images) > self.settings.image_cache:
                self._images.popitem(last=False)
        return entry

    # ------------------------------------------------------------------ work (runs in the pool)
    def segment(self, image_id: str, labels, mode, threshold, want_mask: bool, want_overlay: bool) -> dict:
        t0 = time.perf_counter()
        cached = (image_id, mode) in self._images
        entry = self.entry(image_id, mode)
        with entry.lock, self.model_lock:
            seg = entry.segmenter
            if threshold is not None:
                seg.cfg = replace(seg.cfg, threshold=threshold)
            else:
                seg.cfg = replace(seg.cfg, threshold=self.base_cfg.threshold)
            result = seg.predict(labels)
        out = {"image_id": image_id, **result.to_record(), "mode": seg.mode, "image_features_cached": cached}
        if want_mask:
            out["mask_png"] = _png_b64(result.mask_image())
        if want_overlay:
            out["overlay_png"] = _png_b64(result.overlay(self.image_bytes(image_id) or b""))
        out["seconds"] = time.perf_counter() - t0
        return out

    def classify(self, data: bytes, classes) -> dict:
        from textseg.zeroshot import classify

        image = load_image(data)
        with self.model_lock:
            probs = classify(self.model, [image], classes, self.templates)[0]
        return {"labels": [c.name for c in classes], "probs": [float(p) for p in probs]}


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _read_upload(upload: UploadFile, settings: ServeSettings) -> bytes:
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"upload larger than the limit of {settings.max_upload_bytes} bytes")
    if not data:
        raise HTTPException(422, "the uploaded image is empty")
    return data


def _check_image(data: bytes, settings: ServeSettings) -> None:
    """Reject what is not an image, or too many pixels, before any decoding work."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError:
        raise HTTPException(413, f"image has more than the limit of {settings.max_pixels} pixels") from None
    except Exception:
        raise HTTPException(422, "the upload is not a readable image") from None
    if w * h > settings.max_pixels:
        raise HTTPException(413, f"image is {w}x{h} = {w * h} pixels; the limit is {settings.max_pixels}")


def _parse_labels(labels: str, settings: ServeSettings):
    """The one label grammar (:func:`textseg.text.parse_labels`) plus this server's size limits."""
    if len(labels) > settings.max_labels * (settings.max_label_chars + 1):
        raise HTTPException(422, "labels text too long")
    try:
        classes = parse_labels(labels)
    except TextsegError as e:
        raise HTTPException(422, str(e)) from None
    if len(classes) > settings.max_labels:
        raise HTTPException(422, f"{len(classes)} labels; the limit is {settings.max_labels}")
    for c in classes:
        for s in c.synonyms:
            if len(s) > settings.max_label_chars:
                raise HTTPException(422, f"a label is {len(s)} characters long; the limit is {settings.max_label_chars}")
    return classes


def apply_precision(model, precision: str) -> None:
    """Issue 17: set an already loaded ``model``'s image-tower precision (resolved for its device)."""
    from textseg.precision import resolve_precision

    p = next(model.parameters(), None)
    model.inference_precision = resolve_precision(precision, p.device if p is not None else "cpu")


def precision_info(model) -> dict:
    """Issue 17: the precision entries of ``/v1/models`` (``precision``, ``cpu_native_bf16``)."""
    from textseg.precision import describe

    return describe(model)


def create_app(model=None, *, model_name: str | None = None, weights: str | None = None,
               settings: ServeSettings | None = None, templates: str = "imagenet",
               precision: str | None = None) -> FastAPI:
    """The ASGI app. Pass a loaded ``model``, or ``model_name`` / ``weights`` to load one at start-up
    (nothing given: the offline default model). ``templates``: the prompt templates of every request
    (:func:`textseg.prompts.resolve_templates`; default the 80 OpenAI prompts). ``precision``: the
    image tower's (:func:`apply_precision`; reported by ``/v1/models``)."""
    settings = settings or ServeSettings()
    if model is None:
        from textseg.weights.load import load_model

        model = load_model(model_name, weights, precision=precision)
    elif precision is not None:
        apply_precision(model, precision)
    service = SegmentService(model.eval(), settings, templates)

    app = FastAPI(title="textseg", version=__version__,
                  description="Segment anything you can name: zero-shot segmentation and classification.")
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
            return _error(413, f"request body larger than the limit of {settings.max_upload_bytes} bytes")
        return await call_next(request)

    @app.exception_handler(_Busy)
    async def busy(_request, _exc):
        return _error(503, "server busy: too many requests queued, retry later")

    @app.exception_handler(asyncio.TimeoutError)
    async def timeout(_request, _exc):
        return _error(504, f"request took longer than {settings.timeout_s} s")

    @app.exception_handler(ImageError)
    async def bad_image(_request, exc):
        return _error(422, str(exc))

    @app.exception_handler(TextsegError)
    async def bad_input(_request, exc):
        return _error(422, str(exc))

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": service.model.name, "version": __version__}

    @app.get("/v1/models")
    async def models():
        from textseg.weights.load import available_names

        m = service.model
        return {
            "current": {"name": m.name, "modes": list(getattr(m, "dense_modes", ())),
                        "embed_dim": getattr(m, "embed_dim", None), **precision_info(m)},
            "available": available_names(),
        }

    @app.post("/v1/segment")
    async def segment(
        labels: str = Form(..., description='comma-separated classes, ";" between synonyms'),
        image: UploadFile | None = File(None, description="the image (or give image_id)"),
        image_id: str | None = Form(None, description="id returned by an earlier /v1/segment upload"),
        mode: str | None = Form(None, description="dense mode (see /v1/models)"),
        threshold: float | None = Form(None, ge=0.0, le=1.0, description="background probability threshold"),
        return_mask: bool = Form(False),
        return_overlay: bool = Form(False),
    ):
        classes = _parse_labels(labels, settings)
        modes = tuple(getattr(service.model, "dense_modes", ()))
        if mode is not None and mode not in modes:
            raise HTTPException(422, f"unknown mode {mode!r}; this model has: {', '.join(modes)}")
        if image is not None:
            data = await _read_upload(image, settings)
            _check_image(data, settings)
            image_id = service.remember(data)
        elif image_id is None:
            raise HTTPException(422, "send an image file or the image_id of an earlier upload")
        elif service.image_bytes(image_id) is None:
            raise HTTPException(404, f"image_id {image_id!r} is not (or no longer) cached; upload the image again")
        try:
            return await service.run(service.segment, image_id, classes, mode, threshold, return_mask, return_overlay)
        except KeyError:
            raise HTTPException(404, f"image_id {image_id!r} is no longer cached; upload the image again") from None

    @app.post("/v1/classify")
    async def classify(labels: str = Form(...), image: UploadFile = File(...)):
        classes = _parse_labels(labels, settings)
        data = await _read_upload(image, settings)
        _check_image(data, settings)
        return await service.run(service.classify, data, classes)

    return app
