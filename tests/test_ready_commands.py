"""A WD14 folder and a DeepDanbooru project (tiny, in their exact formats) through every command that takes
a model: --pred with the caption options, the Python API, --embed/--index/--similar, --screen, --explain,
--serve (JSON API and the page in a real Chromium), --evaluate alone and side by side with an alt-i2v model,
and --train --init-from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import requests

from _inference_model import trained_model
from _ready_models import (DD_TAGS, WD14_TAGS, dd_reference, make_deepdanbooru, make_wd14, pictures,
                           wd14_features, wd14_reference)
from alt_i2v.data.captions import caption_path, format_caption
from alt_i2v.cli import main
from alt_i2v.tagging.tagger import Tagger, clear_cache, predict_tags

WD14_CATS = {n: {9: "rating", 0: "general", 4: "character"}[c] for n, c in WD14_TAGS}
DD_CATS = {n: ("rating" if n.startswith("rating:") else "character" if n in ("hatsune_miku", "inazuma_(kancolle)")
               else "general") for n in DD_TAGS}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ready_cmd")
    return {"wd14": make_wd14(root / "wd14"), "dd": make_deepdanbooru(root / "dd")}


@pytest.fixture
def folder(tmp_path):
    pictures(tmp_path / "pics", n=4)
    return tmp_path / "pics"


def reference(family: str, model: Path, file: Path) -> dict[str, float]:
    """Every output of the hand-run reference, by tag name."""
    if family == "wd14":
        return dict(zip([n for n, _ in WD14_TAGS], wd14_reference(model / "model.onnx", file).tolist()))
    return dict(zip(DD_TAGS, dd_reference(model, file).tolist()))


def expected_tags(family: str, probs: dict[str, float], thr: dict[str, float] | None = None) -> dict[str, float]:
    """The tag list the family's thresholds give (ratings apart), most probable first."""
    cats = WD14_CATS if family == "wd14" else DD_CATS
    thr = thr or ({"general": 0.35, "character": 0.85} if family == "wd14" else {"general": 0.5, "character": 0.5})
    kept = {n: p for n, p in probs.items() if cats[n] != "rating" and p >= thr[cats[n]]}
    return dict(sorted(kept.items(), key=lambda kv: -kv[1]))


def same_tags(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# --pred and the Python API


@pytest.mark.parametrize("family", ["wd14", "dd"])
def test_pred_json_gives_the_reference_tags_and_ratings_apart(family, models, folder, capsys):
    model = models[family]
    assert main(["--pred", str(folder), "--model", str(model), "--format", "json", "-q"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4
    for line in lines:
        ref = reference(family, model, Path(line["file"]))
        same_tags(line["tags"], expected_tags(family, ref))
        cats = WD14_CATS if family == "wd14" else DD_CATS
        ratings = {n: p for n, p in ref.items() if cats[n] == "rating"}
        assert set(line["rating"]) == set(ratings)
        assert list(line["rating"])[0] == max(ratings, key=ratings.get)


@pytest.mark.parametrize("family", ["wd14", "dd"])
def test_pred_writes_captions_with_every_caption_option(family, models, folder, capsys):
    model = models[family]
    argv = ["--pred", str(folder), "--model", str(model), "--write-captions", "--tag-style", "underscores",
            "--no-escape", "--max-tags", "3", "--exclude", "red", "--threshold", "general=0.2,character=0.3", "-q"]
    assert main(argv) == 0
    cats = WD14_CATS if family == "wd14" else DD_CATS
    for file in sorted(folder.glob("p*.*")):
        if file.suffix == ".txt":
            continue
        ref = reference(family, model, file)
        want = expected_tags(family, ref, {"general": 0.2, "character": 0.3})
        line = format_caption(want, cats, style="underscores", escape=False, exclude=["red"], max_tags=3)
        assert caption_path(file).read_text() == line + "\n"
        assert not any(n in line.split(", ") for n, c in cats.items() if c == "rating")
    assert main(argv + ["--caption-mode", "append"]) == 0  # nothing new to append
    assert main(["--pred", str(folder / "p2.png"), "--model", str(model), "--format", "caption"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == format_caption(expected_tags(family, reference(family, model, folder / "p2.png")), cats)


def test_threshold_mcut_takes_the_largest_gap_per_category(models, folder):
    from alt_i2v.model.thresholds import mcut_threshold

    model = models["wd14"]
    file = folder / "p0.png"
    ref = reference("wd14", model, file)
    general = np.array([p for n, p in ref.items() if WD14_CATS[n] == "general"])
    character = np.array([p for n, p in ref.items() if WD14_CATS[n] == "character"])
    s = np.sort(general)[::-1]
    k = int(np.argmax(s[:-1] - s[1:]))
    assert mcut_threshold(general) == pytest.approx((s[k] + s[k + 1]) / 2)
    thr = {"general": mcut_threshold(general), "character": max(0.15, mcut_threshold(character))}
    same_tags(predict_tags(file, model=model, threshold="mcut"), expected_tags("wd14", ref, thr))
    same_tags(predict_tags(file, model=model, threshold="general=mcut,character=0.85"),
              expected_tags("wd14", ref, {"general": thr["general"], "character": 0.85}))
    clear_cache()


@pytest.mark.parametrize("family", ["wd14", "dd"])
def test_tagger_api_and_embeddings_are_the_head_input_l2_normalised(family, models, folder):
    model = models[family]
    tagger = Tagger(model)
    assert tagger.family == ("wd14" if family == "wd14" else "deepdanbooru")
    files = sorted(f for f in folder.iterdir() if f.suffix != ".txt")
    results = tagger.predict_tags(files)
    for f, r in zip(files, results):
        same_tags(r, expected_tags(family, reference(family, model, f)))
    emb = tagger.embed(files)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    if family == "wd14":
        feats = np.stack([wd14_features(model / "model.onnx", f) for f in files])
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        np.testing.assert_allclose(emb, feats, atol=1e-5)
    assert tagger.embedding_dim == 16
    small = Tagger(model, batch_size=3, workers=2)  # batches of 3 and 1, decoded on threads
    np.testing.assert_allclose(small.probabilities(files), tagger.probabilities(files), atol=1e-6)
    assert tagger.identity()["fingerprint"] == __import__("alt_i2v.fsutil", fromlist=["x"]).file_digest(
        tagger.weights_file)


# ---------------------------------------------------------------------------------------------------------
# --embed, --index, --similar, --screen, --explain


@pytest.mark.parametrize("family", ["wd14", "dd"])
def test_index_and_similar_find_the_image_itself_first(family, models, folder, tmp_path, capsys):
    model = models[family]
    index = tmp_path / "pics.index"
    assert main(["--index", "--model", str(model), "--images", str(folder), "--out", str(index), "-q"]) == 0
    capsys.readouterr()
    assert main(["--similar", str(folder / "p1.jpg"), "--index", str(index), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:3] == ["1", "1.0000", str(folder / "p1.jpg")]
    assert main(["--embed", str(folder), "--model", str(model), "--out", str(tmp_path / "e.npy"), "-q"]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (4, 16)


def test_screen_keeps_and_rejects_by_the_reference_probabilities(models, folder, tmp_path):
    model = models["wd14"]
    out = tmp_path / "sorted"
    assert main(["--screen", str(folder), "--model", str(model), "--keep", "red,1girl", "--reject", "explicit",
                 "--threshold", "0.5", "--out", str(out), "--dry-run", "-q"]) == 0
    rows = list(csv.DictReader(open(out / "screen_report.csv")))
    assert len(rows) == 4
    for row in rows:
        ref = reference("wd14", model, folder / row["file"])
        ok = ref["explicit"] < 0.5 and (ref["red"] >= 0.5 or ref["1girl"] >= 0.5)
        assert row["decision"] == ("ok" if ok else "ng"), (row, ref)


def test_explain_works_for_deepdanbooru_and_says_why_not_for_onnx(models, folder, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["--explain", str(folder / "p0.png"), "--model", str(models["dd"]), "--tag", "red",
                 "--out", str(out), "-q"]) == 0
    assert len(list(out.rglob("*.png"))) == 1
    assert main(["--explain", str(folder / "p0.png"), "--model", str(models["wd14"]), "--out", str(out)]) == 1
    assert "Grad-CAM needs gradients through a Keras model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# --serve


@pytest.mark.parametrize("family", ["wd14", "dd"])
def test_serve_json_api_tags_ratings_and_similar(family, models, folder, tmp_path):
    from alt_i2v.serve import create_app
    from alt_i2v.serve.server import running

    model = models[family]
    index = tmp_path / "pics.index"
    assert main(["--index", "--model", str(model), "--images", str(folder), "--out", str(index), "-q"]) == 0
    app = create_app(model, index)
    with running(app) as url:
        file = folder / "p3.png"
        r = requests.post(url + "api/tags", files={"file": ("p3.png", file.read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        doc = r.json()
        ref = reference(family, model, file)
        want = expected_tags(family, ref)
        assert doc["selected"] == list(want)
        assert set(doc["rating"]) == {n for n in ref if (WD14_CATS if family == "wd14" else DD_CATS)[n] == "rating"}
        assert not set(doc["rating"]) & set(doc["tags"])
        r = requests.post(url + "api/similar", files={"file": ("p3.png", file.read_bytes())}, timeout=60)
        assert r.json()["results"][0]["id"] == "p3.png"
        info = requests.get(url + "api/model", timeout=10).json()
        assert info["family"] == ("wd14" if family == "wd14" else "deepdanbooru")
        r = requests.post(url + "api/explain", files={"file": ("p3.png", file.read_bytes())}, timeout=60)
        assert r.status_code == (400 if family == "wd14" else 200), r.text


def test_the_page_tags_an_upload_with_a_wd14_model(models, folder, tmp_path):
    from _browser import BrowserMissing, chromium, upload
    from selenium.webdriver.common.by import By

    from alt_i2v.serve import create_app
    from alt_i2v.serve.server import running

    model = models["wd14"]
    file = folder / "p3.png"
    want = expected_tags("wd14", reference("wd14", model, file))
    with running(create_app(model)) as url:
        try:
            browser = chromium(tmp_path / "profile")
        except BrowserMissing as e:
            pytest.fail(str(e))
        try:
            upload(browser, url, file)
            shown = [e.get_attribute("data-tag") for e in browser.find_elements(By.CSS_SELECTOR, "#tags .tag")]
            assert sorted(shown) == sorted(want)
            assert "rating" in browser.find_element(By.ID, "rating").text.lower()
        finally:
            browser.quit()


# ---------------------------------------------------------------------------------------------------------
# --evaluate and the comparison, --train --init-from


def test_evaluate_one_ready_model_scores_shared_tags_and_lists_the_others(models, built_data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["--evaluate", "--data", str(built_data), "--model", str(models["wd14"]), "--out", str(out),
                 "-q"]) == 0
    rec = json.loads((out / "compare.json").read_text())
    (m,) = rec["models"]
    assert set(rec["common_tags"]) == {"red", "green", "blue", "circle", "square"}
    assert set(m["not_in_model"]) == {"yellow", "triangle"}
    assert 0.0 <= m["common"]["map"] <= 1.0


def test_comparison_of_three_families_on_the_same_split(models, built_data, tmp_path_factory, tmp_path):
    alt = trained_model(built_data, tmp_path_factory)
    out = tmp_path / "cmp"
    assert main(["--evaluate", "--data", str(built_data), "--model", str(alt), "--model", str(models["wd14"]),
                 "--model", str(models["dd"]), "--out", str(out), "-q"]) == 0
    rec = json.loads((out / "compare.json").read_text())
    assert [m["family"] for m in rec["models"]] == ["alt-i2v", "wd14", "deepdanbooru"]
    assert set(rec["common_tags"]) == {"red", "green", "blue", "circle"}
    assert all(set(r["ap"]) == {m["name"] for m in rec["models"]} for r in rec["per_tag_ap"])
    # the trained model learned these shapes; the random ready ones did not
    assert rec["models"][0]["common"]["map"] > rec["models"][1]["common"]["map"]
    assert "| tag | images |" in (out / "report.md").read_text()


def test_train_init_from_a_deepdanbooru_project(models, built_data, tmp_path):
    out = tmp_path / "tuned"
    assert main(["--train", "--data", str(built_data), "--model", str(out), "--init-from", str(models["dd"]),
                 "--epochs", "1", "--batch-size", "32", "-q"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["finished"] and cfg["init_from"]["tags_kept"] == 5 and cfg["init_from"]["tags_new"] == 2
    tagger = Tagger(out)
    assert tagger.family == "alt-i2v" and len(tagger.vocab) == 7
    probs = tagger.probabilities(sorted(built_data.glob("images/*/*.png"))[:3])
    assert probs.shape == (3, 7)
    assert tagger.embed(sorted(built_data.glob("images/*/*.png"))[0]).shape == (16,)


def test_pred_with_a_folder_of_no_family_names_what_each_needs(folder, tmp_path, capsys):
    empty = tmp_path / "downloads"
    empty.mkdir()
    assert main(["--pred", str(folder), "--model", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "model.onnx + selected_tags.csv" in err and "project.json, tags.txt, model-<model>.h5" in err


def test_export_says_a_ready_model_already_is_in_its_format(models, tmp_path, capsys):
    assert main(["--export", "--model", str(models["wd14"]), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "a WD14 folder already is ONNX" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_evaluate_function_points_a_ready_model_to_compare(models, built_data):
    from alt_i2v import evaluate
    from alt_i2v.errors import UsageError

    with pytest.raises(UsageError, match=r"is a wd14 model: .* alt_i2v.compare\(data, \[model\]\)"):
        evaluate(built_data, models["wd14"])
