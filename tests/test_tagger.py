"""Tagger / predict_tags / extract_embeddings and the --pred / --embed command lines, on a tiny model
trained once per session (tests/_inference_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _inference_model import categorised_model, png_bytes, shapes, trained_model, truncated_png
from alt_i2v.cli import main
from alt_i2v.errors import ImageLoadError, UsageError


@pytest.fixture(scope="session")
def model_dir(built_data, tmp_path_factory) -> Path:
    return trained_model(built_data, tmp_path_factory)


@pytest.fixture(scope="session")
def cat_model_dir(built_data, tmp_path_factory) -> Path:
    return categorised_model(built_data, tmp_path_factory)


@pytest.fixture(scope="session")
def tagger(model_dir):
    from alt_i2v.tagging.tagger import get_tagger

    return get_tagger(model_dir)


@pytest.fixture(scope="session")
def images():
    return shapes(6, seed=11)


@pytest.fixture
def folder(tmp_path, images) -> Path:
    d = tmp_path / "pics"
    d.mkdir()
    for i, img in enumerate(images[:4]):
        img.save(d / f"img{i}.png")
    (d / "broken.png").write_bytes(truncated_png(images[4]))
    (d / "notes.md").write_text("not an image, not listed")
    return d


def close(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_every_input_kind_gives_the_same_sorted_dict(tagger, images, tmp_path):
    img = images[0]
    path = tmp_path / "one.png"
    img.save(path)
    by_path = tagger.predict_tags(str(path), threshold=0.0)
    assert isinstance(by_path, dict) and set(by_path) == set(tagger.vocab.names)
    probs = list(by_path.values())
    assert probs == sorted(probs, reverse=True)
    for source in (path, img, np.asarray(img), png_bytes(img), bytearray(png_bytes(img))):
        assert close(tagger.predict_tags(source, threshold=0.0), by_path), type(source)


def test_a_list_gives_a_list_in_order(tagger, images, tmp_path):
    path = tmp_path / "a.png"
    images[1].save(path)
    batch = [str(path), images[2], np.asarray(images[3]), png_bytes(images[0])]
    out = tagger.predict_tags(batch, threshold=0.0)
    assert isinstance(out, list) and len(out) == 4
    singles = [tagger.predict_tags(x, threshold=0.0) for x in batch]
    assert all(close(a, b) for a, b in zip(out, singles))
    assert isinstance(tagger.predict_tags(tuple(batch[:2])), list)
    stacked = np.stack([np.asarray(im) for im in images[:3]])  # a 4-D array is a batch
    assert len(tagger.predict_tags(stacked)) == 3
    assert tagger.predict_tags([]) == []


def test_batch_boundaries_do_not_change_results(model_dir, images):
    from alt_i2v.tagging.tagger import Tagger

    small = Tagger(model_dir, batch_size=2, workers=2)
    big = Tagger(model_dir, batch_size=64, workers=1)
    a = small.predict_tags(images, threshold=0.0)
    b = big.predict_tags(images, threshold=0.0)
    assert all(close(x, y) for x, y in zip(a, b))
    assert np.allclose(small.embed(images), big.embed(images), atol=1e-5)


def test_calibrated_thresholds_are_the_default(tagger, model_dir, images):
    doc = json.loads((model_dir / "thresholds.json").read_text())
    per_tag = np.array([doc["tags"].get(n, doc["global"]) for n in tagger.vocab.names], dtype=np.float32)
    assert tagger.calibrated and np.allclose(tagger.thresholds, per_tag)
    probs = tagger.probabilities(images)
    for p, tags in zip(probs, tagger.predict_tags(images)):
        want = {n for n, v, t in zip(tagger.vocab.names, p, per_tag) if v >= t}
        assert set(tags) == want


def test_float_threshold_overrides_every_tag(tagger, images):
    probs = tagger.probabilities(images[0])
    cut = float(np.median(probs))
    tags = tagger.predict_tags(images[0], threshold=cut)
    assert set(tags) == {n for n, p in zip(tagger.vocab.names, probs) if p >= cut}
    assert tagger.predict_tags(images[0], threshold="0.0").keys() == set(tagger.vocab.names)
    with pytest.raises(UsageError):
        tagger.predict_tags(images[0], threshold=1.5)


def test_per_category_thresholds(cat_model_dir, images):
    from alt_i2v.tagging.tagger import Tagger

    t = Tagger(cat_model_dir)
    colours = {"red", "green", "blue"} & set(t.vocab.names)
    got = t.predict_tags(images[0], threshold={"character": 0.0, "copyright": 0.0, "general": 1.0})
    assert set(got) == colours
    got = t.predict_tags(images[0], threshold={"default": 0.0, "character": 1.0})
    assert "red" not in got and "green" not in got and "blue" in got
    cli_form = t.predict_tags(images[0], threshold="general=0,character=1,copyright=1")
    assert set(cli_form) == set(t.vocab.names) - colours
    calibrated = t.thresholds_for(None)
    only_general = t.thresholds_for({"general": 0.0})
    is_general = np.array([c == "general" for c in t.vocab.tag_categories])
    assert (only_general[is_general] == 0).all() and np.allclose(only_general[~is_general], calibrated[~is_general])
    with pytest.raises(UsageError, match="neither a category"):
        t.thresholds_for({"artist_typo": 0.3})


def test_top_k(tagger, images):
    all_tags = tagger.predict_tags(images[0], threshold=0.0)
    top = tagger.predict_tags(images[0], threshold=0.0, top_k=2)
    assert list(top) == list(all_tags)[:2]
    calibrated = tagger.predict_tags(images[0])
    assert list(tagger.predict_tags(images[0], top_k=1)) == list(calibrated)[:1]
    with pytest.raises(UsageError):
        tagger.predict_tags(images[0], top_k=0)


def test_a_bad_image_costs_only_itself(tagger, images, tmp_path):
    from alt_i2v.tagging.tagger import BatchImageError

    bad_file = tmp_path / "bad.png"
    bad_file.write_bytes(truncated_png(images[0]))
    batch = [images[0], str(bad_file), images[1], b"<html>blocked</html>", images[2]]
    with pytest.raises(BatchImageError) as info:
        tagger.predict_tags(batch, threshold=0.0)
    err = info.value
    assert [i for i, _ in err.failures] == [1, 3]
    assert "bad.png" in str(err) and "2 of 5" in str(err)
    assert err.failures[1][1].reason == "html"
    kept = [r for r in err.results if r is not None]
    assert len(kept) == 3 and close(kept[1], tagger.predict_tags(images[1], threshold=0.0))

    out = tagger.predict_tags(batch, threshold=0.0, errors="return")
    assert isinstance(out[1], ImageLoadError) and out[1].reason in ("truncated", "corrupt")
    assert isinstance(out[0], dict) and isinstance(out[4], dict)

    with pytest.raises(ImageLoadError, match="bad.png"):
        tagger.predict_tags(str(bad_file))
    emb = tagger.embed(batch, errors="return")
    assert np.isnan(emb[1]).all() and np.isfinite(emb[[0, 2, 4]]).all()
    with pytest.raises(BatchImageError):
        tagger.embed(batch)


def test_embeddings_are_normalised_float32(tagger, model_dir, images):
    from alt_i2v.tagging.tagger import extract_embeddings

    cfg = json.loads((model_dir / "config.json").read_text())
    one = tagger.embed(images[0])
    assert one.shape == (cfg["embedding_dim"],) and one.dtype == np.float32
    many = extract_embeddings(images[:4], model=model_dir)
    assert many.shape == (4, cfg["embedding_dim"]) and many.dtype == np.float32
    assert np.allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-5)
    assert np.allclose(many[0], one, atol=1e-6)
    assert np.allclose(tagger.embed(png_bytes(images[0])), one, atol=1e-6)


def test_module_functions_cache_the_last_tagger(model_dir, images):
    from alt_i2v.tagging import tagger as tg

    first = tg.get_tagger(model_dir)
    tg.predict_tags(images[0], model=model_dir)
    assert tg.get_tagger(model_dir) is first and tg.get_tagger() is first
    assert tg.predict_tags(images[0]) == tg.predict_tags(images[0], model=first)
    from alt_i2v import Tagger, extract_embeddings, predict_tags  # the package re-exports them

    assert Tagger is tg.Tagger and predict_tags is tg.predict_tags and extract_embeddings is tg.extract_embeddings


def test_prediction_sees_the_pixels_training_saw(tagger, built_data):
    """The store's record and the original file, loaded by the Tagger, give the same embedding."""
    from alt_i2v.data.posts import post_image_path, read_posts
    from alt_i2v.store import open_store

    post = read_posts(built_data).posts[0]
    with open_store(built_data) as store:
        record = store.get(post["id"])
    from_store = tagger.embed_arrays(record["image"][None])[0]
    from_file = tagger.embed(post_image_path(post, built_data))
    assert np.allclose(from_store, from_file, atol=1e-6)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    from alt_i2v.errors import AltI2VError
    from alt_i2v.tagging.tagger import Tagger

    with pytest.raises(AltI2VError, match="no such model directory"):
        Tagger(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(AltI2VError, match="config.json"):
        Tagger(tmp_path / "half")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_pred_json_keeps_the_good_images(model_dir, folder, capsys):
    rc = main(["--pred", str(folder), "--model", str(model_dir), "--format", "json", "--threshold", "0",
               "--top-k", "3", "--quiet"])
    assert rc == 1  # one image failed; the others are still printed
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [Path(x["file"]).name for x in lines] == ["broken.png", "img0.png", "img1.png", "img2.png", "img3.png"]
    assert "error" in lines[0] and lines[0]["reason"] in ("truncated", "corrupt")
    assert all(len(x["tags"]) == 3 for x in lines[1:])
    scores = list(lines[1]["tags"].values())
    assert scores == sorted(scores, reverse=True)


def test_cli_pred_text_and_caption_formats(model_dir, folder, capsys):
    one = str(folder / "img0.png")
    assert main(["--pred", one, "--model", str(model_dir), "--threshold", "0", "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == one and len(out) == 3 and out[1].strip().split()[0].startswith("0.")
    assert main(["--pred", one, "--model", str(model_dir), "--format", "caption", "--threshold", "0"]) == 0
    caption = capsys.readouterr().out.strip()
    assert len(caption.split(", ")) == 7 and "\t" not in caption
    # a folder: "file<TAB>caption" lines, a progress bar and a summary on stderr
    assert main(["--pred", str(folder), "--model", str(model_dir), "--format", "caption", "--threshold", "0"]) == 1
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.splitlines()]
    assert [Path(r[0]).name for r in rows] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert rows[0][1] == caption
    assert "tag: 100%" in captured.err and "failed : 1" in captured.err


def test_cli_pred_recursive_and_usage_errors(model_dir, folder, capsys):
    sub = folder / "sub"
    sub.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(sub / "deep.png")
    main(["--pred", str(folder), "--model", str(model_dir), "--format", "json", "-q"])
    assert "deep.png" not in capsys.readouterr().out
    main(["--pred", str(folder), "-r", "--model", str(model_dir), "--format", "json", "-q"])
    assert "deep.png" in capsys.readouterr().out
    assert main(["--pred", str(folder), "--model", str(model_dir), "--threshold", "x=y"]) == 2
    assert main(["--pred", str(folder)]) == 2  # no --model
    assert main(["--pred", str(folder), "--model", str(model_dir), "--caption-mode", "append"]) == 2
    assert main(["--pred", str(folder / "nothing_here"), "--model", str(model_dir), "-q"]) == 1


def test_cli_embed_writes_npy_and_ids(model_dir, folder, tagger, tmp_path):
    out = tmp_path / "emb.npy"
    rc = main(["--embed", str(folder), "--model", str(model_dir), "--out", str(out), "-q"])
    assert rc == 1  # broken.png is listed as failed, the rest is written
    emb = np.load(out, allow_pickle=False)
    doc = json.loads((tmp_path / "emb.ids.json").read_text())
    assert emb.shape == (4, tagger.embedding_dim) and emb.dtype == np.float32
    assert [Path(p).name for p in doc["ids"]] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert [Path(f["file"]).name for f in doc["failed"]] == ["broken.png"]
    assert np.allclose(emb, tagger.embed(doc["ids"]), atol=1e-6)


def test_many_files_decode_in_worker_processes_with_the_same_results(model_dir, images, tmp_path, monkeypatch):
    import alt_i2v.data.imaging
    import alt_i2v.tagging.tagger
    from alt_i2v.tagging.tagger import Tagger

    files = []
    for i in range(10):
        files.append(tmp_path / f"p{i}.png")
        images[i % 4].save(files[-1])
    files.insert(5, tmp_path / "broken.png")
    files[5].write_bytes(truncated_png(images[4]))
    files = [str(f) for f in files]
    by_threads = Tagger(model_dir, batch_size=4, workers=2).predict_tags(files, threshold=0.0, errors="return")
    used = []
    monkeypatch.setattr(alt_i2v.tagging.tagger, "PROCESS_DECODE_MIN", 8)
    monkeypatch.setattr(alt_i2v.tagging.tagger, "PROCESS_DECODE_WORKERS", 2)
    monkeypatch.setattr(alt_i2v.data.imaging.DecodePool, "close",
                        lambda self, close=alt_i2v.data.imaging.DecodePool.close: (used.append(self.processes), close(self)))
    by_procs = Tagger(model_dir, batch_size=4, workers=2).predict_tags(files, threshold=0.0, errors="return")
    assert used == [2]  # the files went through two decoding processes
    assert isinstance(by_procs[5], ImageLoadError) and by_procs[5].reason == by_threads[5].reason
    assert all(close(a, b) for i, (a, b) in enumerate(zip(by_threads, by_procs)) if i != 5)


def test_tiny_model_predicts_the_mean_over_each_picture_and_its_mirror_as_it_was_calibrated(
        model_dir, tagger, images, built_data, tmp_path):
    import shutil

    from alt_i2v.tagging.tagger import Tagger
    from alt_i2v.training.evaluation import evaluate

    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"]["tta"] == "flip" and tagger.tta == "flip"
    x = np.stack([np.asarray(img.resize((32, 32))) for img in images]).astype(np.uint8)
    plain = tagger.model.predict_on_batch(x)
    mirror = tagger.model.predict_on_batch(x[:, :, ::-1])
    assert np.abs(plain - mirror).max() > 1e-4  # the net alone tells a picture from its mirror image...
    got = tagger.probabilities_of_arrays(x)
    np.testing.assert_allclose(got, (plain + mirror) / 2, atol=1e-5)  # ...the model's answer averages both
    np.testing.assert_allclose(tagger.probabilities_of_arrays(x[:, :, ::-1]), got, atol=1e-5)
    emb = tagger.embed_arrays(x)
    np.testing.assert_allclose(tagger.embed_arrays(x[:, :, ::-1]), emb, atol=1e-5)
    # the thresholds were calibrated on the averaged probabilities: scoring the validation split again with
    # them reproduces the scores training recorded
    result = evaluate(built_data, model_dir, split="val", quiet=True)
    assert result.metrics["micro_f1"] == pytest.approx(config["val_scores"]["micro_f1"], abs=2e-6)
    # a model directory from before the option reads as calibrated on single pictures
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    config["model"].pop("tta")
    (old / "config.json").write_text(json.dumps(config))
    old_tagger = Tagger(old)
    assert old_tagger.tta == "none" and old_tagger.predictor is old_tagger.model
    np.testing.assert_allclose(old_tagger.probabilities_of_arrays(x), plain, atol=1e-5)
