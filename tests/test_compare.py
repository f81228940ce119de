"""``--evaluate --data DATA --model A --model B``: one report scoring every model on the same images of the
same split, checked on a case worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alt_i2v.tagging.compare import compare, score, split_images
from alt_i2v.store import split_of
from alt_i2v.data.vocab import Vocab

# Four test images and their tags; each stub model's probabilities over its own vocabulary
TRUTH = [["a", "b"], ["a"], ["b"], ["c"]]
MODEL_A = (["a", "b", "x"], 0.5, [[0.9, 0.8, 0.1], [0.6, 0.3, 0.0], [0.7, 0.4, 0.0], [0.2, 0.1, 0.0]])
MODEL_B = (["b", "c", "a"], 0.3, [[0.9, 0.1, 0.2], [0.1, 0.1, 0.8], [0.5, 0.2, 0.1], [0.6, 0.9, 0.3]])


class StubTagger:
    """What compare needs of a Tagger, with fixed probabilities per file."""

    family = "stub"

    def __init__(self, root: Path, names, threshold, rows, files):
        self.model_dir = root
        self.vocab = Vocab(tags=[{"name": n, "category": "general", "count": 0} for n in names])
        self._thr = np.full(len(names), threshold, np.float32)
        self._rows = {f: np.asarray(r, np.float32) for f, r in zip(files, rows)}

    def iter_probabilities(self, files):
        probs = np.stack([self._rows[f] for f in files])
        yield 0, [np.zeros((1, 1, 3), np.uint8)] * len(files), list(range(len(files))), probs

    def thresholds_for(self, threshold=None):
        return self._thr.copy()


def _test_split_dataset(root: Path) -> list[str]:
    """posts.jsonl + images + vocab.json with exactly TRUTH in the test split (ids picked by their hash)."""
    (root / "images" / "00").mkdir(parents=True)
    posts, files, pid = [], [], 0
    for tags in TRUTH:
        while split_of(pid) != "test":
            pid += 1
        md5 = f"{pid:032x}"
        rel = f"images/00/{md5}.png"
        Image.new("RGB", (8, 8), (pid % 255, 0, 0)).save(root / rel)
        posts.append({"id": pid, "md5": md5, "file_ext": "png", "file": rel, "tags": {"general": tags}})
        files.append(str((root / rel).resolve()))
        pid += 1
    (root / "posts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in posts))
    Vocab(tags=[{"name": n, "category": "general", "count": 1} for n in "abc"]).save(root / "vocab.json")
    return files


def test_split_images_are_the_test_posts_with_their_labels(tmp_path):
    _test_split_dataset(tmp_path)
    split = split_images(tmp_path, "test")
    assert split.names == ["a", "b", "c"]
    assert split.labels.tolist() == [[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_comparison_scores_a_known_case_exactly(tmp_path):
    files = _test_split_dataset(tmp_path / "data")
    split_files = split_images(tmp_path / "data", "test").files
    a = StubTagger(tmp_path / "modelA", *MODEL_A, split_files)
    b = StubTagger(tmp_path / "modelB", *MODEL_B, split_files)
    result = compare(tmp_path / "data", [a, b], "test", out=tmp_path / "report", quiet=True)
    assert [Path(f).resolve() for f in split_files] == [Path(f) for f in files]
    assert result.images == 4 and result.common_tags == ["a", "b"]
    ma, mb = result.models
    # A on a, b at 0.5: AP a = (1 + 2/3) / 2, AP b = 1; a: tp 2 fp 1, b: tp 1 fn 1
    assert ma["common"]["map"] == pytest.approx(11 / 12, abs=1e-6)
    assert ma["common"]["micro_f1"] == pytest.approx(6 / 8, abs=1e-6)
    assert ma["common"]["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2, abs=1e-6)
    assert ma["not_in_model"] == ["c"] and ma["shared"] == 2
    # B on a, b at its own 0.3: AP a = AP b = (1 + 2/3) / 2; a: tp 1 fp 1 fn 1, b: tp 2 fp 1
    assert mb["common"]["map"] == pytest.approx(5 / 6, abs=1e-6)
    assert mb["common"]["micro_f1"] == pytest.approx(6 / 9, abs=1e-6)
    assert mb["common"]["macro_f1"] == pytest.approx((1 / 2 + 4 / 5) / 2, abs=1e-6)
    # B on its own shared tags a, b, c: c is ranked first and alone above 0.3
    assert mb["own_shared"]["map"] == pytest.approx((5 / 6 + 5 / 6 + 1) / 3, abs=1e-6)
    assert mb["own_shared"]["micro_f1"] == pytest.approx(8 / 11, abs=1e-6)
    assert mb["not_in_model"] == [] and mb["shared"] == 3
    assert result.per_tag == [{"tag": "a", "support": 2, "ap": {"modelA": pytest.approx(5 / 6, abs=1e-6),
                                                                 "modelB": pytest.approx(5 / 6, abs=1e-6)}},
                              {"tag": "b", "support": 2,
                               "ap": {"modelA": 1.0, "modelB": pytest.approx(5 / 6, abs=1e-6)}}]
    record = json.loads((tmp_path / "report" / "compare.json").read_text())
    assert record["models"][0]["common"]["map"] == round(11 / 12, 6)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| modelA | stub | 0.9167 | 0.7500 | 0.7333 |" in md
    assert "| a | 2 | 0.8333 | 0.8333 |" in md
    assert "- modelA: 1 (c)" in md


def test_score_by_hand_with_thresholds_per_image():
    y = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    p = np.array([[0.6, 0.2], [0.5, 0.7], [0.4, 0.9]], np.float32)
    thr = np.array([[0.5, 0.5], [0.6, 0.6], [0.3, 0.3]], np.float32)  # e.g. MCut: one threshold per image
    s = score(y, p, thr)
    # predicted: (1,0), (0,1), (1,1): all right
    assert s["micro_f1"] == 1.0 and s["macro_f1"] == 1.0
    assert s["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)  # tag 0 ranks 0.6 pos, 0.5 neg, 0.4 pos
