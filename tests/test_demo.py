"""The demo: the generated dataset follows the contract, and ``--demo --quick`` runs every stage end to end,
clears its score bar, and a second run reuses everything instead of redoing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alt_i2v.cli import main
from alt_i2v.data.posts import read_posts
from alt_i2v.demo import COUNT_TAGS, QUICK, draw_demo_image, generate_demo_dataset
from alt_i2v.errors import AltI2VError


def test_generated_dataset_follows_the_contract_and_is_deterministic(tmp_path: Path):
    info = generate_demo_dataset(tmp_path / "a", 60, seed=3, size=48)
    assert info["reused"] is False and info["n_images"] == 60
    read = read_posts(tmp_path / "a")
    assert read.summary() == {"lines": 60, "posts": 60, "malformed": 0, "duplicate_ids": 0}
    for post in read.posts:
        assert post["file"] == f"images/{post['md5'][:2]}/{post['md5']}.{post['file_ext']}"
        assert (tmp_path / "a" / post["file"]).is_file()
        assert post["rating"] in ("g", "s")
        tags = post["tags"]
        general = set(tags["general"])
        # exactly one head count, and each character brings its copyright
        counts = [n for n, t in COUNT_TAGS.items() if set(t) <= general]
        assert len(counts) == 1 and ("multiple_girls" in general) == (counts[0] >= 2)
        assert bool(tags.get("character")) == bool(tags.get("copyright"))
        assert ("swimsuit" in general) == (post["rating"] == "s")
        assert ("starry_sky" not in general) or ("night" in general)
    # same seed, same pictures; another seed, other pictures
    generate_demo_dataset(tmp_path / "b", 60, seed=3, size=48)
    generate_demo_dataset(tmp_path / "c", 60, seed=4, size=48)
    md5s = {d: [p["md5"] for p in read_posts(tmp_path / d).posts] for d in "abc"}
    assert md5s["a"] == md5s["b"] and md5s["a"] != md5s["c"]
    img, meta = draw_demo_image(3, 0, 48)
    assert img.size == (48, 48) and meta["tags"]["general"] == read.posts[0]["tags"]["general"]


def test_generation_is_reused_and_refuses_foreign_data(tmp_path: Path):
    generate_demo_dataset(tmp_path / "d", 20, seed=0, size=32)
    before = (tmp_path / "d" / "posts.jsonl").stat().st_mtime_ns
    assert generate_demo_dataset(tmp_path / "d", 20, seed=0, size=32)["reused"] is True
    assert (tmp_path / "d" / "posts.jsonl").stat().st_mtime_ns == before
    with pytest.raises(AltI2VError, match="other settings"):
        generate_demo_dataset(tmp_path / "d", 30, seed=0, size=32)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "posts.jsonl").write_text('{"id": 1, "md5": "' + "0" * 32 + '", "file_ext": "png"}\n')
    with pytest.raises(AltI2VError, match="not a demo dataset"):
        generate_demo_dataset(tmp_path / "mine", 20)


OUTPUTS = ["data/posts.jsonl", "data/vocab.json", "data/store/CURRENT", "data/reports/build_report.json",
           "model/model.keras", "model/config.json", "model/thresholds.json", "model/history.csv",
           "model/curves.png", "model/reports/metrics.json", "model/reports/report.md",
           "similar.index/index.json", "demo.json"]


@pytest.mark.slow
def test_demo_quick_end_to_end_then_rerun_reuses(tmp_path: Path, capsys):
    demo = tmp_path / "demo"
    t0 = time.perf_counter()
    assert main(["--demo", str(demo), "--quick"]) == 0
    first = time.perf_counter() - t0
    out = demo / "quick"
    for rel in OUTPUTS:
        assert (out / rel).exists(), rel
    printed = capsys.readouterr().out
    for heading in ("1/7 generate", "2/7 vocab", "3/7 build", "4/7 train", "5/7 evaluate", "6/7 tags",
                    "7/7 similar", "demo done"):
        assert f"== {heading}" in printed
    assert str(out / "model" / "curves.png") in printed and str(out / "model" / "reports" / "report.md") in printed

    result = json.loads((out / "demo.json").read_text())
    metrics = json.loads((out / "model" / "reports" / "metrics.json").read_text())
    assert metrics["split"] == "test" and result["micro_f1"] == metrics["micro_f1"]
    assert metrics["micro_f1"] >= QUICK.min_micro_f1, metrics
    assert result["passed"] and result["reused"] == []
    assert len(result["tagged"]) == QUICK.show and all(t["predicted"] for t in result["tagged"])
    sim = result["similar"]
    assert len(sim["neighbours"]) == sim["k"] and sim["neighbour_jaccard"] > sim["random_jaccard"] + 0.2

    model_mtime = (out / "model" / "model.keras").stat().st_mtime_ns
    epochs = len((out / "model" / "history.csv").read_text().splitlines())
    # the second run in a fresh process, as a user runs it: TensorFlow starts again, and with --quiet
    # nothing at all reaches stdout or stderr (no framework start-up chatter either)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "alt_i2v", "--demo", str(demo), "--quick", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    second = time.perf_counter() - t0
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    again = json.loads((out / "demo.json").read_text())
    assert set(again["reused"]) == {"generate", "vocab", "build", "train", "evaluate", "similar"}
    assert (out / "model" / "model.keras").stat().st_mtime_ns == model_mtime
    assert len((out / "model" / "history.csv").read_text().splitlines()) == epochs
    assert again["micro_f1"] == result["micro_f1"]
    # the rerun's own time (demo.json, after start-up: this one also started a fresh Python and TensorFlow)
    assert again["seconds"] < result["seconds"] / 3, (result["seconds"], again["seconds"], first, second)
