"""REST API of `textseg serve`: happy paths and every error path, with the framework's test client."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from seg_tiny import TinyColourModel  # noqa: E402

from textseg.serve.app import ServeSettings, create_app  # noqa: E402


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def red_blue(h=48, w=64) -> bytes:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return _png(arr)


@pytest.fixture()
def model():
    return TinyColourModel(cell=8)


@pytest.fixture()
def client(model):
    settings = ServeSettings(max_upload_bytes=200_000, max_pixels=300 * 300, max_labels=5, max_label_chars=40)
    with TestClient(create_app(model, settings=settings), base_url="http://127.0.0.1") as c:
        yield c


def seg(client, data=None, **form):
    files = {"image": ("x.png", data, "image/png")} if data is not None else None
    return client.post("/v1/segment", data=form, files=files)


def test_segment_happy_path_with_pngs(client):
    r = seg(client, red_blue(), labels="red, blue", threshold="0", return_mask="true", return_overlay="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [lab["name"] for lab in body["legend"]][:2] == ["red", "blue"]
    assert body["fractions"]["red"] == pytest.approx(0.5, abs=0.05)
    assert body["fractions"]["blue"] == pytest.approx(0.5, abs=0.05)
    assert (body["width"], body["height"]) == (64, 48)
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask_png"])))
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert mask.mode == "P" and mask.size == (64, 48)
    m = np.asarray(mask)
    assert (m[:, :28] == 0).all() and (m[:, 36:] == 1).all()  # value = label index
    assert overlay.size[0] >= 64 and overlay.size[1] >= 48
    assert len({tuple(lab["color"]) for lab in body["legend"]}) == len(body["legend"])


def test_relabel_by_image_id_skips_image_tower(client, model):
    first = seg(client, red_blue(), labels="red, blue").json()
    calls = model.dense_calls
    again = seg(client, None, image_id=first["image_id"], labels="blue, red, green")
    assert again.status_code == 200, again.text
    assert model.dense_calls == calls  # features came from the cache
    assert again.json()["image_features_cached"] is True
    assert [lab["name"] for lab in again.json()["legend"]][:3] == ["blue", "red", "green"]


def test_text_cache_shared_across_requests(client, model):
    seg(client, red_blue(), labels="red, blue")
    n = model.text_calls
    seg(client, red_blue(32, 32), labels="red, blue")
    assert model.text_calls == n


def test_classify(client):
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:] = (255, 0, 0)
    r = client.post("/v1/classify", data={"labels": "red, blue"}, files={"image": ("r.png", _png(arr), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == ["red", "blue"]
    assert body["probs"][0] > body["probs"][1]
    assert sum(body["probs"]) == pytest.approx(1.0, abs=1e-5)


def test_models_health_openapi_and_page(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/v1/models").json()["current"]["name"] == "tiny-colour"
    schema = client.get("/openapi.json").json()
    assert "/v1/segment" in schema["paths"] and "/v1/classify" in schema["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "textseg" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN assets
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize(
    ("data", "form", "status", "words"),
    [
        (b"not an image at all", {"labels": "red"}, 422, "not a readable image"),
        (b"", {"labels": "red"}, 422, "empty"),
        (red_blue(), {"labels": " , ;"}, 422, "label"),
        (red_blue(), {"labels": "a,b,c,d,e,f"}, 422, "limit is 5"),
        (red_blue(), {"labels": "x" * 41}, 422, "limit is 40"),
        (red_blue(), {"labels": "red", "threshold": "abc"}, 422, "threshold"),
        (red_blue(), {"labels": "red", "threshold": "1.5"}, 422, "threshold"),
        (red_blue(), {"labels": "red", "mode": "../../etc/passwd"}, 422, "unknown mode"),
        (None, {"labels": "red"}, 422, "image"),
        (None, {"labels": "red", "image_id": "deadbeef"}, 404, "upload the image again"),
        (_png(np.zeros((301, 300, 3), np.uint8)), {"labels": "red"}, 413, "pixels"),
        (b"\x89PNG" + b"0" * 300_000, {"labels": "red"}, 413, "limit"),
    ],
)
def test_errors(client, data, form, status, words):
    r = seg(client, data, **form)
    assert r.status_code == status, r.text
    assert words in r.text


def test_missing_labels_field_is_422(client):
    r = client.post("/v1/segment", files={"image": ("x.png", red_blue(), "image/png")})
    assert r.status_code == 422


def test_labels_are_data_not_html_or_paths(client, tmp_path):
    evil = "<img src=x onerror=alert(1)>, ../../../../tmp/owned"
    r = seg(client, red_blue(), labels=evil, return_mask="true")
    assert r.status_code == 200, r.text
    names = [lab["name"] for lab in r.json()["legend"]]
    assert names[:2] == ["<img src=x onerror=alert(1)>", "../../../../tmp/owned"]
    assert not (tmp_path / "owned").exists()


def test_queue_bound_returns_503(model):
    import asyncio

    from textseg.serve.app import _Busy

    app = create_app(model, settings=ServeSettings(max_queue=0))
    service = app.state.service
    with pytest.raises(_Busy):
        asyncio.run(service.run(lambda: 1))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = seg(c, red_blue(), labels="red")
        assert r.status_code == 503 and "busy" in r.text
