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

Safety: the request body is counted as it streams in (chunked or not) and cut off past the upload
limit (413), so nothing past the limit is spooled to the temp dir; image pixels are bounded (413);
labels are bounded and never used as paths or HTML (422); work runs on a bounded thread pool with a
bounded queue (503 with ``Retry-After`` when full) and a per-request timeout (504). The ``Host``
header must name the bound address (or an ``allowed_hosts`` name: DNS rebinding, 400); every
response carries a Content-Security-Policy without inline script (``frame-ancestors 'none'``) and
``X-Content-Type-Options: nosniff``. :func:`server_config` adds what only the HTTP server can do: a
deadline for the request head, a bound on open connections (503 with ``Retry-After``), and keep-alive.

Each upload gets an unguessable ``image_id`` (a random token, not the content hash). Its features
are cached per mode so relabelling skips the image tower; the cache is bounded in bytes and count,
and a request holds its own image until its response is sent, so eviction never fails a request in
flight; a request refused with 503 never touches the cache. Text embeddings are cached per model
across all requests (:class:`~textseg.text.TextEmbeddingCache`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
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
    max_prompts: int = 400  # label texts over all classes (synonyms too): each costs a text forward
    max_labels: int = 100
    max_label_chars: int = 200
    timeout_s: float = 120.0
    workers: int = 1  # threads running the model (torch already uses every core in one)
    max_queue: int = 32  # requests admitted at once (running + waiting); more -> 503
    image_cache: int = 16  # most images whose features are kept for relabelling by image_id
    image_cache_bytes: int = 64 * 1024 * 1024  # ... and most bytes (upload + features) they hold
    host: str = "127.0.0.1"  # the bound address; the Host header must name it (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()  # more names the Host header may carry (e.g. behind a proxy)
    header_timeout_s: float = 10.0  # a request head must arrive within this (server_config)
    body_timeout_s: float = 60.0  # a request body must arrive within this of its head
    max_connections: int = 128  # open connections; more get 503 (server_config)
    keep_alive_s: int = 5  # idle keep-alive connections are closed after this
    # concurrent uploads whose image-tower passes are batched into one forward (textseg.pipeline.Batcher);
    # None = auto: 8 when the model is on CUDA, off (0) on CPU (one forward already uses every core)
    batch: int | None = None
    batch_wait_s: float = 0.01  # the bounded wait of a batch after its first request


# Content-Security-Policy of every response: scripts and styles only from this server's files (no
# inline script or style), images also from data:/blob: URLs (the overlay), and no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
_BODY_SLACK = 64 * 1024  # multipart boundaries and the small form fields next to the upload


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc). Without it the server's RSS grew 267 MB over 40
    distinct photos while the image cache held 65 MB: each request's tensors leave fragmented,
    retained arenas. A no-op where there is no glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class _Busy(Exception):
    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


class _Gone(Exception):
    """The image_id of a relabelling request is not (or no longer) cached."""


class _Image:
    """One uploaded image: its bytes and its Segmenters (features per mode, computed once).

    Every request using it holds a reference until its response is sent; the cache holds one more,
    so evicting it from the cache never pulls it from under a request in flight."""

    def __init__(self, data: bytes):
        self.data = data
        self.segmenters: dict = {}
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(s.feature_nbytes() for s in list(self.segmenters.values()))


class SegmentService:
    """Model + caches + bounded execution, independent of HTTP (usable from tests)."""

    def __init__(self, model, settings: ServeSettings, templates: str = "imagenet"):
        from textseg.segment.segmenter import SegmentCfg

        self.model = model
        self.settings = settings
        self.templates = resolve_templates(templates)  # segment and classify alike
        p = next(model.parameters(), None)
        batch = settings.batch
        if batch is None:
            batch = 8 if p is not None and p.device.type == "cuda" else 0
        self.batch = max(0, int(batch))
        self.batcher = None
        if self.batch > 1:  # the tower of concurrent uploads in one forward; their decoding in parallel
            from textseg.pipeline import Batcher

            self.batcher = Batcher(self._encode_batch, max_batch=self.batch, max_wait_s=settings.batch_wait_s)
        self.base_cfg = SegmentCfg(templates=self.templates, batch_size=max(4, self.batch))
        self.pool = ThreadPoolExecutor(max_workers=max(settings.workers, self.batch), thread_name_prefix="textseg")
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._job_seconds = 1.0  # running mean of one job's time, for Retry-After
        self._images: OrderedDict[str, _Image] = OrderedDict()  # image_id -> image, least recent first
        self._cache_lock = threading.Lock()
        self.model_lock = threading.Lock()  # torch modules are not re-entrant across threads

    # ------------------------------------------------------------------ bounded execution
    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times a job's mean time."""
        waiting = max(1, self._admitted) / max(1, self.settings.workers)
        return int(min(60, max(1, math.ceil(waiting * self._job_seconds))))

    async def run(self, fn, *args):
        """Run ``fn(*args)`` on the pool, or raise :class:`_Busy` (nothing done) when the queue is full.
        The slot is released when the job ends, not when the request times out."""
        with self._admit_lock:
            if self._admitted >= self.settings.max_queue:
                raise _Busy(self.retry_after())
            self._admitted += 1

        def job():
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - t0)
                _malloc_trim()

        def release(_future=None):
            with self._admit_lock:
                self._admitted -= 1

        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self.pool, job)
        except BaseException:
            release()
            raise
        future.add_done_callback(release)
        return await asyncio.wait_for(asyncio.shield(future), self.settings.timeout_s)

    # ------------------------------------------------------------------ image cache
    def lookup(self, image_id: str) -> _Image | None:
        with self._cache_lock:
            img = self._images.get(image_id)
            if img is not None:
                self._images.move_to_end(image_id)
            return img

    def _store(self, image_id: str, img: _Image) -> None:
        """(Re)insert as most recent, then evict the least recent past the count and byte bounds."""
        with self._cache_lock:
            self._images[image_id] = img
            self._images.move_to_end(image_id)
            sizes = {k: v.nbytes for k, v in self._images.items()}
            total = sum(sizes.values())
            while self._images and (len(self._images) > self.settings.image_cache
                                    or total > self.settings.image_cache_bytes):
                old, _ = self._images.popitem(last=False)
                total -= sizes[old]

    def cache_stats(self) -> dict:
        with self._cache_lock:
            return {"images": len(self._images), "bytes": sum(v.nbytes for v in self._images.values())}

    # ------------------------------------------------------------------ work (runs in the pool)
    def _encode_batch(self, mode, jobs: list) -> list:
        """The batcher's call: ``jobs`` = ``(segmenter, prepared image)`` of one dense mode -> their views,
        the same-size crops of all of them through the tower together (under the model lock)."""
        with self.model_lock:
            return jobs[0][0].encode_prepared([prep for _, prep in jobs])

    def _set_image(self, seg, data: bytes) -> None:
        if self.batcher is None:
            with self.model_lock:
                seg.set_image(data)
            return
        t0 = time.perf_counter()
        prep = seg.prepare(data)  # decode / resize / normalise in this request's thread, in parallel
        views = self.batcher.submit(seg.mode, (seg, prep))
        seg.set_encoded(prep, views, time.perf_counter() - t0)

    def segment(self, img: _Image | None, image_id: str, labels, mode, threshold, want_mask: bool,
                want_overlay: bool) -> dict:
        """Segment a new upload ``img``, or (``img`` None) the cached image ``image_id`` (:class:`_Gone`
        when it is not cached). The image is held here until the record is built."""
        from textseg.segment.segmenter import Segmenter

        t0 = time.perf_counter()
        if img is None:
            img = self.lookup(image_id)
            if img is None:
                raise _Gone(image_id)
        with img.lock:
            seg = img.segmenters.get(mode)
            cached = seg is not None
            if seg is None:
                seg = Segmenter(self.model, replace(self.base_cfg, mode=mode))
                self._set_image(seg, img.data)
                img.segmenters[mode] = seg
            seg.cfg = replace(seg.cfg, threshold=self.base_cfg.threshold if threshold is None else threshold)
            with self.model_lock:
                result = seg.predict(labels)
        self._store(image_id, img)  # only a request that did its work touches the cache
        out = {"image_id": image_id, **result.to_record(), "mode": seg.mode, "image_features_cached": cached}
        if want_mask:
            out["mask_png"] = _png_b64(result.mask_image())
        if want_overlay:
            out["overlay_png"] = _png_b64(result.overlay(img.data))
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


_OBJECT_REPR = re.compile(r"<[^<>]*\bobject at 0x[0-9A-Fa-f]+>")


def public_detail(message: str) -> str:
    """An error message fit for a client: no ``<... object at 0x...>`` memory addresses."""
    return _OBJECT_REPR.sub("<data>", message)


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": public_detail(detail)}, status_code=status, headers=headers)


def _host_allowed(host_header: str, settings: ServeSettings) -> bool:
    """Whether a Host header names this server: the bound address (any IP literal when bound to all
    interfaces; ``localhost`` when bound to loopback) or one of ``settings.allowed_hosts``. A name a
    browser resolved by DNS to us (DNS rebinding) is refused."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".")
    if not name:
        return False
    if name in {h.lower().rstrip(".") for h in settings.allowed_hosts}:
        return True
    bound = settings.host.strip("[]").lower()
    try:
        bound_ip = ipaddress.ip_address(bound)
    except ValueError:
        bound_ip = None
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is not None:  # an IP literal cannot be rebound
        return bound_ip is None or bound_ip.is_unspecified or ip == bound_ip or (ip.is_loopback and bound_ip.is_loopback)
    if name == "localhost":
        return bound_ip is not None and (bound_ip.is_loopback or bound_ip.is_unspecified) or bound == "localhost"
    return name == bound


class _Guard:
    """Pure ASGI middleware: the Host check, security headers on every response, and the request
    body counted as it streams in (413 past the limit, chunked or not) under a read deadline (408).
    A refused body is never handed on, so Starlette spools at most the limit to the temp dir."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.settings = settings
        self.limit = settings.max_upload_bytes + _BODY_SLACK

    @staticmethod
    async def _reply(send, status: int, detail: str, extra: tuple = ()) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *SECURITY_HEADERS, *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.settings
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        host = headers.get(b"host", b"").decode("latin-1")
        if not _host_allowed(host, settings):
            return await self._reply(send, 400, f"the Host header does not name this server (bound to "
                                     f"{settings.host}); start it with --allowed-host NAME to accept a name")
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limit:
            return await self._reply(send, 413, f"request body larger than the limit of {settings.max_upload_bytes} bytes")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout_s
        state = {"received": 0, "body_done": False, "started": False, "replied": False}

        async def refuse(status: int, detail: str):
            if not state["started"]:
                state["replied"] = True
                await self._reply(send, status, detail)
            return {"type": "http.disconnect"}

        async def guarded_receive():
            if state["replied"]:
                return {"type": "http.disconnect"}
            if state["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await refuse(408, f"the request body did not arrive within {settings.body_timeout_s} s")
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    return await refuse(413, f"request body larger than the limit of {settings.max_upload_bytes} bytes")
                if not message.get("more_body", False):
                    state["body_done"] = True
            return message

        async def guarded_send(message):
            if state["replied"]:
                return  # we already answered (413/408); drop what the app makes of the cut-off body
            if message["type"] == "http.response.start":
                state["started"] = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["replied"]:
                raise


def server_config(app, port: int, **uvicorn_kwargs):
    """The uvicorn config serving ``app`` (from :func:`create_app`) on its settings' host and ``port``,
    with what only the HTTP server can enforce: a request head must arrive within
    ``header_timeout_s`` (slow clients are dropped, 408), at most ``max_connections`` connections are
    served (the rest get 503 with ``Retry-After``), idle keep-alive ends after ``keep_alive_s``."""
    import uvicorn

    settings = app.state.service.settings
    kwargs = {"log_level": "warning", **uvicorn_kwargs}
    return uvicorn.Config(app, host=settings.host, port=port, http=_guarded_protocol(settings),
                          timeout_keep_alive=settings.keep_alive_s, **kwargs)


def _guarded_protocol(settings: ServeSettings):
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"detail": "server busy: too many open connections, retry later"}).encode()

    async def too_many_connections(scope, receive, send):
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"retry-after", b"1"), *SECURITY_HEADERS]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    class GuardedH11(H11Protocol):
        """uvicorn's h11 protocol plus a deadline for each request head and a connection bound."""

        _timer = None
        _armed_cycle = None
        _got_bytes = False

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                self.app = too_many_connections
            self._arm()

        def _arm(self):
            self._disarm()
            self._armed_cycle, self._got_bytes = self.cycle, False
            self._timer = self.loop.call_later(settings.header_timeout_s, self._head_timeout)

        def _disarm(self):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def data_received(self, data):
            self._got_bytes = True
            super().data_received(data)

        def handle_events(self):
            super().handle_events()
            if self.cycle is not self._armed_cycle:  # a new request head arrived in time
                self._disarm()

        def on_response_complete(self):
            self._arm()  # the next request head on this connection gets the same deadline
            super().on_response_complete()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _head_timeout(self):
            self._timer = None
            if self.cycle is self._armed_cycle and not self.transport.is_closing():
                if self._got_bytes and self.conn.our_state in (h11.IDLE, h11.DONE):
                    self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                         b"connection: close\r\n\r\n")
                self.transport.close()

    return GuardedH11


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
        classes = parse_labels(labels, max_prompts=settings.max_prompts)
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
               precision: str | None = None, cast_weights: bool = False) -> FastAPI:
    """The ASGI app. Pass a loaded ``model``, or ``model_name`` / ``weights`` to load one at start-up
    (nothing given: the offline default model). ``templates``: the prompt templates of every request
    (:func:`textseg.prompts.resolve_templates`; default the 80 OpenAI prompts). ``precision``: the
    image tower's (:func:`apply_precision`; reported by ``/v1/models``); ``cast_weights``: ``load_model``'s
    (:func:`textseg.precision.cast_image_tower`)."""
    settings = settings or ServeSettings()
    if model is None:
        from textseg.weights.load import load_model

        model = load_model(model_name, weights, precision=precision, cast_weights=cast_weights)
    elif precision is not None:
        apply_precision(model, precision)
        if cast_weights:
            from textseg.precision import cast_image_tower

            cast_image_tower(model, model.inference_precision)
    service = SegmentService(model.eval(), settings, templates)

    app = FastAPI(title="textseg", version=__version__, docs_url=None, redoc_url=None,
                  description="Segment anything you can name: zero-shot segmentation and classification.")
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_Guard, settings=settings)

    @app.exception_handler(_Busy)
    async def busy(_request, exc):
        return _error(503, "server busy: too many requests queued, retry later",
                      {"Retry-After": str(exc.retry_after)})

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
                        "embed_dim": getattr(m, "embed_dim", None), **precision_info(m),
                        "batch": service.batch, "batch_wait_s": settings.batch_wait_s if service.batch > 1 else None},
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
            img, image_id = _Image(data), secrets.token_urlsafe(16)  # cached once its work is done
        elif image_id is None:
            raise HTTPException(422, "send an image file or the image_id of an earlier upload")
        else:
            img = None  # looked up once admitted (service.segment), then held until the response
        try:
            return await service.run(service.segment, img, image_id, classes, mode, threshold,
                                     return_mask, return_overlay)
        except _Gone:
            raise HTTPException(404, "image_id is not (or no longer) cached; upload the image again") from None

    @app.post("/v1/classify")
    async def classify(labels: str = Form(...), image: UploadFile = File(...)):
        classes = _parse_labels(labels, settings)
        data = await _read_upload(image, settings)
        _check_image(data, settings)
        return await service.run(service.classify, data, classes)

    return app
