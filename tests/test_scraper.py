"""The Danbooru scraper against a real HTTP server on 127.0.0.1 (tests/fake_danbooru.py): paging with the
cursor, API and HTML giving identical posts, injected faults, skips, resume after SIGKILL, the rate limit,
credentials never leaking."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from fake_danbooru import FakeDanbooru, FakePost, make_image, make_posts

from alt_i2v import __version__
from alt_i2v.cli import main as cli_main
from alt_i2v.errors import AltI2VError, UsageError
from alt_i2v.scraper import (USER_AGENT, DanbooruClient, FetchError, PageFormatError, RateLimiter, check_url,
                             normalize_base_url, parse_post_list, parse_post_page, parse_retry_after, scrape)

FAST = {"rate": 200.0, "workers": 4, "backoff": 0.01, "quiet": True}
REPO = Path(__file__).resolve().parents[1]


def lines(data: Path) -> list[dict]:
    path = data / "posts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def assert_consistent(data: Path, expected_ids: set[int]) -> list[dict]:
    """posts.jsonl holds exactly ``expected_ids`` once each, every file is whole and named by its md5,
    no temp file is left and no stray image lies beside the referenced ones."""
    posts = lines(data)
    ids = [p["id"] for p in posts]
    assert len(ids) == len(set(ids)), "duplicate posts"
    assert set(ids) == expected_ids
    for p in posts:
        f = data / p["file"]
        assert hashlib.md5(f.read_bytes()).hexdigest() == p["md5"]
        assert p["file"] == f"images/{p['md5'][:2]}/{p['md5']}.{p['file_ext']}"
    images = data / "images"
    files = [f for f in images.rglob("*") if f.is_file()] if images.exists() else []
    assert [f.name for f in files if f.suffix == ".part"] == []  # no temporary file left behind
    assert {str(f.relative_to(data)) for f in files} == {p["file"] for p in posts}
    return posts


def good(posts: list[FakePost]) -> set[int]:
    return {p.id for p in posts}


def report(data: Path) -> dict:
    return json.loads((data / "reports" / "scrape_report.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# Paging and the two sources


def test_cursor_paging_and_both_sources_give_identical_posts(tmp_path):
    posts = make_posts(23, extra_tags=["fleet_girl"]) + make_posts(5, start_id=2000, seed=1)
    with FakeDanbooru(posts) as srv:
        base = srv.base_url
        api = scrape(tmp_path / "api", "fleet_girl", base_url=base, page_size=10, **FAST)
        json_pages = [r.params.get("page") for r in srv.requests("/posts.json")]
        image_requests = srv.count("/data/")
        srv.reset_log()
        html = scrape(tmp_path / "html", ["fleet_girl"], base_url=srv.base_url, page_size=10,
                      source="html", **FAST)
        html_pages = [r.params.get("page") for r in srv.requests("/posts") if r.path == "/posts"]
    wanted = {p.id for p in posts if p.id < 2000}
    # the first page, then the b<id> cursor below the lowest id seen; a short page ends the query
    assert json_pages == [None, "b1013", "b1003"] and html_pages == [None, "b1013", "b1003"]
    assert api.stored == html.stored == 23 and api.requests == 3 + 23 == image_requests + 3
    assert api.retries == 0 and not api.skipped
    a = sorted(assert_consistent(tmp_path / "api", wanted), key=lambda p: p["id"])
    b = sorted(assert_consistent(tmp_path / "html", wanted), key=lambda p: p["id"])
    assert a == b
    first = next(p for p in a if p["id"] == 1000)
    src = next(p for p in posts if p.id == 1000)
    assert set(first) == {"id", "md5", "file_ext", "file", "tags", "rating", "score", "width", "height", "source",
                          "url"}
    assert first["tags"] == src.tags and first["rating"] == src.rating and first["score"] == src.score
    assert first["source"] == "danbooru" and first["url"] == f"{base}/posts/1000"
    assert any('"quotes"' in p["tags"]["general"] or "black_&_white" in p["tags"]["general"] for p in a)


def test_order_metatag_pages_by_number(tmp_path):
    posts = make_posts(12, extra_tags=["touhou_x"])
    with FakeDanbooru(posts) as srv:
        r = scrape(tmp_path / "d", "touhou_x order:score", base_url=srv.base_url, page_size=5, **FAST)
        pages = [q.params.get("page") for q in srv.requests("/posts.json")]
    assert pages == ["1", "2", "3"] and r.stored == 12


def test_sample_size_stores_the_sample_under_its_own_md5(tmp_path):
    posts = make_posts(4, extra_tags=["s"])
    for p in posts[:2]:
        p.sample = make_image(p.id + 77, (12, 12), "JPEG")
    with FakeDanbooru(posts) as srv:
        res = {src: scrape(tmp_path / src, "s", base_url=srv.base_url, file_size="sample", source=src, **FAST)
               for src in ("api", "html")}
    for src, r in res.items():
        assert r.stored == 4
        by_id = {p["id"]: p for p in assert_consistent(tmp_path / src, good(posts))}
        for p in posts:
            line = by_id[p.id]
            if p.sample is not None:
                assert line["md5"] == hashlib.md5(p.sample).hexdigest() and line["file_ext"] == "jpg"
                assert line["original_md5"] == p.md5 and line["variant"] == "sample"
            else:
                assert line["md5"] == p.md5 and "variant" not in line
    assert sorted(lines(tmp_path / "api"), key=lambda p: p["id"]) == sorted(lines(tmp_path / "html"),
                                                                            key=lambda p: p["id"])


# ---------------------------------------------------------------------------------------------------------
# Faults and skips


def special_posts() -> list[FakePost]:
    """Posts that must not end up in the dataset (even ids: the HTML pages publish data-md5 on those)."""
    img = make_image(9001)
    return [
        FakePost(3000, make_image(3000), tags={"general": ["kc"]}, restricted=True),
        FakePost(3002, make_image(3002), tags={"general": ["kc"]}, deleted=True),
        FakePost(3004, b"\x00\x00\x00\x18ftypmp42 not really a video", "mp4", tags={"general": ["kc"]}),
        FakePost(3006, b"PK\x03\x04 ugoira frames", "zip", tags={"general": ["kc"]}),
        FakePost(3008, img, tags={"general": ["kc"]}, md5=hashlib.md5(img + b"x").hexdigest()),  # md5 mismatch
        FakePost(3010, make_image(3010), tags={"general": ["kc"]}, file_url="file:///etc/passwd"),
        FakePost(3012, make_image(3012), tags={"general": ["kc"]}, md5="../../../../tmp/evil",
                 file_url="https://example.invalid/evil.png"),
        FakePost(3014, make_image(3014, (64, 64)), tags={"general": ["kc"]}),  # over --max-bytes
    ]


EXPECTED_SKIPS = {"deleted": 1, "md5_mismatch": 1, "not_image": 2, "restricted": 1, "too_large": 1, "unsafe": 2}


@pytest.mark.parametrize("source", ["api", "html"])
def test_faults_are_retried_and_bad_posts_skipped(tmp_path, source):
    posts = make_posts(20, extra_tags=["kc"])
    specials = special_posts()
    list_path = "/posts.json" if source == "api" else "/posts"
    with FakeDanbooru(posts + specials) as srv:
        files = {p.id: srv.file_path(p) for p in posts}
        t429 = srv.add_fault("429", list_path, page="b3000", retry_after="1")
        srv.add_fault("truncate", list_path, page="1")
        srv.add_fault("malformed", list_path, page="b1010")
        srv.add_fault("503", files[1019], times=2)
        srv.add_fault("truncate", files[1018])
        srv.add_fault("reset", files[1017])
        srv.add_fault("truncate", files[1016], times=9)  # never whole: skipped after the bounded tries
        if source == "html":
            srv.add_fault("503", "/posts/1015")
            srv.add_fault("truncate", "/posts/1014")
        r = scrape(tmp_path / "d", "kc", base_url=srv.base_url, page_size=8, max_bytes=4000, source=source,
                   tries=4, **FAST)
        page_log = srv.requests(list_path)
        mismatched = srv.count(srv.file_path(specials[4]))
        # the API gives file_size up front; the HTML pages do not, so there the Content-Length decides
        never = [srv.file_path(specials[i]) for i in ((0, 1, 2, 3, 7) if source == "api" else (0, 1, 2, 3))]
        never += ["/etc/passwd", "/tmp/evil"]
        requested = {q.path for q in srv.requests("/data/")}
    assert t429.hits == 1
    assert_consistent(tmp_path / "d", good(posts) - {1016})
    counts = dict(EXPECTED_SKIPS, download_failed=1)
    assert r.skip_counts() == counts
    rep = report(tmp_path / "d")
    assert rep["skip reasons"] == counts and rep["new posts"] == 19
    assert {s["id"] for s in rep["skipped_posts"]} == {p.id for p in specials} | {1016}
    assert next(s for s in rep["skipped_posts"] if s["id"] == 1016)["detail"].startswith("truncated")
    # Retry-After honoured: the page was asked again no sooner than one second later
    tries = [q.t for q in page_log if q.params.get("page") == "b3000"]
    assert len(tries) == 2 and tries[1] - tries[0] >= 0.95
    assert mismatched == 2  # one more try, then refused
    assert not requested & set(never)  # restricted, deleted, video, archive, too large: never downloaded
    assert r.retries >= 2 + 2 + 1 + 1 + 3 + 1  # page faults, 503s, truncations, reset, md5 retry


def test_resume_skips_stored_posts_repairs_files_and_adopts_orphans(tmp_path):
    posts = make_posts(12, extra_tags=["kc"])
    data = tmp_path / "d"
    with FakeDanbooru(posts) as srv:
        scrape(data, "kc", base_url=srv.base_url, **FAST)
        srv.reset_log()
        again = scrape(data, "kc", base_url=srv.base_url, **FAST)
        assert again.stored == 0 and again.present == 12 and srv.count("/data/") == 0

        stored = lines(data)
        (data / stored[0]["file"]).unlink()                    # lost
        (data / stored[1]["file"]).write_bytes(b"garbage")     # damaged
        stale = data / stored[2]["file"]
        (stale.parent / f".~alt-i2v-999999999-abc12345-{stale.name}.part").write_bytes(b"half")  # a killed download
        srv.reset_log()
        fixed = scrape(data, "kc", base_url=srv.base_url, **FAST)
        assert fixed.repaired == 2 and fixed.present == 10 and fixed.stored == 0
        assert fixed.stale_temps_removed == 1 and srv.count("/data/") == 2
        assert_consistent(data, good(posts))

        # killed between the rename and the append: the verified file is adopted, nothing downloaded
        text = (data / "posts.jsonl").read_text().splitlines(keepends=True)
        orphan = json.loads(text[-1])
        (data / "posts.jsonl").write_text("".join(text[:-1]) + text[-1][:25])  # and a torn line
        srv.reset_log()
        adopt = scrape(data, "kc", base_url=srv.base_url, **FAST)
        assert adopt.stored == 1 and adopt.adopted == 1 and adopt.new_ids == [orphan["id"]]
        assert srv.count("/data/") == 0
    assert_consistent(data, good(posts))


def test_limit_counts_new_posts_and_queries_run_in_order(tmp_path):
    alpha = make_posts(10, start_id=100, extra_tags=["alpha"])
    beta = make_posts(10, start_id=500, seed=3, extra_tags=["beta"])
    data = tmp_path / "d"
    with FakeDanbooru(alpha + beta) as srv:
        first = scrape(data, ["alpha", "beta"], limit=6, base_url=srv.base_url, **FAST)
        assert first.stored == 6 and first.limit_reached
        assert srv.count("/data/") == 6  # nothing fetched beyond the limit
        second = scrape(data, ["alpha", "beta"], limit=6, base_url=srv.base_url, **FAST)
    assert set(first.new_ids) == set(range(104, 110))  # newest first within the first query
    assert set(second.new_ids) == set(range(100, 104)) | {509, 508} and second.present == 6
    assert_consistent(data, set(range(100, 110)) | {508, 509})


# ---------------------------------------------------------------------------------------------------------
# Politeness


def test_rate_limit_holds_at_the_server(tmp_path):
    posts = make_posts(24, extra_tags=["kc"])
    with FakeDanbooru(posts, latency=0.01) as srv:
        r = scrape(tmp_path / "d", "kc", base_url=srv.base_url, rate=10, workers=4, backoff=0.01, quiet=True)
        log = srv.requests()
        per_second = srv.per_second()
        most = srv.max_in_window(1.0)
    assert r.stored == 24 and len(log) == 25
    assert most <= 11, per_second  # starts 0.1 s apart: at most 10 (+1 for timing noise) in any second
    span = log[-1].t - log[0].t
    assert (len(log) - 1) / span >= 8.5  # and the allowance is used, not wasted
    assert all(q.user_agent == USER_AGENT for q in log)
    assert USER_AGENT == f"alt-i2v/{__version__} (+https://github.com/alt-i2v/alt-i2v)"


def test_rate_limiter_spaces_threads_and_defers():
    import threading

    class Recorder:
        """A stop event that records when each caller would start instead of sleeping."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.lock = threading.Lock()

        def wait(self, delay: float) -> bool:
            with self.lock:
                self.starts.append(round(clock[0] + delay, 6))
            return False

        def is_set(self) -> bool:
            return False

    clock = [100.0]
    lim = RateLimiter(50.0, clock=lambda: clock[0])
    rec = Recorder()
    lim.acquire(rec)  # the first slot is now: no wait
    threads = [threading.Thread(target=lambda: [lim.acquire(rec) for _ in range(4)]) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every caller, whatever its thread, got its own slot 1/50 s after the previous one: no burst
    assert sorted(rec.starts) == [round(100.0 + 0.02 * i, 6) for i in range(1, 13)]
    clock[0] = 200.0  # idle for a while: still no burst afterwards
    rec.starts.clear()
    for _ in range(3):
        lim.acquire(rec)
    assert rec.starts == [200.02, 200.04]
    lim.defer(5.0)  # Retry-After: nobody starts before it has passed
    lim.acquire(rec)
    assert rec.starts[-1] == 205.0
    stop = threading.Event()
    stop.set()
    real = RateLimiter(50.0)
    real.defer(5)
    assert real.acquire(stop) is False  # an interrupted wait returns at once
    t0 = time.monotonic()
    real2 = RateLimiter(50.0)
    for _ in range(6):
        assert real2.acquire()
    assert time.monotonic() - t0 >= 5 * 0.02 - 0.002
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_credentials_only_as_basic_auth_to_the_api_host(tmp_path):
    posts = make_posts(5, extra_tags=["kc"])
    with FakeDanbooru(posts) as cdn, FakeDanbooru(posts, credentials=("alice", "K3y-s3cret")) as api:
        for p in posts:
            p.file_url = cdn.base_url + cdn.file_path(p)
        r = scrape(tmp_path / "d", "kc", base_url=api.base_url, login="alice", api_key="K3y-s3cret", **FAST)
        assert r.stored == 5
        assert {q.user for q in api.requests()} == {"alice"}
        assert {q.user for q in cdn.requests()} == {None}  # the image host never sees them
        assert all("K3y" not in json.dumps(q.params) for q in api.requests())
        with pytest.raises(AltI2VError) as err:  # a wrong key: 401, reported without the key
            scrape(tmp_path / "e", "kc", base_url=api.base_url, login="alice", api_key="wr0ng-K3y", **FAST)
    assert "http_401" in str(err.value) and "wr0ng" not in str(err.value)
    for f in list((tmp_path / "d").rglob("*")) + list((tmp_path / "e").rglob("*")):
        if f.is_file():
            assert b"K3y-s3cret" not in f.read_bytes() and b"wr0ng-K3y" not in f.read_bytes()


def test_kill_and_resume_in_a_subprocess(tmp_path):
    posts = make_posts(30, extra_tags=["kantai_collection"])
    data = tmp_path / "data"
    env = dict(os.environ, DANBOORU_LOGIN="kill_test_user", DANBOORU_API_KEY="kill-test-KEY-42",
               PYTHONPATH=str(REPO))
    with FakeDanbooru(posts, credentials=("kill_test_user", "kill-test-KEY-42")) as srv:
        stall = srv.add_fault("stall", srv.file_path(posts[-12]))  # a download that hangs half way
        cmd = [sys.executable, "-m", "alt_i2v", "--scrape", "--data", str(data), "--query", "kantai_collection",
               "--base-url", srv.base_url, "--rate", "100", "--workers", "2"]
        proc = subprocess.Popen(cmd + ["--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if stall.stalled.is_set() and list(data.rglob("*.part")) and len(lines(data)) >= 5:
                break
            time.sleep(0.02)
        else:
            proc.kill()
            pytest.fail("the first run never reached the stalled download")
        proc.send_signal(signal.SIGKILL)
        out1, err1 = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        before = {p["id"] for p in lines(data)}
        assert 5 <= len(before) < 30 and list(data.rglob("*.part"))  # killed mid-run, a partial file left
        srv.reset_log()
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
        fetched = {q.path for q in srv.requests("/data/")}
        users = {q.user for q in srv.requests()}
    assert done.returncode == 0, done.stderr.decode()
    assert_consistent(data, good(posts))
    stored_before = {srv.file_path(p) for p in posts if p.id in before}
    assert not fetched & stored_before  # nothing stored by the killed run is fetched again
    assert users == {"kill_test_user"}
    out = done.stdout.decode()
    assert "new posts" in out and "already present" in out
    rep = report(data)
    assert rep["new posts"] == 30 - len(before) and rep["already present"] == len(before)
    everything = out1 + err1 + done.stdout + done.stderr + b"".join(
        f.read_bytes() for f in data.rglob("*") if f.is_file())
    assert b"kill-test-KEY-42" not in everything


def test_ctrl_c_stops_promptly_and_keeps_finished_work(tmp_path):
    posts = make_posts(20, extra_tags=["kc"])
    data = tmp_path / "data"
    with FakeDanbooru(posts) as srv:
        stall = srv.add_fault("stall", srv.file_path(posts[-6]))
        cmd = [sys.executable, "-m", "alt_i2v", "--scrape", "--data", str(data), "--query", "kc",
               "--base-url", srv.base_url, "--rate", "100", "--workers", "2", "--quiet"]
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not (stall.stalled.is_set() and list(data.rglob("*.part"))) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - t0
    assert proc.returncode == 1 and b"interrupted" in err
    assert took < 5  # the stalled download does not hold the exit until its 30 s read timeout
    kept = {p["id"] for p in lines(data)}
    assert 0 < len(kept) < 20
    assert_consistent(data, kept)  # whatever finished is recorded, nothing partial is left
    assert report(data)["interrupted"] is True


# ---------------------------------------------------------------------------------------------------------
# Failures, usage, parsing, safety


def test_unreachable_server_is_a_clear_error_with_a_report(tmp_path):
    with FakeDanbooru([]) as srv:
        url = srv.base_url
    with pytest.raises(AltI2VError, match="nothing scraped"):
        scrape(tmp_path / "d", "kc", base_url=url, rate=100, tries=2, backoff=0.01, quiet=True)
    rep = report(tmp_path / "d")
    assert rep["failed_pages"][0]["reason"] == "connection" and rep["new posts"] == 0


def test_server_errors_give_up_after_bounded_tries(tmp_path):
    posts = make_posts(3, extra_tags=["kc"])
    with FakeDanbooru(posts) as srv:
        srv.add_fault("503", "/posts.json", times=99)
        with pytest.raises(AltI2VError, match="http_503"):
            scrape(tmp_path / "d", "kc", base_url=srv.base_url, tries=3, **FAST)
        assert srv.count("/posts.json") == 3


def test_usage_errors():
    for kw in ({"rate": 0}, {"workers": 0}, {"limit": 0}, {"source": "rss"}, {"file_size": "huge"},
               {"login": "someone"}, {"base_url": "ftp://example.org"}):
        with pytest.raises(UsageError):
            scrape("unused", "kc", **kw)
    with pytest.raises(UsageError) as err:
        normalize_base_url("https://bob:hunter2@danbooru.donmai.us")
    assert "hunter2" not in str(err.value)
    with pytest.raises(UsageError):
        scrape("unused", ["  "])
    assert normalize_base_url("https://danbooru.donmai.us/") == "https://danbooru.donmai.us"


def test_cli_scrape(tmp_path, capsys):
    posts = make_posts(4, extra_tags=["kc"])
    with FakeDanbooru(posts) as srv:
        rc = cli_main(["--scrape", "--data", str(tmp_path / "d"), "--query", "kc", "--base-url", srv.base_url,
                       "--rate", "100", "--limit", "3"])
    assert rc == 0 and len(lines(tmp_path / "d")) == 3
    assert "new posts" in capsys.readouterr().out
    assert cli_main(["--scrape", "--data", str(tmp_path / "d")]) == 2  # no --query


def test_retry_after_and_urls():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert 25 <= later <= 31
    assert check_url("https://cdn.donmai.us/original/aa/bb/x.jpg")
    for bad in ("file:///etc/passwd", "ftp://x/y.png", "javascript:alert(1)", "//no-scheme/x.png", None):
        with pytest.raises(FetchError):
            check_url(bad)
    client = DanbooruClient("https://danbooru.donmai.us", login="bob", api_key="TopSecretKey")
    text = client.scrub("GET https://x/posts.json?login=bob&api_key=TopSecretKey failed; key TopSecretKey")
    assert "TopSecretKey" not in text and "bob" not in text
    client.close()


def test_html_parsers_fall_back_and_reject_other_pages():
    page = """<html><body><aside><section id="tag-list">
      <ul><li class="tag-type-4"><a class="search-tag" href="#">hibiki (kancolle)</a></li>
          <li class="tag-type-0" data-tag-name="1girl"></li><li class="tag-type-9" data-tag-name="odd"></li></ul>
      </section><section id="post-information"><ul><li id="post-info-size">Size:
      <a href="/data/original/0f/34/0f343b0931126a20f133d67c2b018a3b.JPG">1 MB</a></li></ul></section></aside>
      <section class="image-container" data-id="7" data-width="10" data-height="20" data-rating="sensitive"
       data-score="-3" data-flags=""><img id="image" src="/data/sample/sample-x.jpg"></section></body></html>"""
    info = parse_post_page(page, "https://booru.example/posts/7", 7)
    assert info.md5 == "0f343b0931126a20f133d67c2b018a3b" and info.file_ext == "jpg"
    assert info.file_url == "https://booru.example/data/original/0f/34/0f343b0931126a20f133d67c2b018a3b.JPG"
    assert info.sample_url == "https://booru.example/data/sample/sample-x.jpg"
    assert info.tags["character"] == ["hibiki_(kancolle)"] and info.tags["general"] == ["1girl", "odd"]
    assert (info.rating, info.score, info.width, info.height) == ("s", -3, 10, 20)
    with pytest.raises(PageFormatError):
        parse_post_page(page, "https://booru.example/posts/8", 8)  # a different post
    with pytest.raises(PageFormatError):
        parse_post_page("<html><body>Just a moment...</body></html>", "https://x/posts/1", 1)
    with pytest.raises(PageFormatError):
        parse_post_list("<html><body><h1>Checking your browser</h1></body></html>")
    items, more = parse_post_list('<div id="posts"><p>No posts found.</p></div>')
    assert items == [] and more is None
