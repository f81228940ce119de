"""Bad input and concurrent commands (issue 10): each case reproduces a way data was lost or a stage crashed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import numpy as np
import pytest

from alt_i2v.errors import AltI2VError
from alt_i2v.store import STORE_DIR, build_store, open_store, pack
from alt_i2v.data.vocab import build_vocab
from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alt_i2v", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, **kw)


def small_store(tmp_path: Path, n: int = 24) -> Path:
    data = tmp_path / "data"
    make_dataset(data, n=n, seed=3, size=24)
    build_vocab(data)
    build_store(data, image_size=16, workers=1, quiet=True)
    return data


# 1. A store record can crash the reader ---------------------------------------------------------------------


def test_hostile_store_records_are_skipped_and_reported_not_decoded(tmp_path):
    import plyvel

    data = small_store(tmp_path)
    evil = {  # the record: a structured dtype with an object field (its bytes would become pointers)
        "i100": {"id": 100, "image": {b"nd": True, b"type": [["a", "|O"]], b"shape": (64, 64, 3),
                                      b"data": b"A" * 98304}, "labels": [0], "split": "train"},
        "i101": {"id": 101, "image": {b"nd": True, b"type": "|O", b"kind": b"", b"shape": (16, 16, 3),
                                      b"data": b"A" * 6144}, "labels": [0], "split": "train"},
        "i102": {"id": 102, "image": {b"nd": True, b"type": "<f8", b"kind": b"", b"shape": (16, 16, 3),
                                      b"data": b"\0" * 6144}, "labels": [0], "split": "train"},  # wrong dtype
        "i103": {"id": 103, "image": {b"nd": True, b"type": "|u1", b"kind": b"", b"shape": (1 << 20, 16, 3),
                                      b"data": b"\0" * 768}, "labels": [0], "split": "train"},  # lying shape
        "i104": pack({"id": 104, "image": np.zeros((8, 8, 3), np.uint8), "labels": [0], "split": "train"}),
    }
    db = plyvel.DB(str(data / STORE_DIR))
    for key, rec in evil.items():
        raw = rec if isinstance(rec, bytes) else msgpack.packb(rec, use_bin_type=True)
        db.put(b"r/" + key.encode(), raw)
        db.put(b"s/train/" + key.encode(), pack([0]))
    db.close()
    # a subprocess, so that a segfault shows up as a failed test rather than a dead pytest
    code = textwrap.dedent(f"""
        import json, sys
        from alt_i2v.store import open_store
        from alt_i2v.errors import BadRecordError
        with open_store({str(data)!r}) as s:  # what the training and evaluation pipeline reads, batch by batch
            keys, n = s.ids("train"), 0
            for i in range(0, len(keys), 8):
                x, labels = s.get_batch(keys[i:i + 8])
                assert x.shape[1:] == (16, 16, 3) and len(x) == len(labels)
                n += len(x)
            try:
                s.get("i100")
                raise SystemExit("get() returned a hostile record")
            except BadRecordError as e:
                err = str(e)
            print(json.dumps({{"images": n, "train": s.count("train"), "bad": s.bad_report(), "err": err}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["images"] == got["train"]  # every real record read, none of the five hostile ones
    assert sorted(b["key"] for b in got["bad"]) == sorted(evil)
    assert "i100" in got["err"] and "plain numeric" in got["err"]


# 2. --build --rebuild deleted the store before taking its lock ------------------------------------------------


def test_rebuild_refuses_while_another_process_reads_the_store_then_swaps_atomically(tmp_path):
    data = small_store(tmp_path)
    with open_store(data) as s:
        before = {k: s.get(k)["labels"] for k in s.ids()}
    reader = subprocess.Popen(  # a second real process holding the store open, as --train does
        [sys.executable, "-c", f"import sys; from alt_i2v.store import open_store; s = open_store({str(data)!r}); "
                               "print('open', flush=True); sys.stdin.read(); print(len(s.ids()))"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert reader.stdout.readline().strip() == "open"
        busy = run_cli("--build", "--rebuild", "--data", str(data), "--image-size", "16", "--workers", "1",
                       "--quiet")
        assert busy.returncode == 1 and "in use by another process" in busy.stderr, busy.stderr
        out, _ = reader.communicate("", timeout=60)  # the reader still reads every record: nothing was removed
    finally:
        reader.kill() if reader.poll() is None else None
    assert reader.returncode == 0 and int(out.split()[-1]) == len(before)
    done = run_cli("--build", "--rebuild", "--data", str(data), "--image-size", "16", "--workers", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    with open_store(data) as s:
        assert {k: s.get(k)["labels"] for k in s.ids()} == before and s.count() == len(before)
    assert sorted(p.name for p in data.iterdir() if "store" in p.name) == [".store.lock", "store"]


def test_rebuild_killed_before_its_swap_is_completed_by_the_next_build(tmp_path):
    from alt_i2v.store.build import _finish_swap

    data = small_store(tmp_path)
    store = data / STORE_DIR
    store.rename(data / ".store.old")  # killed between the two renames: the new store is still beside it
    build_store(data, image_size=16, workers=1, rebuild=True, quiet=True)  # builds .store.rebuild, swaps
    assert (store / "CURRENT").exists() and not (data / ".store.old").exists()
    (data / ".store.old").mkdir()
    _finish_swap(store)
    assert not (data / ".store.old").exists() and (store / "CURRENT").exists()


# 6. --build with posts.jsonl missing wiped the store ---------------------------------------------------------


def test_build_without_posts_is_an_error_and_a_large_prune_needs_the_flag(tmp_path):
    data = small_store(tmp_path, n=20)
    posts = data / "posts.jsonl"
    lines = posts.read_text().splitlines(keepends=True)
    posts.unlink()
    gone = run_cli("--build", "--data", str(data), "--image-size", "16", "--workers", "1", "--quiet")
    assert gone.returncode == 1 and "no posts" in gone.stderr, gone.stderr
    for text in ("", "not json\n"):
        posts.write_text(text)
        with pytest.raises(AltI2VError, match="no posts|not one usable post"):
            build_store(data, image_size=16, workers=1, quiet=True)
    posts.write_text("".join(lines[:10]))  # half the posts left: refused without --prune
    with pytest.raises(AltI2VError, match="--prune"):
        build_store(data, image_size=16, workers=1, quiet=True)
    with open_store(data) as s:
        assert s.count() == 20  # nothing was removed by any of the refused builds
    posts.write_text("".join(lines[:18]))  # 10% gone: an ordinary build prunes it
    assert build_store(data, image_size=16, workers=1, quiet=True).removed == 2
    posts.write_text("".join(lines[:9]))
    pruned = run_cli("--build", "--prune", "--data", str(data), "--image-size", "16", "--workers", "1", "--quiet")
    assert pruned.returncode == 0, pruned.stderr
    with open_store(data) as s:
        assert s.count() == 9


# 3-5. posts.jsonl lines that stopped every stage -------------------------------------------------------------


def test_out_of_range_ids_are_skipped_and_reported_by_every_reader(tmp_path):
    from alt_i2v.data.posts import read_posts

    data = tmp_path / "data"
    make_dataset(data, n=12, seed=4, size=24)
    good = json.loads((data / "posts.jsonl").read_text().splitlines()[0])
    with open(data / "posts.jsonl", "a") as f:
        for pid in (2 ** 64, -2 ** 63 - 1, 2 ** 63, "x" * 300):
            f.write(json.dumps({**good, "id": pid}) + "\n")
        f.write(json.dumps({**good, "id": "imported-1"}) + "\n")  # a string id is fine (imported data)
    read = read_posts(data)
    assert len(read.posts) == 13 and [e["line"] for e in read.errors] == [13, 14, 15, 16]
    assert "64-bit" in read.errors[0]["detail"]
    for args in (["--vocab"], ["--build", "--image-size", "16", "--workers", "1"]):
        out = run_cli(*args, "--data", str(data), "--quiet")
        assert out.returncode == 0, out.stderr
    report = json.loads((data / "reports" / "build_report.json").read_text())
    assert report["bad posts.jsonl lines"] == 4 and report["records per split"]


def test_scraper_never_writes_an_id_outside_64_bits(tmp_path):
    from fake_danbooru import FakeDanbooru, make_posts

    from alt_i2v.data.posts import PostsWriter, read_posts
    from alt_i2v.scraper import scrape

    posts = make_posts(4, extra_tags=["kc"])
    posts[0].id = 2 ** 70
    with FakeDanbooru(posts) as srv:
        r = scrape(tmp_path / "d", "kc", base_url=srv.base_url, rate=200.0, backoff=0.01, quiet=True)
    read = read_posts(tmp_path / "d")
    assert r.stored == 3 and len(read.posts) == 3 and read.errors == []
    assert any("64-bit" in n for n in r.notes)
    with PostsWriter(tmp_path / "d") as w, pytest.raises(ValueError, match="64-bit"):
        w.append({"id": 2 ** 64, "md5": "0" * 32, "file_ext": "png"})


def test_a_deeply_nested_line_is_one_bad_line_for_every_stage(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, n=10, seed=5, size=24)
    with open(data / "posts.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "a.png").write_bytes((data / json.loads(
        (data / "posts.jsonl").read_text().splitlines()[0])["file"]).read_bytes())
    for args in (["--vocab"], ["--build", "--image-size", "16", "--workers", "1"],
                 ["--import", str(tmp_path / "src")]):
        out = run_cli(*args, "--data", str(data), "--quiet")
        assert out.returncode == 0, (args, out.stderr[-500:])
    report = json.loads((data / "reports" / "build_report.json").read_text())
    assert report["posts_jsonl_errors"][0]["reason"] == "malformed JSON"


def test_torn_tail_repair_keeps_a_valid_last_line_and_reports_a_cut_one(tmp_path):
    from alt_i2v.data.posts import PostsWriter, read_posts

    posts = tmp_path / "posts.jsonl"
    one = {"id": 1, "md5": "0" * 32, "file_ext": "png"}
    posts.write_text(json.dumps(one))  # a one-line file without its newline: a valid post
    with PostsWriter(tmp_path) as w:
        assert w.repaired == 0 and w.removed_tail == b""
        w.append({**one, "id": 2})
    assert [p["id"] for p in read_posts(tmp_path).posts] == [1, 2]
    with open(posts, "a") as f:
        f.write(json.dumps({**one, "id": 3}) + "\n" + json.dumps({**one, "id": 4}))  # valid, unterminated
    with PostsWriter(tmp_path) as w:
        assert w.repaired == 0
    assert posts.read_bytes().endswith(b"\n")
    assert [p["id"] for p in read_posts(tmp_path).posts] == [1, 2, 3, 4]
    with open(posts, "a") as f:
        f.write('{"id": 5, "md5": "00')  # cut short by a crash: removed, and said so
    with pytest.warns(UserWarning, match="removed an unfinished last line"):
        w = PostsWriter(tmp_path)
    w.close()
    assert w.removed_tail == b'{"id": 5, "md5": "00' and w.repaired == len(w.removed_tail)
    assert [p["id"] for p in read_posts(tmp_path).posts] == [1, 2, 3, 4]


# 7. The Basic-auth token leaked --------------------------------------------------------------------------------


def test_every_form_of_the_credentials_is_scrubbed_from_messages_and_reports(tmp_path):
    import base64
    from urllib.parse import quote

    from fake_danbooru import FakeDanbooru, make_posts

    login, key = "alice", "K3y-s3cret"
    token = base64.b64encode(f"{login}:{key}".encode()).decode()
    forms = [login + ":" + key, key, token, quote(token, safe=""), quote("Basic " + token, safe="")]
    posts = make_posts(3, extra_tags=["kc"])
    with FakeDanbooru(posts, credentials=(login, key)) as srv:
        srv.add_fault("echo_auth", "/posts.json", times=10)
        env = {"DANBOORU_LOGIN": login, "DANBOORU_API_KEY": key, "PATH": "/usr/bin:/bin"}
        out = run_cli("--scrape", "--data", str(tmp_path / "d"), "--query", "kc", "--base-url", srv.base_url,
                      "--rate", "100", "--quiet", env={**__import__("os").environ, **env})
    assert out.returncode == 1 and "http_400" in out.stderr and "Authorization" in out.stderr, out.stderr
    texts = [out.stderr, out.stdout] + [f.read_text(errors="replace") for f in (tmp_path / "d").rglob("*")
                                        if f.is_file()]
    assert any("Authorization" in t for t in texts[2:])  # the report holds the (scrubbed) error
    for t in texts:
        for form in forms:
            assert form not in t, (form, t[:300])


# 8. The smaller ones -----------------------------------------------------------------------------------------


def test_import_of_a_missing_folder_fails_and_writes_nothing(tmp_path):
    out = run_cli("--import", str(tmp_path / "nonexistent"), "--data", str(tmp_path / "d"), "--quiet")
    assert out.returncode == 1 and "not a folder" in out.stderr
    assert not (tmp_path / "d" / "posts.jsonl").exists()


@pytest.mark.parametrize("args", [["--pred", "x.png", "--model", "m", "--batch-size", "0"],
                                  ["--build", "--data", "d", "--workers", "-1"],
                                  ["--train", "--data", "d", "--model", "m", "--batch-size", "-4"]])
def test_counts_below_their_least_value_are_usage_errors(args, capsys):
    from alt_i2v.cli import main

    assert main(args) == 2
    assert "must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), -3, float("inf"), "0.5", None])
def test_per_tag_thresholds_are_validated_like_the_global_one(bad, built_data, tmp_path_factory):
    import shutil

    from _inference_model import trained_model

    from alt_i2v.model.modeldir import ModelDir
    from alt_i2v.tagging.tagger import Tagger

    model = tmp_path_factory.mktemp("thr") / "model"
    shutil.copytree(trained_model(built_data, tmp_path_factory), model)
    doc = json.loads((model / "thresholds.json").read_text())
    doc["tags"][next(iter(doc["tags"]))] = bad
    (model / "thresholds.json").write_text(json.dumps(doc))  # json writes NaN / Infinity literally
    with pytest.raises(AltI2VError, match="threshold must be a number in"):
        ModelDir(model).read()
    with pytest.raises(AltI2VError, match="threshold must be a number in"):
        Tagger(model)


def test_max_pixels_is_capped_per_call_and_pillow_limit_never_changes(tmp_path):
    import struct
    import zlib

    from PIL import Image

    from alt_i2v.errors import ImageLoadError
    from alt_i2v.data.imaging import identify, load_image

    limit = Image.MAX_IMAGE_PIXELS
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(small)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")  # 400 Mpx declared, a few bytes sent
    try:
        assert load_image(small, 16, max_pixels=10 ** 30).shape == (16, 16, 3)  # config.json max_pixels: 1e30
        assert Image.MAX_IMAGE_PIXELS == limit  # the process-wide guard is untouched
        for call in (lambda: load_image(bomb, 16, max_pixels=10 ** 30), lambda: identify(bomb, 10 ** 30)):
            with pytest.raises(ImageLoadError) as err:
                call()
            assert err.value.reason == "too_large"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_import_takes_the_posts_lock_like_scrape(tmp_path):
    import fcntl

    from PIL import Image

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    Image.new("RGB", (12, 12), (200, 10, 10)).save(src / "a.png")
    data = tmp_path / "d"
    data.mkdir()
    with open(data / ".scrape.lock", "a+") as lock:  # held here, as a running --scrape or --import holds it
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        busy = run_cli("--import", str(tmp_path / "src"), "--data", str(data), "--quiet")
    assert busy.returncode == 1 and "another --scrape or --import" in busy.stderr, busy.stderr
    assert not (data / "posts.jsonl").exists()
    done = run_cli("--import", str(tmp_path / "src"), "--data", str(data), "--quiet")
    assert done.returncode == 0 and len((data / "posts.jsonl").read_text().splitlines()) == 1


def test_disk_full_and_interrupt_hints_name_resume_for_train(monkeypatch, capsys):
    import errno

    import alt_i2v.training.run
    from alt_i2v.cli import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(alt_i2v.training.run, "train", full)
    assert main(["--train", "--data", "d", "--model", "m"]) == 1
    assert "run the same command again with --resume" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(alt_i2v.training.run, "train", interrupted)
    assert main(["--train", "--data", "d", "--model", "m"]) == 1
    assert "with --resume to resume" in capsys.readouterr().err


# ------------------------------------------------------------------- issue 22: damaged model files

@pytest.mark.parametrize("content,says", [(b"", "empty (0 bytes)"), (b"\x00" * 5000, "not a Keras model file"),
                                          (None, "not a Keras model file"), ("fifo", "not a regular file (a FIFO)")])
def test_a_damaged_model_keras_is_named_with_what_is_wrong(tmp_path, content, says):
    """Case 17: a truncated, empty or random model.keras said "File not found" though the file exists."""
    import io
    import zipfile

    from alt_i2v.errors import AltI2VError
    from alt_i2v.model.modeldir import load_model

    file = tmp_path / "model.keras"
    if content is None:  # a real .keras archive cut in half
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("config.json", "{}")
            z.writestr("model.weights.h5", os.urandom(20000))
        file.write_bytes(buf.getvalue()[:10000])
    elif content == "fifo":
        os.mkfifo(file)
    else:
        file.write_bytes(content)
    with pytest.raises(AltI2VError) as e:
        load_model(tmp_path)
    assert str(file) in str(e.value) and says in str(e.value) and "File not found" not in str(e.value)


def test_a_binary_vocab_json_is_named_with_what_is_wrong(tmp_path):
    """Case 17: a binary vocab.json gave "unexpected UnicodeDecodeError" without naming the file."""
    from alt_i2v.data.vocab import Vocab
    from alt_i2v.errors import AltI2VError

    (tmp_path / "vocab.json").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    with pytest.raises(AltI2VError, match=r"vocab\.json: not a vocabulary: byte 0x89 at offset 0 is not UTF-8"):
        Vocab.load(tmp_path)
    (tmp_path / "vocab.json").write_text("[" * 100_000)
    with pytest.raises(AltI2VError, match=r"vocab\.json: not valid JSON"):
        Vocab.load(tmp_path)
    (tmp_path / "vocab.json").write_text('{"tags": 3}')
    with pytest.raises(AltI2VError, match=r".+vocab\.json: vocab\.json is not a vocabulary"):
        Vocab.load(tmp_path)
