"""Hardening of `textseg serve` (issue 18, findings 2, 5 and 10).

- The image cache: a request holds its image until its response is sent (eviction never fails it),
  a request refused with 503 never touches the cache, the cache is bounded in bytes, and no error
  detail leaks a ``<... object at 0x...>`` address.
- Uploads: the body is counted as it streams in (chunked too) and never spooled past the limit; a
  real uvicorn on loopback drops a slow request head (header timeout), a slow body (408), and answers
  connections past the bound with 503 + Retry-After.
- Web: the Host header must name the bound address (DNS rebinding), security headers on every
  response (CSP without inline script, frame-ancestors 'none', nosniff), ``image_id`` a random token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import socket
import threading
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from seg_tiny import TinyColourModel  # noqa: E402

from textseg.serve.app import STATIC, ServeSettings, create_app  # noqa: E402

BASE = "http://127.0.0.1"


def png(h: int, w: int, colour=(255, 0, 0), seed: int | None = None) -> bytes:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = colour
    if seed is not None:  # distinct content, same size
        arr[0, :8] = np.random.default_rng(seed).integers(0, 255, (8, 3))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class GateModel(TinyColourModel):
    """TinyColourModel whose image tower, once ``hold()`` is called, waits until ``release()``."""

    def __init__(self):
        super().__init__(cell=8)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def hold(self):
        self.entered.clear()
        self.gate.clear()

    def release(self):
        self.gate.set()

    def encode_dense(self, pixels, mode=None):
        self.entered.set()
        assert self.gate.wait(30), "test gate never released"
        return super().encode_dense(pixels, mode)


def post_segment(client, data: bytes | None = None, **form):
    files = {"image": ("x.png", data, "image/png")} if data is not None else None
    return client.post("/v1/segment", data={"labels": "red, blue", **form}, files=files)


async def _wait(event: threading.Event, seconds: float = 20.0):
    t0 = time.monotonic()
    while not event.is_set():
        assert time.monotonic() - t0 < seconds, "the worker never started"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------- finding 2
def test_image_in_flight_survives_cache_eviction():
    """A's features are being computed while B's upload arrives with a one-image cache: on the old
    server B pushed A's bytes out, and A's overlay was drawn from b"" (422, detail leaking
    ``<_io.BytesIO object at 0x...>``). A request must hold its own image until it answers."""
    model = GateModel()
    app = create_app(model, settings=ServeSettings(image_cache=1, workers=1))
    a_png, b_png = png(48, 64, (255, 0, 0)), png(40, 56, (0, 0, 255))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            model.hold()
            form = {"labels": "red, blue", "return_overlay": "true"}
            a = asyncio.create_task(c.post("/v1/segment", data=form, files={"image": ("a.png", a_png, "image/png")}))
            await _wait(model.entered)
            b = asyncio.create_task(c.post("/v1/segment", data=form, files={"image": ("b.png", b_png, "image/png")}))
            await asyncio.sleep(0.3)  # B is parsed and queued behind A
            model.release()
            return await a, await b

    ra, rb = asyncio.run(main())
    for r, size in ((ra, (64, 48)), (rb, (56, 40))):
        # an object address in a detail ("<... object at 0x7f...>"); a bare "0x" can occur in base64
        assert not re.search(r"object at 0x[0-9a-f]+", r.text)
        assert r.status_code == 200, r.text
        overlay = Image.open(io.BytesIO(base64.b64decode(r.json()["overlay_png"])))
        assert overlay.size[0] >= size[0] and (r.json()["width"], r.json()["height"]) == size


def test_rejected_request_does_not_touch_the_cache():
    """Cache of 2, queue of 1: A is cached; C is running; B is refused (503). On the old server B's
    upload was cached before the refusal and pushed A out (A's relabel: 404)."""
    model = GateModel()
    app = create_app(model, settings=ServeSettings(image_cache=2, max_queue=1, workers=1))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            ra = await c.post("/v1/segment", data={"labels": "red"}, files={"image": ("a.png", png(32, 32, seed=1))})
            assert ra.status_code == 200, ra.text
            model.hold()
            rc = asyncio.create_task(c.post("/v1/segment", data={"labels": "red"},
                                            files={"image": ("c.png", png(32, 32, seed=3))}))
            await _wait(model.entered)
            rb = await c.post("/v1/segment", data={"labels": "red"}, files={"image": ("b.png", png(32, 32, seed=2))})
            model.release()
            rc = await rc
            again = await c.post("/v1/segment", data={"labels": "blue, red", "image_id": ra.json()["image_id"]})
            return rb, rc, again

    rb, rc, again = asyncio.run(main())
    assert rb.status_code == 503 and "busy" in rb.text
    assert rc.status_code == 200, rc.text
    assert again.status_code == 200, again.text  # A was not pushed out by the refused B
    assert again.json()["image_features_cached"] is True
    assert int(rb.headers["retry-after"]) >= 1


def test_image_cache_is_bounded_in_bytes():
    model = TinyColourModel(cell=8)
    probe = create_app(model, settings=ServeSettings())
    with TestClient(probe, base_url=BASE) as c:
        assert post_segment(c, png(64, 64, seed=0)).status_code == 200
    one = probe.state.service.cache_stats()["bytes"]
    assert one > len(png(64, 64, seed=0))  # the features count, not only the upload

    budget = int(2.5 * one)  # two images fit, three do not; the count bound is far away
    app = create_app(model, settings=ServeSettings(image_cache=100, image_cache_bytes=budget))
    with TestClient(app, base_url=BASE) as c:
        ids = [post_segment(c, png(64, 64, seed=i)).json()["image_id"] for i in range(5)]
        stats = app.state.service.cache_stats()
        assert stats["images"] == 2 and stats["bytes"] <= budget
        status = [post_segment(c, image_id=i).status_code for i in ids]
    assert status == [404, 404, 404, 200, 200]


def test_error_details_carry_no_object_addresses():
    from textseg.serve.app import public_detail

    msg = "<bytes>: cannot read image (UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e40>)"
    out = public_detail(msg)
    assert "0x" not in out and "BytesIO" not in out
    assert out.startswith("<bytes>: cannot read image (UnidentifiedImageError: cannot identify image file")


# ---------------------------------------------------------------------------------------- finding 5
class SpoolSpy:
    """Records the most bytes Starlette wrote into any one upload spool file."""

    def __init__(self, monkeypatch):
        import starlette.formparsers as fp

        self.most = 0
        spy = self
        base = fp.SpooledTemporaryFile

        class Spool(base):
            def write(self, s):
                n = super().write(s)
                spy.most = max(spy.most, self.tell())
                return n

        monkeypatch.setattr(fp, "SpooledTemporaryFile", Spool)


BOUNDARY = "textsegboundary"
LIMIT = 100_000


def multipart_head() -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\nred\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n\x89PNG").encode("latin-1")


def test_chunked_upload_is_counted_and_never_spooled_past_the_limit(monkeypatch):
    """No Content-Length (chunked): the old server spooled all 3 MB to the temp dir, then said 413."""
    spy = SpoolSpy(monkeypatch)
    app = create_app(TinyColourModel(), settings=ServeSettings(max_upload_bytes=LIMIT))
    sent = {"bytes": 0}

    async def body():
        chunk = b"0" * 65536
        yield multipart_head()
        for _ in range(48):  # 3 MB
            sent["bytes"] += len(chunk)
            yield chunk

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            return await c.post("/v1/segment", content=body(),
                                headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})

    r = asyncio.run(main())
    assert spy.most <= LIMIT + 64 * 1024
    assert sent["bytes"] <= LIMIT + 2 * 65536 + 64 * 1024  # the server stopped reading
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]


@pytest.fixture(scope="module")
def live():
    """A real uvicorn on loopback (server_config: head deadline, connection bound)."""
    import uvicorn

    from textseg.serve.app import server_config

    settings = ServeSettings(max_upload_bytes=LIMIT, header_timeout_s=1.5, body_timeout_s=1.0,
                             max_connections=4, keep_alive_s=1)
    app = create_app(TinyColourModel(), settings=settings)
    server = uvicorn.Server(server_config(app, 0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield server, port
    server.should_exit = True
    thread.join(timeout=10)


def _idle(server, seconds: float = 5.0):
    t0 = time.time()
    while server.server_state.connections and time.time() - t0 < seconds:
        time.sleep(0.02)


def _read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return out


def test_live_slow_request_head_is_dropped(live):
    server, port = live
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
        t0 = time.time()
        try:
            out = _read_until_closed(s, 8.0)
        except TimeoutError:
            pytest.fail("the server held a half-sent request head for 8 s")
    assert time.time() - t0 < 6.0
    assert out == b"" or out.startswith(b"HTTP/1.1 408")


def test_live_slow_body_gets_408(live):
    server, port = live
    head = (f"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 5000\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + multipart_head())  # ... and the rest of the 5000 bytes never come
        t0 = time.time()
        try:
            out = _read_until_closed(s, 8.0)
        except TimeoutError:
            pytest.fail("the server waited 8 s for a request body")
    assert time.time() - t0 < 6.0
    assert out.startswith(b"HTTP/1.1 408"), out[:200]


def test_live_chunked_upload_over_the_limit(live, monkeypatch):
    spy = SpoolSpy(monkeypatch)
    server, port = live
    head = (f"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
    first = multipart_head()
    sent, response = 0, b""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + b"%x\r\n" % len(first) + first + b"\r\n")
        s.settimeout(0.05)
        try:
            for _ in range(300):  # up to 19 MB, stopping once the server answers
                chunk = b"0" * 65536
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
                try:
                    response = s.recv(65536)
                    break
                except TimeoutError:
                    continue
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert response == b"" or response.startswith(b"HTTP/1.1 413"), response[:200]
    assert spy.most <= LIMIT + 64 * 1024
    assert sent < 300 * 65536  # the server answered (or hung up) long before the stream ended


def test_live_connections_are_bounded(live):
    server, port = live
    _idle(server)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            out = _read_until_closed(s, 5.0)
        assert out.startswith(b"HTTP/1.1 503"), out[:200]
        assert b"retry-after: 1" in out.lower()
    finally:
        for h in held:
            h.close()
    _idle(server)
    r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


# --------------------------------------------------------------------------------------- finding 10
@pytest.fixture()
def client():
    with TestClient(create_app(TinyColourModel()), base_url=BASE) as c:
        yield c


@pytest.mark.parametrize(("host", "ok"), [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True), ("127.0.0.1", True),
    ("evil.example:8000", False), ("evil.example", False), ("127.0.0.1.evil.example", False),
    ("10.0.0.5:8000", False), ("", False),
])
def test_host_header_must_name_the_bound_address(client, host, ok):
    r = client.get("/healthz", headers={"host": host})
    assert r.status_code == (200 if ok else 400), r.text
    if not ok:
        assert "Host header" in r.json()["detail"]


def test_host_rules_for_other_binds():
    from textseg.serve.app import _host_allowed

    wildcard = ServeSettings(host="0.0.0.0", allowed_hosts=("demo.lan",))
    assert _host_allowed("10.0.0.5:8080", wildcard) and _host_allowed("demo.lan:8080", wildcard)
    assert _host_allowed("DEMO.LAN.", wildcard) and _host_allowed("localhost", wildcard)
    assert not _host_allowed("rebind.attacker.example:8080", wildcard)
    lan = ServeSettings(host="192.168.1.7")
    assert _host_allowed("192.168.1.7:8000", lan)
    assert not _host_allowed("192.168.1.8:8000", lan) and not _host_allowed("localhost:8000", lan)


def _assert_security_headers(r):
    csp = r.headers.get("content-security-policy", "")
    directives = {d.strip().split()[0]: d.strip().split()[1:] for d in csp.split(";") if d.strip()}
    assert directives.get("frame-ancestors") == ["'none'"], csp
    assert directives.get("script-src") == ["'self'"], csp
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert r.headers.get("x-content-type-options") == "nosniff"


def test_security_headers_on_every_response(client):
    _assert_security_headers(client.get("/"))
    _assert_security_headers(client.get("/static/app.js"))
    _assert_security_headers(client.get("/healthz"))
    _assert_security_headers(post_segment(client, b"not an image"))  # 422 from the app
    _assert_security_headers(client.get("/healthz", headers={"host": "evil.example"}))  # 400 from the guard
    big = client.post("/v1/segment", content=b"0" * 10, headers={"content-length": str(10**9)})
    assert big.status_code == 413
    _assert_security_headers(big)


class _Inline(HTMLParser):
    def __init__(self):
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        names = {k.lower() for k, _ in attrs}
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script" and "src" not in names:
            self.problems.append("inline <script>")
        self._in_script = tag == "script"
        self.problems += [f"{tag} {n}=" for n in names if n == "style" or n.startswith("on")]

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.problems.append("script text")

    def handle_endtag(self, tag):
        self._in_script = False


def test_page_has_no_inline_script_or_style():
    parser = _Inline()
    parser.feed((STATIC / "index.html").read_text())
    assert parser.problems == []
    js = (STATIC / "app.js").read_text()
    for banned in (".innerHTML", "eval(", "new Function", 'setAttribute("style"', "cssText"):
        assert banned not in js


def test_image_id_is_a_random_token_not_the_content_hash(client):
    data = png(40, 40, seed=7)
    first = post_segment(client, data).json()["image_id"]
    second = post_segment(client, data).json()["image_id"]
    digest = hashlib.sha256(data).hexdigest()
    assert first != second  # the same bytes uploaded twice: two ids
    for image_id in (first, second):
        assert image_id not in digest and digest[:16] not in image_id
        assert len(image_id) >= 22  # >= 128 random bits in url-safe base64
        assert post_segment(client, image_id=image_id).status_code == 200
