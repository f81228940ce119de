"""serve.limits against a real uvicorn on 127.0.0.1: slow bodies time out while the health check keeps
answering, hostile JSON is a 4xx, disconnects are one log line, and decoding memory (the server process's
RSS) stays near one picture's however many near-limit pictures arrive at once (issue 22, cases 9-12)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from PIL import Image

from _inference_model import categorised_model, png_bytes, shapes
from alt_i2v.config import ServeConfig
from alt_i2v.serve import create_app
from alt_i2v.serve.limits import MAX_REQUESTS
from alt_i2v.serve.server import running

ROOT = Path(__file__).resolve().parents[1]
BODY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def site(built_data, tmp_path_factory):
    model = categorised_model(built_data, tmp_path_factory)
    app = create_app(model, None, ServeConfig(body_timeout=BODY_TIMEOUT))
    with running(app) as url:
        yield SimpleNamespace(url=url, model=model, picture=png_bytes(shapes(1, seed=3)[0]))


def _address(url: str) -> tuple[str, int]:
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
    return host, int(port)


def _slow_upload(url: str) -> socket.socket:
    """A connection that sends an upload's headers, then its body one byte at a time."""
    sock = socket.create_connection(_address(url), timeout=30)
    sock.sendall(b"POST /api/tags HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n-")
    return sock


def _answer(sock: socket.socket) -> bytes:
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data


def test_slow_bodies_time_out_and_health_keeps_a_slot(site):
    """Case 10: every request slot held by a client sending a byte a second: /api/health answers 200, a
    new upload a clear 503 ``busy``; after the body timeout each slow client gets 408 and the slots free."""
    socks = [_slow_upload(site.url) for _ in range(MAX_REQUESTS)]
    stop = threading.Event()

    def dribble() -> None:
        while not stop.wait(0.5):
            for s in socks:
                try:
                    s.sendall(b"-")
                except OSError:
                    pass

    feeder = threading.Thread(target=dribble, daemon=True)
    feeder.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        health = requests.get(site.url + "api/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert time.monotonic() - t0 < 2
        busy = requests.post(site.url + "api/tags", files={"file": ("a.png", site.picture)}, timeout=10)
        assert busy.status_code == 503 and busy.json()["reason"] == "busy"
        answers = [_answer(s) for s in socks]
    finally:
        stop.set()
        feeder.join()
        for s in socks:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 408") and b'"reason":"timeout"' in a for a in answers), answers[0]
    ok = requests.post(site.url + "api/tags", files={"file": ("a.png", site.picture)}, timeout=30)
    assert ok.status_code == 200 and ok.json()["tags"]


def test_hostile_caption_json_is_a_4xx_with_a_reason(site):
    """Case 11: a 400-digit number (OverflowError) and 200,000 nested brackets (RecursionError)."""
    tag = requests.get(site.url + "api/model", timeout=10).json()["tags"][0]["name"]
    bodies = ['{"tags": {"%s": %s}}' % (tag, "9" * 400), "[" * 200_000 + "]" * 200_000,
              '{"tags": {"%s": 0.5}, "threshold": %s}' % (tag, "[" * 100_000 + "]" * 100_000),
              '{"tags": {"%s": 0.5}, "threshold": %s}' % (tag, "9" * 400)]
    for body in bodies:
        r = requests.post(site.url + "api/caption", data=body, headers={"content-type": "application/json"},
                          timeout=30)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
        assert set(r.json()) == {"error", "reason"}
    assert requests.get(site.url + "api/health", timeout=10).status_code == 200


# ---------------------------------------------------------------------------------- the CLI in a process

def _serve(model: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "alt_i2v", "--serve", "--model", str(model), "--port", "0",
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"serving .* at (http://127\.0\.0\.1:\d+/)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError(f"the server never said where it listens: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS


@pytest.mark.slow
def test_disconnects_are_one_line_each_and_never_a_traceback(site, tmp_path):
    """Case 12: clients that hang up mid-upload cost one log line each, no 65-line traceback."""
    log = tmp_path / "server.log"
    proc, url = _serve(site.model, log)
    try:
        for _ in range(5):
            s = _slow_upload(url)
            s.sendall(b"-" * 100)
            time.sleep(0.2)
            s.close()
        time.sleep(1.0)
        assert requests.get(url + "api/health", timeout=10).status_code == 200
    finally:
        _stop(proc)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "ClientDisconnect" not in text, text[-3000:]
    assert len([line for line in text.splitlines() if "disconnected before its request" in line]) == 5


def _bomb(side: int) -> bytes:
    """A small PNG of one colour that decodes to ``side`` x ``side`` RGB pixels (side**2 * 3 bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_decoding_memory_is_bounded_across_requests_and_given_back(site, tmp_path):
    """Case 9 at a tenth of the scale: four pictures just under --max-pixels at once cost the server's RSS
    about what one costs (they share one pixel budget), and the memory is handed back afterwards."""
    side, limit = 6300, 40_000_000  # 39.7 M pixels each, the server allows 40 M
    bomb = _bomb(side)
    assert len(bomb) < 400_000
    proc, url = _serve(site.model, tmp_path / "server.log", "--max-pixels", str(limit))

    def tags(data: bytes) -> int:
        return requests.post(url + "api/tags", files={"file": ("b.png", data)}, timeout=300).status_code

    try:
        assert tags(site.picture) == 200
        base = _status(proc.pid)["VmRSS"]
        _reset_peak(proc.pid)
        assert tags(bomb) == 200
        one = _status(proc.pid)["VmHWM"] - base
        assert one > 100  # the decode really costs memory (~115 MiB of pixels at least)
        time.sleep(0.5)
        base = _status(proc.pid)["VmRSS"]
        _reset_peak(proc.pid)
        with ThreadPoolExecutor(4) as ex:
            assert list(ex.map(tags, [bomb] * 4)) == [200] * 4
        four = _status(proc.pid)["VmHWM"] - base
        time.sleep(0.5)
        after = _status(proc.pid)["VmRSS"] - base
    finally:
        _stop(proc)
    print(json.dumps({"one_MiB": one, "four_at_once_MiB": four, "held_after_MiB": after}))
    assert four < 1.5 * one + 64, (one, four)
    assert after < 0.25 * one + 48, (one, after)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_idle_and_slow_header_connections_are_closed_and_health_comes_back(site, monkeypatch):
    """Case 10 by the head: more connections than the server allows that send nothing (or their request
    line a byte at a time) are closed after the head timeout, and /api/health answers again."""
    import alt_i2v.serve.server as server
    from alt_i2v.serve.limits import MAX_CONNECTIONS

    monkeypatch.setattr(server, "HEADER_TIMEOUT", 1.5)
    idle = [socket.create_connection(_address(site.url), timeout=10) for _ in range(MAX_CONNECTIONS)]
    slow = socket.create_connection(_address(site.url), timeout=10)
    try:
        time.sleep(0.3)
        full = requests.get(site.url + "api/health", timeout=10)
        assert full.status_code == 503  # every connection slot taken: what a monitor saw for ever before
        for ch in b"GET /api/hea":
            try:
                slow.sendall(bytes([ch]))
            except OSError:
                break
            time.sleep(0.2)
        t0 = time.monotonic()
        assert all(_closed(s) for s in idle + [slow])  # by the server
        assert time.monotonic() - t0 < 5
        assert requests.get(site.url + "api/health", timeout=10).status_code == 200
    finally:
        for s in idle + [slow]:
            s.close()
