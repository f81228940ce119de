"""Caption formatting and ``--pred DIR --write-captions`` in each mode, with existing caption files."""

from __future__ import annotations

from pathlib import Path

import pytest

from _inference_model import categorised_model, shapes, truncated_png
from alt_i2v.data.captions import (caption_conflicts, caption_path, format_caption, format_tag, merge_caption,
                              select_tags, write_caption)
from alt_i2v.cli import main

CATS = {"hatsune_miku": "character", "vocaloid": "copyright", "1girl": "general", "long_hair": "general",
        "smile": "general", "holding_(object)": "general", "^_^": "general", "rating:g": "rating"}
PROBS = {"1girl": 0.99, "long_hair": 0.9, "hatsune_miku": 0.7, "vocaloid": 0.8, "smile": 0.5,
         "holding_(object)": 0.6, "^_^": 0.4, "rating:g": 0.95}


def test_format_tag_styles_and_escapes():
    assert format_tag("long_hair") == "long hair"
    assert format_tag("long_hair", "underscores") == "long_hair"
    assert format_tag("holding_(object)") == "holding \\(object\\)"
    assert format_tag("holding_(object)", escape=False) == "holding (object)"
    assert format_tag("^_^") == "^_^"  # kaomoji keep their underscore


def test_caption_order_exclude_and_max_tags():
    assert select_tags(PROBS, CATS)[:3] == ["hatsune_miku", "vocaloid", "1girl"]
    assert format_caption(PROBS, CATS) == ("hatsune miku, vocaloid, 1girl, long hair, holding \\(object\\), smile, "
                                           "^_^, rating:g")
    assert format_caption(PROBS, CATS, exclude=["long hair", "rating:g"], style="underscores", escape=False) == \
        "hatsune_miku, vocaloid, 1girl, holding_(object), smile, ^_^"
    # max_tags keeps the most probable, then orders them by category
    assert select_tags(PROBS, CATS, max_tags=3) == ["1girl", "long_hair", "rating:g"]


def test_write_caption_modes_with_existing_files(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    cap = caption_path(img)
    assert cap == tmp_path / "a.txt"
    assert write_caption(img, ["1girl", "smile"], "skip") == "written"
    assert cap.read_text() == "1girl, smile\n"

    cap.write_text("my own caption, long_hair\n")
    assert write_caption(img, ["1girl"], "skip") == "skipped"
    assert cap.read_text() == "my own caption, long_hair\n"

    assert write_caption(img, ["long hair", "1girl", "smile"], "append") == "appended"
    assert cap.read_text() == "my own caption, long_hair, 1girl, smile\n"  # long hair == long_hair
    assert write_caption(img, ["smile"], "append") == "unchanged"

    assert write_caption(img, ["solo"], "overwrite") == "overwritten"
    assert cap.read_text() == "solo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.txt"]  # no temp files left


def test_merge_and_conflicts():
    assert merge_caption("a, b\nc", ["c", "d"]) == "a, b, c, d"
    assert merge_caption("holding \\(object\\)", ["holding_(object)"]) == "holding \\(object\\)"
    conflicts = caption_conflicts(["x/a.png", "x/a.jpg", "x/b.png"])
    assert list(conflicts.values()) == [["x/a.png", "x/a.jpg"]]


@pytest.fixture(scope="module")
def cat_model(built_data, tmp_path_factory) -> Path:
    return categorised_model(built_data, tmp_path_factory)


@pytest.fixture
def pics(tmp_path) -> Path:
    d = tmp_path / "pics"
    (d / "sub").mkdir(parents=True)
    imgs = shapes(4, seed=5)
    imgs[0].save(d / "new.png")
    imgs[1].save(d / "old.png")
    imgs[2].save(d / "sub" / "deep.png")
    (d / "old.txt").write_text("hand written, triangle\n")
    (d / "broken.png").write_bytes(truncated_png(imgs[3]))
    return d


def run(model: Path, folder: Path, *extra: str) -> int:
    return main(["--pred", str(folder), "--model", str(model), "--write-captions", "--threshold", "0", "-q", *extra])


def test_cli_captions_default_skip_keeps_existing(cat_model, pics, capsys):
    assert run(cat_model, pics) == 1  # broken.png failed; the others are captioned
    assert capsys.readouterr().out == ""  # captions only, nothing on stdout
    new = (pics / "new.txt").read_text().strip().split(", ")
    assert len(new) == 7
    # category order: character (red, green), copyright (blue), then general; probability inside each
    cats = ["character" if t in ("red", "green") else "copyright" if t == "blue" else "general" for t in new]
    assert cats == sorted(cats, key=["character", "copyright", "general"].index)
    assert (pics / "old.txt").read_text() == "hand written, triangle\n"
    assert not (pics / "broken.txt").exists() and not (pics / "sub" / "deep.txt").exists()


def test_cli_captions_append_overwrite_and_options(cat_model, pics):
    run(cat_model, pics, "--caption-mode", "append", "--exclude", "circle", "--recursive")
    old = (pics / "old.txt").read_text().strip().split(", ")
    assert old[:2] == ["hand written", "triangle"] and old.count("triangle") == 1
    assert "circle" not in old and len(old) == 1 + 6  # hand written + every tag but the excluded one
    assert (pics / "sub" / "deep.txt").exists()

    run(cat_model, pics, "--caption-mode", "overwrite", "--max-tags", "2", "--tag-style", "underscores")
    assert len((pics / "old.txt").read_text().strip().split(", ")) == 2
    assert "hand written" not in (pics / "old.txt").read_text()


def test_cli_caption_name_collisions_are_reported(cat_model, tmp_path, capsys):
    d = tmp_path / "twins"
    d.mkdir()
    img = shapes(1, seed=9)[0]
    img.save(d / "x.png")
    img.convert("RGB").save(d / "x.jpg", quality=90)
    img.save(d / "y.png")
    assert run(cat_model, d) == 1
    assert "share x.txt" in capsys.readouterr().err
    assert not (d / "x.txt").exists() and (d / "y.txt").exists()
