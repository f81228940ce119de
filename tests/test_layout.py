"""layout.py: every file of DATA and MODEL named once, and the one reader and checker of a model directory."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest

from alt_i2v.errors import AltI2VError, UnsafePathError
from alt_i2v.data.layout import DataDir, store_matches
from alt_i2v.model.modeldir import ModelDir
from alt_i2v.data.vocab import Vocab


def _model_dir(tmp_path, *, config=None, thresholds=None):
    """A model directory's metadata files (no model.keras: reading the metadata does not need Keras)."""
    root = tmp_path / "model"
    root.mkdir()
    vocab = Vocab(tags=[{"name": "a", "category": "general", "count": 3},
                        {"name": "b", "category": "character", "count": 2}])
    vocab.save(root / "vocab.json")
    cfg = {"model": {"image_size": 40}, "image": {"image_size": 32, "resize": "crop"},
           "vocab_sha256": vocab.sha256} if config is None else config
    (root / "config.json").write_text(json.dumps(cfg))
    if thresholds is not None:
        (root / "thresholds.json").write_text(json.dumps(thresholds))
    return ModelDir(root), vocab


def test_model_dir_reads_config_vocab_image_and_thresholds(tmp_path):
    md, vocab = _model_dir(tmp_path, thresholds={"global": 0.4, "tags": {"a": 0.3}})
    files = md.read()
    assert files.vocab.names == ["a", "b"] and files.image.image_size == 32 and files.image.resize == "crop"
    assert files.thresholds["global"] == 0.4 and files.thresholds["tags"] == {"a": 0.3}
    assert md.model_file.name == "model.keras" and md.thresholds_file.name == "thresholds.json"


def test_model_dir_image_settings_fall_back_to_the_model_size_once(tmp_path):
    md, vocab = _model_dir(tmp_path, config={"model": {"image_size": 40}, "vocab_sha256": None},
                           thresholds={"global": 0.5, "tags": {}})
    image = md.read().image
    assert image.image_size == 40 and image.resize == "pad"
    (md.root / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(AltI2VError, match="no image size"):
        md.read()


def test_model_dir_refuses_what_does_not_belong_together(tmp_path):
    with pytest.raises(AltI2VError, match="no such model directory"):
        ModelDir(tmp_path / "none").read()
    md, vocab = _model_dir(tmp_path, thresholds={"global": 0.5, "tags": {}})
    cfg = json.loads(md.config_file.read_text())
    md.config_file.write_text(json.dumps({**cfg, "vocab_sha256": "0" * 64}))
    with pytest.raises(AltI2VError, match="vocab.json does not match"):
        md.read()
    md.config_file.write_text("{not json")
    with pytest.raises(AltI2VError, match="damaged model configuration"):
        md.read()
    md.config_file.unlink()
    with pytest.raises(AltI2VError, match="missing model configuration"):
        md.read()
    assert md.read_config(required=False) is None


@pytest.mark.parametrize("doc, match", [({"global": 1.5, "tags": {}}, "global"),
                                        ({"global": 0.5, "tags": {"a": "x"}}, "'a'"),
                                        ({"global": 0.5, "tags": [0.1]}, "'tags' must map")])
def test_thresholds_are_checked_when_read(tmp_path, doc, match):
    md, _ = _model_dir(tmp_path, thresholds=doc)
    with pytest.raises(AltI2VError, match=match):
        md.read()


def test_missing_thresholds_warn_and_read_as_none(tmp_path):
    md, _ = _model_dir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert md.read().thresholds is None
    assert any("thresholds.json" in str(w.message) for w in caught)
    assert not md.is_finished()


def test_data_dir_saves_bytes_by_md5_once(tmp_path):
    dd = DataDir(tmp_path / "data")
    data = b"\x89PNG fake bytes"
    md5, rel = dd.save_image(data, "PNG")
    assert md5 == hashlib.md5(data).hexdigest() and rel == f"images/{md5[:2]}/{md5}.png"
    path = dd.image_path(rel)
    assert path.read_bytes() == data
    stamp = path.stat().st_mtime_ns
    assert dd.save_image(data, "png") == (md5, rel) and path.stat().st_mtime_ns == stamp  # kept, not rewritten
    with pytest.raises(UnsafePathError):
        dd.image_path("../posts.jsonl")
    assert dd.posts.name == "posts.jsonl" and dd.store.name == "store" and dd.report("x").name == "x.json"


def test_store_matches_compares_size_and_resize(built_data):
    from alt_i2v.config import ImageConfig
    from alt_i2v.store import open_store

    with open_store(built_data) as store:  # a real 32px padded store
        assert store_matches(ImageConfig(image_size=32), store)
        assert not store_matches(ImageConfig(image_size=32, resize="crop"), store)
        assert not store_matches(ImageConfig(image_size=48), store)
