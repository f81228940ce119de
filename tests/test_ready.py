"""Ready models of other tools (WD14 ONNX folders, DeepDanbooru projects), built tiny in their exact formats:
recognised by their files, every missing file named, predictions equal to the families' own preprocessing
run by hand within 1e-5, embeddings = the tag head's input, L2-normalised."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _ready_models import (DD_TAGS, WD14_TAGS, dd_reference, make_deepdanbooru, make_wd14, pictures,
                           wd14_features, wd14_reference)
from alt_i2v.errors import AltI2VError
from alt_i2v.data.imaging import load_image
from alt_i2v.ready import detect, read_ready

_cache: dict[str, Path] = {}


@pytest.fixture(scope="module")
def wd14(tmp_path_factory) -> Path:
    return make_wd14(tmp_path_factory.mktemp("ready") / "wd14")


@pytest.fixture(scope="module")
def dd(tmp_path_factory) -> Path:
    return make_deepdanbooru(tmp_path_factory.mktemp("ready") / "dd")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return pictures(tmp_path_factory.mktemp("ready") / "pictures")


# ---------------------------------------------------------------------------------------------------------
# Recognition


def test_each_family_is_recognised_by_its_files(wd14, dd, tmp_path):
    assert detect(wd14) == "wd14"
    assert detect(dd) == "deepdanbooru"
    alt = tmp_path / "alt"
    alt.mkdir()
    for name in ("model.keras", "config.json", "vocab.json"):
        (alt / name).write_text("{}")
    assert detect(alt) == "alt-i2v"
    hub = tmp_path / "hub"  # a snapshot of a WD14 model page also has a timm config.json
    shutil.copytree(wd14, hub)
    (hub / "config.json").write_text('{"architecture": "vit_base_patch16_224"}')
    assert detect(hub) == "wd14"


@pytest.mark.parametrize("family,missing,says", [
    ("wd14", "model.onnx", "model.onnx is missing (the ONNX network"),
    ("wd14", "selected_tags.csv", "selected_tags.csv is missing (the tag list (columns tag_id,name,category,count)"),
    ("dd", "project.json", "project.json is missing (the project settings"),
    ("dd", "tags.txt", "tags.txt is missing (the tag list, one tag a line"),
    ("dd", "model-resnet_custom_v3.h5", "model-<model>.h5 is missing (the Keras weights"),
])
def test_each_missing_file_has_its_own_message(family, missing, says, wd14, dd, tmp_path):
    src = wd14 if family == "wd14" else dd
    folder = tmp_path / family
    shutil.copytree(src, folder)
    (folder / missing).unlink()
    with pytest.raises(AltI2VError) as e:
        detect(folder)
    label = "a WD14 tagger folder" if family == "wd14" else "a DeepDanbooru project"
    assert f"looks like {label}, but {says}" in str(e.value)
    assert str(e.value).count("is missing") == 1


def test_a_folder_of_none_names_what_each_family_needs(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(AltI2VError) as e:
        detect(tmp_path)
    msg = str(e.value)
    for name in ("model.keras, config.json, vocab.json", "model.onnx + selected_tags.csv",
                 "project.json, tags.txt, model-<model>.h5"):
        assert name in msg
    with pytest.raises(AltI2VError, match="no such model directory"):
        detect(tmp_path / "nowhere")


def test_project_json_naming_another_model_says_which_weights_are_there(dd, tmp_path):
    folder = tmp_path / "dd"
    shutil.copytree(dd, folder)
    doc = json.loads((folder / "project.json").read_text())
    (folder / "project.json").write_text(json.dumps({**doc, "model": "resnet_custom_v4"}))
    with pytest.raises(AltI2VError, match=r"model-resnet_custom_v4.h5: missing.*holds model-resnet_custom_v3.h5"):
        read_ready(folder)
    (folder / "project.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "image_width"}))
    with pytest.raises(AltI2VError, match="no image_width"):
        read_ready(folder)


def test_selected_tags_csv_is_checked(wd14, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(wd14, folder)
    csv_file = folder / "selected_tags.csv"
    csv_file.write_text("tag_id,label,category,count\n1,red,0,5\n")
    with pytest.raises(AltI2VError, match="no name column"):
        read_ready(folder)
    csv_file.write_text("tag_id,name,category,count\n1,red,7,5\n")
    with pytest.raises(AltI2VError, match="line 2: unknown category number 7"):
        read_ready(folder)
    csv_file.write_text("tag_id,name,category,count\n1,red,0,5\n2,blue,0,4\n")
    with pytest.raises(AltI2VError, match="gives 12 outputs per image but the tag list has 2 tags"):
        read_ready(folder).runner()


# ---------------------------------------------------------------------------------------------------------
# What each family's files say


def test_wd14_tags_categories_and_input_size_come_from_its_files(tmp_path):
    files = read_ready(make_wd14(tmp_path / "w", size=40))
    assert files.image.image_size == 40 and files.image.resize == "square"
    assert files.vocab.names == [n for n, _ in WD14_TAGS]
    cats = dict(zip(files.vocab.names, files.vocab.tag_categories))
    assert [n for n, c in cats.items() if c == "rating"] == ["general", "sensitive", "questionable", "explicit"]
    assert [n for n, c in cats.items() if c == "character"] == ["hatsune_miku", "inazuma_(kancolle)"]
    assert cats["red"] == "general" and files.vocab.tags[0]["count"] == 5000
    assert files.thresholds == {"general": 0.35, "character": 0.85}


def test_deepdanbooru_tags_categories_and_size_come_from_its_files(dd):
    files = read_ready(dd)
    assert files.image.image_size == 32 and files.image.resize == "pad"
    assert files.vocab.names == DD_TAGS
    cats = dict(zip(files.vocab.names, files.vocab.tag_categories))
    assert cats["hatsune_miku"] == "character" and cats["smile"] == "general"
    assert cats["rating:safe"] == cats["rating:explicit"] == "rating"
    assert files.thresholds == {"general": 0.5, "character": 0.5}


# ---------------------------------------------------------------------------------------------------------
# Predictions and embeddings against the families' own preprocessing run by hand


def test_wd14_predictions_equal_onnxruntime_on_its_documented_preprocessing(wd14, images):
    runner = read_ready(wd14).runner()
    batch = np.stack([load_image(p, 32, "square") for p in images])
    probs, emb = runner.run(batch)
    want = np.stack([wd14_reference(wd14 / "model.onnx", p) for p in images])
    assert probs.shape == (len(images), len(WD14_TAGS))
    np.testing.assert_allclose(probs, want, atol=1e-5, rtol=0)
    assert probs.std() > 0.05  # not a degenerate model: the comparison means something
    feats = np.stack([wd14_features(wd14 / "model.onnx", p) for p in images])
    np.testing.assert_allclose(emb, feats, atol=1e-5, rtol=1e-5)
    assert runner.embedding_dim == 16


def test_wd14_graph_with_a_fixed_batch_of_one_runs_batches(tmp_path, images):
    folder = make_wd14(tmp_path / "w1", batch=1)
    runner = read_ready(folder).runner()
    assert runner.fixed_batch == 1
    batch = np.stack([load_image(p, 32, "square") for p in images])
    probs, _ = runner.run(batch)
    np.testing.assert_allclose(probs, np.stack([wd14_reference(folder / "model.onnx", p) for p in images]),
                               atol=1e-5, rtol=0)


def test_deepdanbooru_predictions_equal_keras_on_its_documented_preprocessing(dd, images):
    model = read_ready(dd).runner()
    batch = np.stack([load_image(p, 32, "pad") for p in images])
    probs = np.asarray(model.predict_on_batch(batch))
    want = np.stack([dd_reference(dd, p) for p in images])
    np.testing.assert_allclose(probs, want, atol=1e-5, rtol=0)
    assert probs.std() > 0.01
    assert [l.name for l in model.layers][:4] == ["image", "preprocess", "trunk", "features"]
    assert model.layers[-1].name == "tags"


def test_onnxruntime_missing_names_the_extra(monkeypatch, wd14):
    real_import = builtins.__import__

    def fake(name, *args, **kw):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(AltI2VError, match=r"onnxruntime is not installed\): pip install 'alt-i2v\[wd14\]'"):
        read_ready(wd14)


def test_a_model_started_from_a_project_keeps_the_head_of_the_tags_it_knows(dd, images):
    from alt_i2v.ready.deepdanbooru import build_from_project, tags_kept

    names = ["smile", "brand_new_tag", "red", "hatsune_miku"]
    model = build_from_project(dd, len(names), 32, tag_names=names)
    batch = np.stack([load_image(p, 32, "pad") for p in images])
    probs = np.asarray(model.predict_on_batch(batch))
    want = np.stack([dd_reference(dd, p) for p in images])
    for j, name in enumerate(names):
        if name in DD_TAGS:  # kept: the very same output as the project's own network
            np.testing.assert_allclose(probs[:, j], want[:, DD_TAGS.index(name)], atol=1e-5, rtol=0)
    assert not np.allclose(probs[:, 1], want[:, 0], atol=1e-3)
    assert tags_kept(dd, names) == 3
    # another input size: the same trunk weights, built for 48px
    bigger = build_from_project(dd, len(names), 48, tag_names=names)
    assert bigger.input_shape == (None, 48, 48, 3)
    np.testing.assert_array_equal(bigger.get_layer("trunk").get_weights()[0],
                                  model.get_layer("trunk").get_weights()[0])


def test_cuda_is_asked_for_first_when_onnxruntime_has_it(monkeypatch):
    import onnxruntime

    from alt_i2v.ready.onnxrun import providers

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers() == ["CPUExecutionProvider"]
