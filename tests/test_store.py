"""The LevelDB store: round trip with the loader, hostile images, mismatches, splits, kill and resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alt_i2v.data.posts import read_posts
from alt_i2v.errors import AltI2VError, StoreMismatchError
from alt_i2v.data.imaging import load_image
from alt_i2v.store import SPLITS, build_store, multi_hot, open_store, split_of, unpack
from alt_i2v.data.vocab import Vocab, build_vocab
from conftest import jpeg_dataset, rerun_killed_build
from test_imaging import png_header_only


def build(data, **kw):
    kw.setdefault("image_size", 32)
    kw.setdefault("workers", 1)
    return build_store(data, quiet=True, **kw)


def test_loader_and_store_agree_pixel_for_pixel(dataset_dir):
    build_vocab(dataset_dir)
    build(dataset_dir, workers=2, resize="pad")
    posts = read_posts(dataset_dir).posts
    with open_store(dataset_dir) as s:
        assert s.count() == len(posts)
        for p in posts[:20]:
            rec = s.get(p["id"])
            np.testing.assert_array_equal(rec["image"], load_image(dataset_dir / p["file"], 32, "pad"))
            assert rec["split"] == split_of(p["id"]) and rec["id"] == p["id"]


def add_post(data, pid, data_bytes=None, ext="png", file=None, tags=("red",)):
    import hashlib

    md5 = hashlib.md5(data_bytes or str(pid).encode()).hexdigest()
    rel = file or f"images/{md5[:2]}/{md5}.{ext}"
    if data_bytes is not None:
        path = data / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data_bytes)
    with open(data / "posts.jsonl", "a") as f:
        f.write(json.dumps({"id": pid, "md5": md5, "file_ext": ext, "file": rel, "tags": {"general": list(tags)}})
                + "\n")


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_hostile_images_are_stored_or_skipped_with_their_reason(dataset_dir):
    rgb = Image.new("RGB", (40, 30), (250, 0, 0))
    good = {
        "cmyk": (encode(rgb.convert("CMYK"), "JPEG"), "jpg"),
        "rgba": (encode(Image.new("RGBA", (30, 30), (0, 0, 0, 0)), "PNG"), "png"),
        "palette": (encode(rgb.convert("P"), "GIF"), "gif"),
        "grey16": (encode(Image.fromarray(np.full((9, 9), 900, np.uint16)), "PNG"), "png"),
        "png_named_jpg": (encode(rgb, "PNG"), "jpg"),
        "tiny": (encode(Image.new("RGB", (1, 1)), "PNG"), "png"),
        "extreme": (encode(Image.new("RGB", (4000, 2)), "PNG"), "png"),
    }
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    bad = {
        "truncated": (jpeg[: len(jpeg) // 2], "jpg", "truncated"),
        "empty": (b"", "jpg", "empty"),
        "random": (os.urandom(3000), "jpg", "not_an_image"),
        "html": (b"<!doctype html><title>Just a moment...</title>", "jpg", "html"),
        "bomb": (png_header_only(30000, 30000), "png", "too_large"),
    }
    for name, (blob, ext) in good.items():
        add_post(dataset_dir, f"good-{name}", blob, ext)
    for name, (blob, ext, _) in bad.items():
        add_post(dataset_dir, f"bad-{name}", blob + name.encode() * (blob != b"") if name == "random" else blob, ext)
    add_post(dataset_dir, "bad-missing", None, "png")
    with open(dataset_dir / "posts.jsonl", "a") as f:
        f.write('{"id": "evil", "file": "../../../etc/passwd", "tags": {}}\n{broken\n')
    build_vocab(dataset_dir)
    result = build(dataset_dir, workers=2)
    reasons = {s["id"]: s["reason"] for s in result.skipped}
    assert reasons == {**{f"bad-{k}": v[2] for k, v in bad.items()}, "bad-missing": "missing"}
    with open_store(dataset_dir) as s:
        for name in good:
            assert s.get(f"good-{name}")["image"].shape == (32, 32, 3)
        assert s.count() == 120 + len(good)
    report = json.loads((dataset_dir / "reports" / "build_report.json").read_text())
    assert {p["id"]: p["reason"] for p in report["skipped_posts"]} == reasons
    assert [e["reason"] for e in report["posts_jsonl_errors"]] == ["unsafe file path", "malformed JSON"]


def test_reader_api(built_data):
    with open_store(built_data) as s:
        counts = s.counts()
        assert sum(counts.values()) == 400 and all(counts[x] > 0 for x in SPLITS)
        keys = s.ids("val")
        assert len(keys) == counts["val"]
        x, labels = s.get_batch(keys[:7])
        assert x.shape == (7, 32, 32, 3) and x.dtype == np.uint8
        ikeys, ilabels = s.index("val")
        assert ikeys == keys and ilabels[:7] == labels
        y = multi_hot(labels, s.num_tags)
        assert y.shape == (7, s.num_tags) and y.sum() == sum(len(lab) for lab in labels)
        buf = np.empty((16, 32, 32, 3), np.uint8)
        x2, _ = s.get_batch(keys[:5], out=buf)
        np.testing.assert_array_equal(x2, x[:5])


def test_records_are_msgpack_not_pickle(built_data):
    import plyvel

    s = open_store(built_data)
    path = s.path
    s.close()
    db = plyvel.DB(str(path))
    try:
        key, raw = next(iter(db.iterator(prefix=b"r/")))
        assert not raw.startswith(b"\x80")  # no pickle protocol header
        rec = unpack(raw)
        assert set(rec) == {"id", "image", "labels", "split"} and rec["image"].dtype == np.uint8
        assert unpack(db.get(b"__meta__"))["version"] == 1
    finally:
        db.close()


def test_mismatches_are_clear_errors(dataset_dir):
    build_vocab(dataset_dir)
    build(dataset_dir)
    other = Vocab(tags=[{"name": "something_else", "category": "general", "count": 1}])
    with pytest.raises(StoreMismatchError, match="different vocabulary"):
        open_store(dataset_dir, vocab=other)
    with pytest.raises(StoreMismatchError, match="32px, not 64px"):
        open_store(dataset_dir, image_size=64)
    with pytest.raises(StoreMismatchError, match="32px, not 48px"):
        build(dataset_dir, image_size=48)
    with pytest.raises(StoreMismatchError, match="resize mode"):
        build(dataset_dir, resize="crop")
    build_vocab(dataset_dir, size=3)  # the vocabulary changed under the store
    with pytest.raises(StoreMismatchError, match="rebuild"):
        build(dataset_dir)
    assert build(dataset_dir, rebuild=True).stored == 120


def test_missing_store_and_lock_errors(tmp_path, built_data):
    with pytest.raises(AltI2VError, match="--build"):
        open_store(tmp_path / "nothing")
    with open_store(built_data):
        with pytest.raises(AltI2VError, match="in use by another process"):
            open_store(built_data)


def test_split_is_a_stable_function_of_the_id():
    assert [split_of(i) for i in range(50)] == [split_of(i) for i in range(50)]
    share = [split_of(i) for i in range(20000)]
    assert abs(share.count("val") / 20000 - 0.1) < 0.01 and abs(share.count("test") / 20000 - 0.1) < 0.01


def test_rerun_does_nothing_new_and_prunes_removed_posts(dataset_dir):
    build_vocab(dataset_dir)
    first = build(dataset_dir)
    with open_store(dataset_dir) as s:
        before = {k: s.get(k)["split"] for k in s.ids()}
    again = build(dataset_dir)
    assert first.stored == 120 and again.stored == 0 and again.already == 120
    lines = (dataset_dir / "posts.jsonl").read_text().splitlines()
    (dataset_dir / "posts.jsonl").write_text("\n".join(lines[:-10]) + "\n")
    pruned = build(dataset_dir)
    assert pruned.removed == 10
    with open_store(dataset_dir) as s:
        assert s.count() == 110 and all(before[k] == s.get(k)["split"] for k in s.ids())
        assert sum(s.counts().values()) == len(s.ids())


def test_build_killed_with_sigkill_resumes_to_a_complete_store(tmp_path):
    data = jpeg_dataset(tmp_path / "data", 400, seed=5)
    cmd = [sys.executable, "-m", "alt_i2v", "--build", "--data", str(data), "--workers", "1", "--quiet",
           "--image-size", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    store = data / "store"
    while time.time() < deadline and not any(p.suffix == ".log" and p.stat().st_size > 1_000_000
                                             for p in store.glob("*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun_killed_build(data, cmd, 400, timeout=120)
    with open_store(data) as s:
        assert s.count() == 400 and len(s.ids()) == 400
        x, _ = s.get_batch(s.ids()[:400])
        assert x.shape == (400, 64, 64, 3)


def test_store_fixture_has_expected_labels(built_data):
    vocab = Vocab.load(built_data)
    with open_store(built_data, vocab=vocab, image_size=32) as s:
        _, labels = s.index()
        assert all(labels) and max(max(lab) for lab in labels) < len(vocab)
        assert s.meta["vocab_sha256"] == vocab.sha256 and Path(s.path).name == "store"
