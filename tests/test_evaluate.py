"""evaluate.py: metric values against hand-computed ones, threshold calibration, and the reports that
``evaluate`` writes (including top-1 and the confusion matrix for single-label data)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from alt_i2v.training.metrics import (average_precision, compute_metrics, confusion, is_single_label, most_wrong, prf_at,
                             roc_auc)
from alt_i2v.model.thresholds import thresholds_vector
from alt_i2v.training.thresholds import calibrate_thresholds


def test_auc_and_average_precision_match_hand_computed_values():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, s) == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ordered right
    assert average_precision(y[:, None], s[:, None])[0] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)  # ties
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))
    assert np.isnan(average_precision(np.zeros((3, 1)), np.ones((3, 1)))[0])


def test_precision_recall_f1_micro_and_macro():
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=np.float32)
    p = np.array([[0.9, 0.6], [0.2, 0.1], [0.1, 0.7], [0.8, 0.1]], dtype=np.float32)
    r = prf_at(y, p, 0.5)
    # tag 0: tp 1, fp 1, fn 1 -> P .5 R .5 F1 .5; tag 1: tp 1, fp 1, fn 0 -> P .5 R 1 F1 2/3
    assert r["micro_precision"] == pytest.approx(2 / 4) and r["micro_recall"] == pytest.approx(2 / 3)
    assert r["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert r["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["macro_recall"] == pytest.approx(0.75)
    per_tag = prf_at(y, p, np.array([0.15, 0.65]))  # per-tag thresholds
    assert per_tag["_f1"][0] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    assert per_tag["_f1"][1] == pytest.approx(1.0)


def _shifted_scores(rng, n, centers, noise=0.03):
    """Labels and scores where each tag separates well, but around its own point instead of 0.5."""
    t = len(centers)
    y = (rng.random((n, t)) < 0.3).astype(np.float32)
    s = centers[None, :] + np.where(y > 0, 1, -1) * rng.uniform(0.0, 0.15, (n, t)) + rng.normal(0, noise, (n, t))
    return y, np.clip(s, 0, 1).astype(np.float32)


def test_calibrated_thresholds_beat_half_in_macro_f1_on_held_out_data():
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.08, 0.35, 12)  # under-confident model: every tag's cut is well below 0.5
    y_val, p_val = _shifted_scores(rng, 600, centers)
    y_test, p_test = _shifted_scores(rng, 600, centers)
    names = [f"tag{i}" for i in range(12)]
    th = calibrate_thresholds(y_val, p_val, names)
    vec = thresholds_vector(th, names)
    assert np.abs(vec - centers).max() < 0.1  # found near each tag's true cut
    calibrated = prf_at(y_test, p_test, vec)["macro_f1"]
    at_half = prf_at(y_test, p_test, 0.5)["macro_f1"]
    assert calibrated > 0.85 and calibrated > at_half + 0.3
    assert prf_at(y_test, p_test, th["global"])["micro_f1"] > prf_at(y_test, p_test, 0.5)["micro_f1"]


def test_calibration_record_and_fallback_for_rare_tags():
    rng = np.random.default_rng(1)
    y, p = _shifted_scores(rng, 300, np.array([0.2, 0.3, 0.7]))
    y[:, 2] = 0
    y[:3, 2] = 1  # only 3 positives: below min_positives -> global threshold
    th = calibrate_thresholds(y, p, ["a", "b", "rare"], min_positives=5)
    assert set(th) >= {"version", "global", "min_positives", "method", "tags"}
    assert th["version"] == 1 and th["method"] == "max_f1" and th["min_positives"] == 5
    assert list(th["tags"]) == ["a", "b", "rare"]
    assert th["tags"]["rare"] == th["global"] and th["tags_with_own_threshold"] == 2
    assert json.loads(json.dumps(th)) == th
    np.testing.assert_allclose(thresholds_vector(th, ["b", "zzz"]), [th["tags"]["b"], th["global"]])


def test_most_wrong_lists_missed_and_false_tags_most_confident_first():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32)
    p = np.array([[0.9, 0.1, 0.2], [0.05, 0.9, 0.95], [0.1, 0.2, 0.6]], dtype=np.float32)
    w = most_wrong(y, p, np.full(3, 0.5, np.float32), ["a", "b", "c"])
    assert len(w) == 1 and w[0]["index"] == 1 and w[0]["errors"] == 2
    assert w[0]["missed"] == [["a", 0.05]] and w[0]["false"] == [["c", 0.95]]


def test_single_label_detection_and_confusion_matrix():
    y = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.1, 0.6, 0.3]], dtype=np.float32)
    assert is_single_label(y) and not is_single_label(np.ones((2, 3)))
    cm, top1 = confusion(y, p)
    assert top1 == pytest.approx(0.75)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    m = compute_metrics(y, p, np.full(3, 0.5, np.float32))
    assert {"map", "auc", "micro_f1", "macro_f1", "micro_f1_at_0.5", "macro_precision_at_0.5"} <= set(m)


# ---------------------------------------------------------------------------------------------------------
# evaluate() end to end on trained tiny models


def _train_tiny(data: Path, out: Path, epochs: int = 3):
    from alt_i2v.training.run import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(data, out, backbone="tiny", epochs=epochs, batch_size=32, lr=3e-3, workers=2, quiet=True)


def test_evaluate_writes_metrics_report_and_plots(built_data, tmp_path):
    from alt_i2v.training.evaluation import evaluate

    out = tmp_path / "model"
    _train_tiny(built_data, out)
    result = evaluate(built_data, out, split="test", quiet=True)
    reports = out / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    for key in ("map", "auc", "micro_f1", "macro_f1", "micro_precision", "micro_recall", "macro_precision",
                "macro_recall", "micro_f1_at_0.5", "macro_f1_at_0.5", "per_tag_best", "per_tag_worst",
                "most_wrong"):
        assert key in metrics, key
    assert metrics["split"] == "test" and metrics["images"] == result.images > 0
    assert metrics["thresholds"] == "calibrated" and "top1_accuracy" not in metrics  # multi-label data
    assert 0.5 < metrics["auc"] <= 1 and 0 < metrics["map"] <= 1
    row = metrics["per_tag_best"][0]
    assert {"tag", "support", "ap", "f1", "precision", "recall", "threshold"} <= set(row)
    for w in metrics["most_wrong"]:
        assert w["id"] is not None and w["file"].startswith("images/")
        assert w["missed"] or w["false"]
    md = (reports / "report.md").read_text()
    for heading in ("calibrated thresholds", "Best", "Worst", "most wrong", "mAP"):
        assert heading in md
    assert (reports / "tag_quality.png").read_bytes()[:4] == b"\x89PNG"
    assert result.summary()["mAP"] == metrics["map"]
    with pytest.raises(Exception, match="split"):
        evaluate(built_data, out, split="holdout", quiet=True)

    # a model trained on padded pictures is not scored on a store of cropped ones (its pixels differ)
    from alt_i2v.errors import StoreMismatchError

    cfg = json.loads((out / "config.json").read_text())
    cfg["image"]["resize"] = "crop"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreMismatchError, match="resize mode"):
        evaluate(built_data, out, split="test", quiet=True)


def test_single_label_dataset_gets_top1_and_a_confusion_matrix(tmp_path):
    """Imported class folders: one tag per image."""
    from conftest import make_dataset

    from alt_i2v.training.evaluation import evaluate
    from alt_i2v.store import build_store
    from alt_i2v.data.vocab import build_vocab

    data = tmp_path / "data"
    posts = make_dataset(data, n=160, seed=4, size=32)
    # keep one tag per post: the shape of the picture
    lines = []
    for p in posts:
        shape = [t for t in p["tags"]["general"] if t in ("circle", "square", "triangle")][0]
        lines.append(json.dumps({**p, "tags": {"general": [shape]}}))
    (data / "posts.jsonl").write_text("\n".join(lines) + "\n")
    build_vocab(data)
    build_store(data, image_size=32, workers=1, quiet=True)
    out = tmp_path / "model"
    _train_tiny(data, out, epochs=2)
    result = evaluate(data, out, split="train", quiet=True)
    assert 0 <= result.metrics["top1_accuracy"] <= 1 and result.metrics["single_label"]
    assert (out / "reports" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    cm = json.loads((out / "reports" / "metrics.json").read_text())["confusion_matrix"]
    assert np.asarray(cm).sum() == result.images
    assert "top-1 accuracy" in result.summary()
