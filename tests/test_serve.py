"""--serve: the JSON API against a real uvicorn server on 127.0.0.1, the model engine's batching, the
upload limits, the command line, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from _browser import BrowserMissing, chromium, show_heat_map, thumbnails_loaded, upload
from _inference_model import categorised_model, png_bytes, shapes, truncated_png
from alt_i2v.data.captions import format_caption
from alt_i2v.cli import main
from alt_i2v.config import ServeConfig
from alt_i2v.errors import AltI2VError
from alt_i2v.serve import create_app, require_extra
from alt_i2v.serve.engine import ModelEngine
from alt_i2v.serve.server import running
from alt_i2v.tagging.tagger import get_tagger, predict_tags

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 300_000
TOP_K = 5


@pytest.fixture(scope="module")
def site(built_data, tmp_path_factory):
    """A server over the categorised tiny model and an index of 24 shape pictures (built by the CLI)."""
    model = categorised_model(built_data, tmp_path_factory)
    gallery = tmp_path_factory.mktemp("serve_gallery")
    files = []
    for i, img in enumerate(shapes(24, seed=5)):
        files.append(gallery / f"pic{i:02d}.png")
        img.save(files[-1])
    index = gallery.parent / "serve.index"
    assert main(["--index", "--model", str(model), "--images", str(gallery), "--out", str(index), "-q"]) == 0
    app = create_app(model, index, ServeConfig(max_bytes=MAX_BYTES, top_k=TOP_K))
    with running(app) as url:
        yield SimpleNamespace(url=url, model=model, index=index, files=files, app=app,
                              tagger=get_tagger(model))


def post(site, path: str, image: bytes, name: str = "x.png", **kw) -> requests.Response:
    return requests.post(site.url + path, files={"file": (name, image)}, timeout=60, **kw)


def assert_alive(site) -> None:
    r = requests.get(site.url + "api/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims width x height pixels (900 M) around a tiny body: a decompression bomb."""
    data = png_bytes(Image.new("L", (8, 8), 0))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


# ------------------------------------------------------------------------------------------------ API


def test_health_and_model_describe_the_server(site):
    health = requests.get(site.url + "api/health", timeout=10).json()
    assert health["status"] == "ok" and health["tags"] == len(site.tagger.vocab) and health["index"] == 24
    assert health["max_bytes"] == MAX_BYTES
    info = requests.get(site.url + "api/model", timeout=10).json()
    assert info["categories"] == ["character", "copyright", "general"]  # caption order, present ones only
    assert [t["name"] for t in info["tags"]] == site.tagger.vocab.names
    assert [t["threshold"] for t in info["tags"]] == pytest.approx(site.tagger.thresholds.tolist())
    assert info["calibrated"] is True and info["index"] == 24 and info["top_k"] == TOP_K


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "RGBA"])
def test_tags_are_predict_tags_probabilities(site, fmt):
    img = shapes(1, seed=40 + len(fmt))[0].resize((90, 70))
    buf = io.BytesIO()
    (img.convert("RGBA") if fmt == "RGBA" else img).save(buf, "JPEG" if fmt == "JPEG" else "PNG")
    data = buf.getvalue()
    r = post(site, "api/tags", data)
    assert r.status_code == 200, r.text
    body = r.json()
    want = predict_tags(data, model=site.model, threshold=0.0)
    assert list(body["tags"]) == list(want)  # every tag, most probable first
    assert body["tags"] == pytest.approx(want, abs=1e-6)
    calibrated = predict_tags(data, model=site.model)
    assert body["selected"] == list(calibrated)
    assert body["caption"] == format_caption(calibrated, site.tagger.tag_categories)  # --write-captions' format
    assert list(post(site, "api/tags?top_k=2", data).json()["tags"]) == list(want)[:2]
    at = post(site, "api/tags?threshold=0.3", data).json()
    assert at["selected"] == list(predict_tags(data, model=site.model, threshold=0.3))


def test_concurrent_clients_each_get_their_own_answer(site):
    images = [png_bytes(img) for img in shapes(16, seed=77)]
    with ThreadPoolExecutor(max_workers=8) as ex:
        answers = list(ex.map(lambda d: post(site, "api/tags", d).json()["tags"], images))
    for data, got in zip(images, answers):
        assert got == pytest.approx(predict_tags(data, model=site.model, threshold=0.0), abs=1e-5)
    stats = requests.get(site.url + "api/health", timeout=10).json()["engine"]
    assert stats["images"] >= 16 and stats["batches"] <= stats["images"]


def test_engine_batches_waiting_requests_into_one_forward_pass(site):
    engine = ModelEngine(site.tagger, max_batch=4)
    try:
        started, gate = threading.Event(), threading.Event()
        blocker = engine.call(lambda: (started.set(), gate.wait()))  # holds the model thread
        assert started.wait(10)
        size = site.tagger.image_config.image_size
        images = [np.full((size, size, 3), v, np.uint8) for v in (0, 60, 120, 180, 240, 30)]
        futures = [engine.tags(x) for x in images]
        embeds = [engine.embed(x) for x in images[:2]]
        gate.set()
        blocker.result(10)
        got = np.stack([f.result(30) for f in futures])
        assert got == pytest.approx(site.tagger.probabilities_of_arrays(np.stack(images)), abs=1e-5)
        assert np.stack([f.result(30) for f in embeds]) == pytest.approx(
            site.tagger.embed_arrays(np.stack(images[:2])), abs=1e-5)
        stats = engine.stats.as_dict()
        # what queued up meanwhile is taken 4 at a time: 4 tags, then 2 tags + 2 embeddings (two passes)
        assert stats["largest_batch"] == 4 and stats["images"] == 8 and stats["batches"] == 3
        failing = engine.call(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(10)
        assert engine.tags(images[0]).result(30).shape == (len(site.tagger.vocab),)  # the thread lives on
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.tags(images[0])


def test_bad_uploads_get_4xx_and_the_server_stays_up(site):
    good = png_bytes(shapes(1, seed=3)[0])
    cases = [
        ("oversized", lambda: post(site, "api/tags", os.urandom(MAX_BYTES + 1000)), 413, "too_large"),
        ("oversized body", lambda: post(site, "api/tags", os.urandom(MAX_BYTES + 200_000)), 413, "too_large"),
        ("bomb", lambda: post(site, "api/tags", bomb_png()), 413, "too_large"),
        ("not an image", lambda: post(site, "api/tags", b"%PDF-1.4 hello" * 50, "doc.png"), 415, "not_an_image"),
        ("html", lambda: post(site, "api/tags", b"<!doctype html><html>oops</html>"), 415, "html"),
        ("empty", lambda: post(site, "api/tags", b""), 400, "empty"),
        ("truncated", lambda: post(site, "api/tags", truncated_png(Image.new("RGB", (300, 300), "red"))),
         422, "truncated"),
        ("no file field", lambda: requests.post(site.url + "api/tags", files={"image": ("a.png", good)},
                                                timeout=30), 400, "no_file"),
        ("not multipart", lambda: requests.post(site.url + "api/tags", data=good,
                                                headers={"content-type": "image/png"}, timeout=30),
         415, "not_multipart"),
        ("bad threshold", lambda: post(site, "api/tags?threshold=2", good), 400, "bad_request"),
        ("similar: bomb", lambda: post(site, "api/similar", bomb_png()), 413, "too_large"),
        ("similar: empty", lambda: post(site, "api/similar", b""), 400, "empty"),
        ("explain: not an image", lambda: post(site, "api/explain", b"not an image at all"), 415, "not_an_image"),
    ]
    for what, send, status, reason in cases:
        r = send()
        assert r.status_code == status, (what, r.status_code, r.text)
        body = r.json()
        assert body["reason"] == reason and body["error"], what
        assert_alive(site)
    assert "300,000 bytes" in post(site, "api/tags", os.urandom(MAX_BYTES + 10)).json()["error"]
    assert "pixels" in post(site, "api/tags", bomb_png()).json()["error"]
    assert post(site, "api/tags", good).status_code == 200  # still answering real work


def test_a_chunked_oversized_upload_is_refused_while_streaming(site):
    def body():  # no Content-Length: the cap is enforced on the bytes as they arrive
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(8):
            yield os.urandom(100_000)
        yield b"\r\n--b--\r\n"

    r = requests.post(site.url + "api/tags", data=body(), timeout=30,
                      headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["reason"] == "too_large"
    assert_alive(site)


def test_similar_images_and_thumbnails_by_index_position_only(site):
    query = site.files[7]
    r = post(site, "api/similar", query.read_bytes(), query.name)
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == TOP_K and body["indexed"] == 24
    assert results[0]["id"] == query.name and results[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert [x["similarity"] for x in results] == sorted((x["similarity"] for x in results), reverse=True)
    assert str(site.files[0].parent) not in r.text  # server paths are not handed out
    thumb = requests.get(site.url + results[0]["thumbnail"].lstrip("/"), timeout=10)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (192, 192)
    for bad in ("api/indexed/24/thumbnail", "api/indexed/-1/thumbnail", "api/indexed/..%2F..%2Fetc%2Fpasswd/thumbnail",
                "api/indexed/%2Fetc%2Fpasswd/thumbnail"):
        r = requests.get(site.url + bad, timeout=10)
        assert r.status_code in (400, 404) and r.headers["content-type"].startswith("application/json"), bad


def test_explain_answers_the_explain_map_over_the_picture(site):
    from alt_i2v.tagging.gradcam import explain

    data = png_bytes(shapes(1, seed=12)[0].resize((300, 240)))
    probs = predict_tags(data, model=site.model, threshold=0.0)
    tag = list(probs)[1]  # not the most probable: the field must choose it
    r = post(site, "api/explain", data, data={"tag": tag})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tag"] == tag and body["probability"] == pytest.approx(probs[tag], abs=1e-5)
    assert (body["width"], body["height"]) == (300, 240)

    def picture(url: str) -> Image.Image:
        assert url.startswith("data:image/png;base64,")
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))

    heat = np.asarray(picture(body["heatmap"]), dtype=np.float32) / 255.0
    want = explain(data, tag=tag, model=site.model)
    assert heat.shape == want.shape == (240, 300)
    assert np.abs(heat - want).max() <= 1 / 255 + 1e-6  # the explain function's map, 8-bit
    assert picture(body["overlay"]).size == (300, 240) and picture(body["overlay"]).mode == "RGB"
    top = post(site, "api/explain", data).json()
    assert top["tag"] == list(probs)[0]  # default: the most probable tag
    small = post(site, "api/explain?format=png", png_bytes(shapes(1, seed=13)[0]), data={"tag": tag})
    assert small.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(small.content)).size == (256, 256)  # small pictures are shown larger
    r = post(site, "api/explain", data, data={"tag": "no_such_tag"})
    assert r.status_code == 400 and r.json()["reason"] == "unknown_tag"


def test_caption_endpoint_uses_the_write_captions_format(site):
    data = png_bytes(shapes(1, seed=9)[0])
    probs = post(site, "api/tags", data).json()["tags"]
    cats = site.tagger.tag_categories
    for threshold in (None, 0.0, 0.5):
        r = requests.post(site.url + "api/caption", json={"tags": probs, "threshold": threshold}, timeout=10)
        assert r.status_code == 200, r.text
        want = predict_tags(data, model=site.model, threshold=threshold)
        assert r.json()["caption"] == format_caption(want, cats)
    for bad in ({"tags": {"no_such_tag": 0.9}}, {"tags": [1, 2]}, {"tags": probs, "threshold": "x=1"}):
        r = requests.post(site.url + "api/caption", json=bad, timeout=10)
        assert r.status_code == 400 and r.json()["error"]
    r = requests.post(site.url + "api/caption", data=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["reason"] == "bad_json"


def test_page_and_static_files_are_all_local(site):
    page = requests.get(site.url, timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert {"/static/app.js", "/static/style.css"} <= set(assets)
    for asset in assets:
        r = requests.get(site.url + asset.lstrip("/"), timeout=10)
        assert r.status_code == 200, asset
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", r.text), f"{asset} loads something remote"
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)
    schema = requests.get(site.url + "openapi.json", timeout=10).json()
    assert {"/api/tags", "/api/similar", "/api/explain", "/api/health"} <= set(schema["paths"])
    assert "file" in json.dumps(schema["paths"]["/api/tags"]["post"]["requestBody"])
    assert requests.get(site.url + "docs", timeout=10).status_code == 404  # Swagger UI would need a CDN


def test_similar_without_an_index_is_a_clear_404(site):
    app = create_app(site.model, None, ServeConfig())
    with running(app) as url:
        r = requests.post(url + "api/similar", files={"file": ("a.png", png_bytes(shapes(1, seed=1)[0]))}, timeout=30)
        assert r.status_code == 404 and "--index" in r.json()["error"]
        assert requests.get(url + "api/health", timeout=10).json()["index"] is None


# ------------------------------------------------------------------------------------------------ CLI


def test_missing_extra_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(AltI2VError, match=r"pip install 'alt-i2v\[serve\]'"):
        require_extra()


def test_cli_usage_errors(capsys, tmp_path):
    assert main(["--serve"]) == 2
    assert "--serve needs --model" in capsys.readouterr().err
    assert main(["--serve", "--model", str(tmp_path), "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err
    assert main(["--serve", "--model", str(tmp_path), "--data", str(tmp_path)]) == 2  # not a --serve option


def test_cli_serve_end_to_end(site):
    """``python -m alt_i2v --serve --index I --port 0``: the model comes from the index, it answers, and
    Ctrl-C stops it with exit code 0."""
    proc = subprocess.Popen([sys.executable, "-m", "alt_i2v", "--serve", "--index", str(site.index), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"serving .* at (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert url, "the server never said where it listens"
        assert requests.get(url + "api/health", timeout=10).json()["index"] == 24
        r = requests.post(url + "api/tags", files={"file": ("a.png", site.files[0].read_bytes())}, timeout=60)
        assert r.json()["tags"] == pytest.approx(predict_tags(site.files[0], model=site.model, threshold=0.0),
                                                 abs=1e-6)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ browser

def browser_or_skip(tmp_path: Path):
    """The headless Chromium; in CI (CI=true) a missing browser fails, since .ci/run installs it."""
    try:
        return chromium(tmp_path / "chromium-profile")
    except BrowserMissing as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test cannot run in CI: {e}")
        pytest.skip(str(e))


def test_page_in_a_real_browser(site, tmp_path):
    """Upload, see predict_tags' tags with their probabilities, move the threshold, copy-caption text,
    click a tag for its heat map, see the similar images; a screenshot is kept."""
    from selenium.webdriver.common.by import By

    cats = site.tagger.tag_categories
    query = next(f for f in site.files if len(predict_tags(f, model=site.model)) >= 2)
    want = predict_tags(query, model=site.model)
    browser = browser_or_skip(tmp_path)
    try:
        wait = upload(browser, site.url, query)

        def shown() -> dict[str, float]:
            rows = browser.find_elements(By.CSS_SELECTOR, "#tags .tag")
            return {r.get_attribute("data-tag"): float(r.get_attribute("data-prob")) for r in rows}

        assert set(shown()) == set(want) and shown() == pytest.approx(want, abs=1e-6)
        for row in browser.find_elements(By.CSS_SELECTOR, "#tags .tag"):
            assert row.find_element(By.CSS_SELECTOR, ".prob").text == f"{want[row.get_attribute('data-tag')]:.3f}"
        groups = [g.get_attribute("data-category") for g in browser.find_elements(By.CSS_SELECTOR, "#tags .group")]
        assert groups == [c for c in ("character", "copyright", "general") if c in {cats[t] for t in want}]
        assert browser.find_element(By.ID, "caption").text == format_caption(want, cats)

        # the live threshold: at 0 every tag shows, and the caption follows (formatted by the server)
        browser.execute_script("const s = document.getElementById('threshold'); s.value = '0';"
                               "s.dispatchEvent(new Event('input'));")
        everything = predict_tags(query, model=site.model, threshold=0.0)
        assert shown() == pytest.approx(everything, abs=1e-6)
        wait.until(lambda b: b.find_element(By.ID, "caption").text == format_caption(everything, cats))
        browser.find_element(By.ID, "calibrated").click()
        assert set(shown()) == set(want)

        # click a tag: its Grad-CAM overlay replaces the picture
        tag = max(want, key=want.get)
        heat = show_heat_map(browser, wait, tag)
        assert heat.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", heat) > 0
        assert heat.get_attribute("src").startswith("data:image/png;base64,")
        assert tag.replace("_", " ") in browser.find_element(By.ID, "heat-caption").text

        # the most similar indexed images, the query itself first
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#similar .card")) == TOP_K)
        first = browser.find_element(By.CSS_SELECTOR, "#similar .card")
        assert first.get_attribute("data-id") == query.name
        wait.until(thumbnails_loaded)

        browser.find_element(By.ID, "copy").click()
        wait.until(lambda b: b.find_element(By.ID, "copy").text == "Copied")
        shot = tmp_path / "serve.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        # a bad upload: its message on the page, and the next good one works
        (tmp_path / "notes.png").write_text("not a picture")
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.png"))
        wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
        assert "not a recognised image format" in browser.find_element(By.ID, "error").text
        browser.find_element(By.ID, "file").send_keys(str(query))
        wait.until(lambda b: b.find_element(By.ID, "result").get_attribute("data-state") == "done")
        assert not browser.find_element(By.ID, "error").is_displayed() and set(shown()) == set(want)
        errors = [e for e in browser.get_log("browser")
                  if e["level"] == "SEVERE" and "responded with a status of 415" not in e["message"]]
        assert not errors, errors  # no failed request but the bad upload's, no blocked resource, no script error
    finally:
        browser.quit()
