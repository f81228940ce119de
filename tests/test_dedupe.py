"""--dedupe: near-copies (resized, recompressed, cropped, flipped, recoloured) of pictures made here are
grouped against distinct pictures, parent_id links join groups, and --build keeps every group in one split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alt_i2v.cli import main
from alt_i2v.demo.copies import COPY_KINDS, copy_of, pair_scores, picture, write_copies_dataset
from alt_i2v.search.dedupe import find_groups, groups_of, signature


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    data = tmp_path_factory.mktemp("copies") / "data"
    truth = write_copies_dataset(data, originals=60, with_copies=20, parent_pairs=3, seed=1, size=160)
    return data, truth


def test_the_signature_sees_through_each_kind_of_copy():
    img = picture(7)
    sig, mirror = signature(img)
    assert sig.shape == (63,) and abs(float(np.linalg.norm(sig)) - 1) < 1e-5
    for kind in COPY_KINDS:
        other, other_mirror = signature(copy_of(img, kind))
        best = max(float(sig @ other), float(sig @ other_mirror))
        assert best >= 0.87, (kind, best)
    assert float(sig @ signature(copy_of(img, "flipped"))[1]) > 0.999  # mirroring is exact in the DCT
    assert max(float(sig @ signature(picture(s))[0]) for s in range(8, 20)) < 0.8
    from PIL import Image

    assert signature(Image.new("RGB", (50, 50), (9, 120, 200))) is None  # one colour: nothing to compare


def test_groups_are_the_connected_components():
    assert groups_of(6, [(0, 3), (3, 5), (1, 2)]) == [[0, 3, 5], [1, 2]]
    assert groups_of(3, []) == []


def test_dedupe_finds_the_near_copies_with_precision_and_recall(copies, capsys):
    data, truth = copies
    assert main(["--dedupe", "--data", str(data), "-q"]) == 0
    report = json.loads((data / "reports" / "dedupe.json").read_text())
    precision, recall = pair_scores(report["groups"], truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert report["method"] == "signature" and report["thresholds"]["min_cosine"] == 0.87
    assert report["parent_links"] == 3 and report["posts"] == 60 + 20 * 5 + 6
    sheets = sorted((data / "reports" / "dedupe").glob("group_*.jpg"))
    assert len(sheets) == len(report["groups"])
    from PIL import Image

    with Image.open(sheets[0]) as im:  # a row of thumbnails, one a member
        assert im.width >= len(report["groups"][0]) * 96


def test_a_build_after_dedupe_keeps_every_group_in_one_split(tmp_path):
    from alt_i2v.data.vocab import build_vocab
    from alt_i2v.store import Store, build_store

    data = tmp_path / "data"
    truth = write_copies_dataset(data, originals=40, with_copies=40, seed=2, size=64)
    build_vocab(data)

    def splits() -> dict:
        with Store(data) as store:
            return {int(k.decode()[1:]): s for s in ("train", "val", "test") for k in store.ids(s)}

    build_store(data, image_size=32, workers=1, quiet=True)
    before = splits()
    assert any(len({before[p] for p in g}) > 1 for g in truth)  # by id alone, groups straddle the splits
    assert main(["--dedupe", "--data", str(data), "-q"]) == 0
    result = build_store(data, image_size=32, workers=1, quiet=True)  # resumes: moves, re-encodes nothing
    after = splits()
    assert result.stored == 0 and result.moved > 0 and len(after) == len(before)
    groups = json.loads((data / "reports" / "dedupe.json").read_text())["groups"]
    assert all(len({after[p] for p in g}) == 1 for g in groups)
    with Store(data) as store:
        assert store.counts() == {s: sum(1 for v in after.values() if v == s) for s in ("train", "val", "test")}
        some = next(iter(groups))[1]
        assert store.get(f"i{some}")["split"] == after[some]  # the record's own split moved too


def test_dedupe_errors_are_clear(tmp_path, capsys):
    assert main(["--dedupe", "-q"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["--dedupe", "--data", str(tmp_path / "empty"), "-q"]) == 1
    assert "no posts" in capsys.readouterr().err


def test_scraped_posts_keep_their_danbooru_parent():
    from alt_i2v.scraper.danbooru import parse_api_post, post_record

    info = parse_api_post({"id": 12, "md5": "a" * 32, "file_ext": "png", "tag_string": "x", "parent_id": 7})
    assert post_record(info, "http://b", md5="a" * 32, ext="png")["parent_id"] == 7
    plain = parse_api_post({"id": 13, "md5": "b" * 32, "file_ext": "png", "tag_string": "x", "parent_id": None})
    assert "parent_id" not in post_record(plain, "http://b", md5="b" * 32, ext="png")
