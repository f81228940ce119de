"""posts.jsonl reading/appending and folder import: bad lines reported, nothing outside DATA, no loss."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from alt_i2v.data.posts import PostsWriter, import_folder, read_posts
from alt_i2v.data.tags import parse_tags
from conftest import make_dataset

MD5 = "0f343b0931126a20f133d67c2b018a3b"


def write_lines(data_dir, lines):
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "posts.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def post(i, **kw):
    return {"id": i, "md5": MD5, "file_ext": "jpg", "tags": {"general": ["smile"]}, **kw}


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    write_lines(tmp_path, [post(1), "{not json", "[1, 2]", post(2), {"md5": MD5, "file_ext": "jpg"},
                           post(3, tags=7)])
    got = read_posts(tmp_path)
    assert [p["id"] for p in got.posts] == [1, 2]
    assert [(e["line"], e["reason"]) for e in got.errors] == [
        (2, "malformed JSON"), (3, "invalid post"), (5, "invalid post"), (6, "invalid post")]


def test_duplicate_ids_keep_the_first_and_are_counted(tmp_path):
    write_lines(tmp_path, [post(1, score=1), post(2), post(1, score=99), post("1")])
    got = read_posts(tmp_path)
    assert [(p["id"], p.get("score")) for p in got.posts] == [(1, 1), (2, None), ("1", None)]
    assert got.duplicates == [{"line": 3, "id": 1}]


@pytest.mark.parametrize("bad", [
    "../outside.jpg", "/etc/passwd", "images/../posts.jsonl", "images/../../x.jpg", "vocab.json",
    "C:/windows/x.jpg", "images/ab/\x00.jpg",
])
def test_file_paths_outside_images_are_rejected(tmp_path, bad):
    write_lines(tmp_path, [{"id": 1, "file": bad, "tags": {}}, post(2)])
    got = read_posts(tmp_path)
    assert [p["id"] for p in got.posts] == [2]
    assert got.errors[0]["line"] == 1 and got.errors[0]["reason"] in ("unsafe file path", "invalid post")


def test_symlink_escaping_images_is_rejected(tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (tmp_path / "d" / "images").mkdir(parents=True)
    os.symlink(outside, tmp_path / "d" / "images" / "ab")
    write_lines(tmp_path / "d", [{"id": 1, "file": "images/ab/x.jpg", "tags": {}}])
    assert read_posts(tmp_path / "d").errors[0]["reason"] == "unsafe file path"


def test_bad_md5_or_extension_is_rejected(tmp_path):
    write_lines(tmp_path, [post(1, md5="../../etc"), post(2, file_ext="sh"), post(3)])
    got = read_posts(tmp_path)
    assert [p["id"] for p in got.posts] == [3] and len(got.errors) == 2


def test_posts_are_normalised(tmp_path):
    write_lines(tmp_path, [post(1, tags="Long_Hair smile smile", rating="Explicit", extra={"kept": True})])
    p = read_posts(tmp_path).posts[0]
    assert p["file"] == f"images/0f/{MD5}.jpg"
    assert p["tags"] == {"general": ["long_hair", "smile"]} and p["rating"] == "e" and p["extra"] == {"kept": True}


def test_writer_cuts_a_torn_last_line_and_appends_whole_lines(tmp_path):
    write_lines(tmp_path, [post(1)])
    with open(tmp_path / "posts.jsonl", "ab") as f:
        f.write(b'{"id": 2, "md5": "0f3')  # a crash mid-write
    assert read_posts(tmp_path).errors[0]["reason"] == "torn last line"
    with PostsWriter(tmp_path) as w:
        assert w.repaired > 0
        w.append(post(3))
    got = read_posts(tmp_path)
    assert [p["id"] for p in got.posts] == [1, 3] and got.errors == []


def make_image(path, color=(255, 0, 0), size=(24, 24), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


def test_import_class_folders_and_rerun_adds_only_new(tmp_path):
    src = tmp_path / "src"
    make_image(src / "Cat Ears" / "a.png", (255, 0, 0))
    make_image(src / "Cat Ears" / "sub" / "b.jpg", (0, 255, 0))
    make_image(src / "dog" / "c.webp", (0, 0, 255))
    make_image(src / "dog" / "same_as_a.png", (255, 0, 0))  # identical bytes to a.png: merged, two tags
    make_image(src / "loose.png", (9, 9, 9))
    (src / "dog" / "broken.jpg").write_bytes(b"<html>blocked</html>")
    data = tmp_path / "data"
    result = import_folder(src, data, mode="auto", quiet=True)
    assert result.mode == "folders" and result.added == 3 and result.merged_duplicates == 1
    assert sorted(s["reason"] for s in result.skipped) == ["html", "not in a class folder"]
    posts = {p["original_path"]: p for p in read_posts(data).posts}
    merged = posts[os.path.join("Cat Ears", "a.png")]
    assert merged["tags"]["general"] == ["cat_ears", "dog"]
    for p in posts.values():
        assert (data / p["file"]).is_file() and p["file"] == f"images/{p['md5'][:2]}/{p['md5']}.{p['file_ext']}"
    assert posts[os.path.join("dog", "c.webp")]["file_ext"] == "webp"

    make_image(src / "dog" / "new.png", (1, 2, 3))
    again = import_folder(src, data, quiet=True)
    assert again.added == 1 and again.already_present == 4  # files, the merged copy included
    assert len(read_posts(data).posts) == 4 and read_posts(data).duplicates == []
    assert (data / "reports" / "import_report.json").is_file()


def test_import_captions(tmp_path):
    src = tmp_path / "src"
    make_image(src / "x.png")
    (src / "x.txt").write_text("1girl, long hair, \\(cosplay\\), smile\n")
    make_image(src / "deep" / "y.jpg", (0, 0, 200))
    (src / "deep" / "y.txt").write_text("Solo,  blue background")
    make_image(src / "nocap.png", (5, 5, 5))
    result = import_folder(src, tmp_path / "data", quiet=True)
    assert result.mode == "captions" and result.added == 2
    assert [s["reason"] for s in result.skipped] == ["no caption file"]
    tags = sorted(tuple(p["tags"]["general"]) for p in read_posts(tmp_path / "data").posts)
    assert tags == [("1girl", "long_hair", "(cosplay)", "smile"), ("solo", "blue_background")]


def test_parse_caption_normalises():
    assert parse_tags("A B,  c\\(d\\) ,,\nE") == ["a_b", "c(d)", "e"]


def test_make_dataset_fixture_is_readable(tmp_path):
    make_dataset(tmp_path / "d", n=5)
    assert len(read_posts(tmp_path / "d").posts) == 5
