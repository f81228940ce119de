"""Vocabulary: top-N by count, deterministic order, categories and rating tags."""

from __future__ import annotations

import json

import pytest

from alt_i2v.errors import AltI2VError, UsageError
from alt_i2v.data.vocab import Vocab, build_vocab

MD5 = "0f343b0931126a20f133d67c2b018a3b"


def write_posts(data_dir, tag_sets):
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "posts.jsonl", "w") as f:
        for i, tags in enumerate(tag_sets):
            f.write(json.dumps({"id": i, "md5": MD5, "file_ext": "png", "tags": tags,
                                "rating": "gsqe"[i % 4]}) + "\n")


def test_order_is_count_then_name_and_size_cuts(tmp_path):
    write_posts(tmp_path, [{"general": ["b", "a", "c"]}, {"general": ["b", "a"]}, {"general": ["z", "b"]},
                           {"general": ["a", "a"]}])
    v = build_vocab(tmp_path, size=3)
    assert v.names == ["a", "b", "c"]  # a=3, b=3 (tie: by name), then c=1 before z=1
    assert [t["count"] for t in v.tags] == [3, 3, 1]
    assert Vocab.load(tmp_path).names == v.names and v.built_from == 4


def test_min_count_and_categories(tmp_path):
    write_posts(tmp_path, [{"general": ["x"], "character": ["hero_(game)"], "artist": ["someone"]},
                           {"general": ["x"], "character": ["hero_(game)"], "meta": ["highres"]},
                           {"general": ["y"]}])
    v = build_vocab(tmp_path, min_count=2)
    assert v.names == ["hero_(game)", "x"] and v.tag_categories == ["character", "general"]
    v = build_vocab(tmp_path, categories=["general", "artist", "rating"])
    assert "someone" in v.names and "rating:g" in v.names and "hero_(game)" not in v.names


def test_labels_of_a_post(tmp_path):
    write_posts(tmp_path, [{"general": ["a", "b"]}, {"general": ["a"]}])
    v = build_vocab(tmp_path, categories=["general", "rating"])
    assert v.labels({"tags": {"general": ["b", "unknown", "a"]}, "rating": "s"}) == sorted(
        [v.index["a"], v.index["b"], v.index["rating:s"]])


def test_fingerprint_follows_the_tag_order_not_the_counts():
    a = Vocab(tags=[{"name": "x", "count": 5}, {"name": "y", "count": 2}])
    b = Vocab(tags=[{"name": "x", "count": 50}, {"name": "y", "count": 20}])
    c = Vocab(tags=[{"name": "y", "count": 5}, {"name": "x", "count": 2}])
    assert a.sha256 == b.sha256 != c.sha256


def test_clear_errors(tmp_path):
    with pytest.raises(AltI2VError, match="--scrape or --import"):
        build_vocab(tmp_path)
    with pytest.raises(UsageError, match="unknown tag categories"):
        build_vocab(tmp_path, categories=["nope"])
    (tmp_path / "vocab.json").write_text("{oops")
    with pytest.raises(AltI2VError, match="not valid JSON"):
        Vocab.load(tmp_path)
