"""The demo page in a real browser: headless Chromium (Debian's package) driven by Playwright.

A server started here on loopback serves the offline default model; the test uploads a COCO-MINI
photo (or a generated one when ../shared is absent), types labels, clicks Segment, waits for the
overlay, checks the legend and the hover highlight, and saves a screenshot in the test's temporary
folder (``TEXTSEG_SCREENSHOT_DIR`` keeps it elsewhere, e.g. for the README).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _need_browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; scripts/test.sh installs Debian's chromium on CI")
        pytest.skip("chromium not installed (apt-get install chromium); CI installs it")
    return pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from textseg.serve.app import create_app, server_config

    app = create_app()  # the offline default model
    port = _free_port()
    srv = uvicorn.Server(server_config(app, port))  # as `textseg serve`: CSP, Host check, timeouts
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)


def _photo(tmp_path: Path) -> Path:
    images = SHARED_DATA / "coco-mini" / "images"
    if images.is_dir():
        return sorted(images.glob("*.jpg"))[0]
    arr = np.zeros((240, 320, 3), np.uint8)
    arr[:120] = (120, 170, 230)
    arr[120:] = (60, 140, 60)
    path = tmp_path / "generated.png"
    Image.fromarray(arr).save(path)
    return path


def test_upload_type_segment_in_chromium(server, tmp_path):
    sync_api = _need_browser()
    photo = _photo(tmp_path)
    labels = ["person", "dog; puppy", "grass", "<b>sky</b>"]
    out = Path(os.environ.get("TEXTSEG_SCREENSHOT_DIR") or tmp_path / "browser")
    out.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            blocked: list[str] = []  # the page must work under the server's CSP (no inline script/style)
            page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(server)
            page.wait_for_selector("#model-name:has-text('offline')", timeout=20_000)
            page.set_input_files("#file", str(photo))
            page.fill("#labels", ", ".join(labels))
            page.click("#segment")
            page.wait_for_selector("#status:has-text('Done')", timeout=90_000)
            assert page.is_visible("#result")
            legend = page.locator("#legend li .name").all_inner_texts()
            assert legend[:4] == ["person", "dog", "grass", "<b>sky</b>"]  # text, not HTML
            assert page.locator("#legend b").count() == 0
            size = page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]")
            assert tuple(size) == Image.open(photo).size
            before = page.evaluate("document.getElementById('canvas').toDataURL()")
            page.hover("#legend li >> nth=0")
            after = page.evaluate("document.getElementById('canvas').toDataURL()")
            assert before != after  # hovering a legend entry highlights its region
            page.mouse.move(0, 0)
            page.screenshot(path=str(out / "segment.png"), full_page=True)
            page.click(".views button[data-view='mask']")
            assert page.evaluate("document.getElementById('canvas').toDataURL()") != before
            href = page.get_attribute("#download", "href")
            assert href and href.startswith("blob:")
            assert blocked == []
        finally:
            browser.close()
    assert (out / "segment.png").stat().st_size > 10_000
