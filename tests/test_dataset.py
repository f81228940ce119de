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


# ------------------------------------------------------------------- issue 22: hostile names and captions

def test_import_skips_a_name_that_is_not_utf8_imports_the_rest_and_leaves_no_orphan(tmp_path):
    """Case 4: a non-UTF-8 file or class-folder name stopped --import ("unexpected UnicodeEncodeError")
    after copying images posts.jsonl never named."""
    src = tmp_path / "src"
    for i in range(30):
        make_image(src / "cat" / f"a{i}.png", (i + 10, 0, 0))
        make_image(src / "dog" / f"b{i}.png", (0, i + 10, 0))
    make_image(src / "cat" / os.fsdecode(b"caf\xe9.png"), (1, 2, 3))
    make_image(src / os.fsdecode(b"\xff\xfeclass") / "c.png", (4, 5, 6))
    data = tmp_path / "data"
    result = import_folder(src, data, mode="folders", quiet=True)
    assert result.added == 60 and sorted(s["reason"] for s in result.skipped) == ["name not UTF-8"] * 2
    assert sorted(s["path"] for s in result.skipped) == ["\\xff\\xfeclass/c.png", "cat/caf\\xe9.png"]
    posts = read_posts(data).posts
    named = {p["file"] for p in posts}
    on_disk = {str(p.relative_to(data)) for p in (data / "images").rglob("*") if p.is_file()}
    assert on_disk == named and len(named) == 60  # every copied image is a post: no orphan
    report = json.loads((data / "reports" / "import_report.json").read_text(encoding="utf-8"))
    assert report["skipped"] == 2
    again = import_folder(src, data, mode="folders", quiet=True)
    assert again.added == 0 and again.already_present == 60


def test_captions_are_read_strictly_and_bad_tags_refused_with_a_count(tmp_path):
    """Case 16: random bytes, NULs, a BOM or a 100,000-character "tag" became tags ("\\ufeff1girl")."""
    src = tmp_path / "src"
    make_image(src / "bom.png", (1, 1, 1))
    (src / "bom.txt").write_bytes(b"\xef\xbb\xbf1girl, smile")
    make_image(src / "nul.png", (2, 2, 2))
    (src / "nul.txt").write_bytes(b"solo, bad\x00tag, " + b"x" * 100_000 + b", a\x1bb")
    make_image(src / "random.png", (3, 3, 3))
    (src / "random.txt").write_bytes(bytes(range(128, 256)) * 4)
    make_image(src / "all_bad.png", (4, 4, 4))
    (src / "all_bad.txt").write_bytes(b"\x00\x01\x02")
    data = tmp_path / "data"
    result = import_folder(src, data, mode="captions", quiet=True)
    tags = {p["original_path"]: p["tags"]["general"] for p in read_posts(data).posts}
    assert tags == {"bom.png": ["1girl", "smile"], "nul.png": ["solo"]}
    reasons = {s["path"]: (s["reason"], s["detail"]) for s in result.skipped}
    assert reasons["random.png"][0] == "bad caption" and "0x80 at offset 0 is not UTF-8" in reasons["random.png"][1]
    assert reasons["all_bad.png"][0] == "no valid tag"
    assert result.refused_tags == 4  # bad\x00tag, the long one, a\x1bb, \x00\x01\x02
    report = json.loads((data / "reports" / "import_report.json").read_text(encoding="utf-8"))
    assert report["refused tags"].startswith("4 (control characters or over 200 characters")
    assert parse_tags("\ufeffa, b\u200bc, d") == ["a", "d"]
