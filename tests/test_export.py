"""export.py: SavedModel, ONNX and TFLite exports run in their own runtimes with the Keras model's
probabilities, carry the vocabulary and thresholds, fail loudly on a mismatch or a missing extra, and the
documented onnxruntime-only example tags like alt-i2v does."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _inference_model import shapes, trained_model
from alt_i2v.cli import main
from alt_i2v.errors import AltI2VError
from alt_i2v.tagging.exporting import EXPORT_FILE, EXTRA, FORMATS, TOLERANCE, ExportParityError, export, missing_packages

ROOT = Path(__file__).resolve().parent.parent


def _need(fmt: str) -> None:
    missing = missing_packages(fmt)
    if missing:
        pytest.skip(f"the optional 'export' extra is not installed ({', '.join(missing)} missing): {EXTRA}")


@pytest.fixture(scope="module")
def model_dir(built_data, tmp_path_factory) -> Path:
    return trained_model(built_data, tmp_path_factory)


def _runtime_probs(fmt: str, out: Path, images: np.ndarray) -> np.ndarray:
    """Run an export with its runtime directly, as a user would (no alt-i2v code involved)."""
    if fmt == "onnx":
        import onnxruntime as ort

        s = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: images})[0]
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(out / "model.tflite"))
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], list(images.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], images)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])
    import tensorflow as tf

    loaded = tf.saved_model.load(str(out / "saved_model"))  # kept: its variables die with it
    return loaded.serve(tf.constant(images)).numpy()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_export_runs_in_its_runtime_with_the_keras_probabilities(model_dir, tmp_path, fmt):
    _need(fmt)
    from alt_i2v.tagging.tagger import Tagger

    out = tmp_path / fmt
    assert main(["--export", "--model", str(model_dir), "--format", fmt, "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / EXPORT_FILE).read_text())
    tagger = Tagger(model_dir)
    assert meta["tags"] == tagger.vocab.names and np.allclose(meta["thresholds"], tagger.thresholds, atol=1e-6)
    assert meta["input"]["image_size"] == 32 and meta["input"]["dtype"] == "uint8"
    assert meta["parity"]["max_abs_diff"] <= TOLERANCE and meta["parity"]["images"] >= 3
    assert (out / "vocab.json").read_bytes() == (model_dir / "vocab.json").read_bytes()
    assert (out / "thresholds.json").read_bytes() == (model_dir / "thresholds.json").read_bytes()
    images = np.stack([np.asarray(img.resize((32, 32))) for img in shapes(5, seed=77, size=48)])
    got = _runtime_probs(fmt, out, images)
    assert np.abs(got - tagger.probabilities(images)).max() <= TOLERANCE
    # the model's flip averaging is inside the exported graph: a mirror image gets the same answer
    assert tagger.tta == "flip"
    assert np.abs(_runtime_probs(fmt, out, np.ascontiguousarray(images[:, :, ::-1])) - got).max() <= TOLERANCE
    assert not list(tmp_path.glob(".*.part"))  # no temporary folder left behind


def test_a_parity_failure_fails_loudly_and_leaves_nothing(model_dir, tmp_path, monkeypatch, capsys):
    import alt_i2v.tagging.exporting as ex

    real = ex.RUNTIMES["savedmodel"]

    def off_by_a_little(path):
        run, name = real(path)
        return (lambda x: run(x) + 2 * TOLERANCE), name

    monkeypatch.setitem(ex.RUNTIMES, "savedmodel", off_by_a_little)
    out = tmp_path / "sm"
    assert main(["--export", "--model", str(model_dir), "--format", "savedmodel", "--out", str(out), "--quiet"]) == 1
    assert "does not match the Keras model" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # neither the export nor its temporary folder


def test_an_earlier_export_is_replaced_only_by_one_that_passed(model_dir, tmp_path, monkeypatch):
    import alt_i2v.tagging.exporting as ex

    out = tmp_path / "sm"
    export(model_dir, out, "savedmodel", quiet=True)
    first = (out / EXPORT_FILE).read_text()
    monkeypatch.setattr(ex, "TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(ExportParityError, match="does not match"):
        export(model_dir, out, "savedmodel", quiet=True)
    assert (out / EXPORT_FILE).read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]
    monkeypatch.undo()
    export(model_dir, out, "savedmodel", quiet=True)  # a passing one replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]


def test_a_file_the_user_put_into_an_export_is_never_deleted(model_dir, tmp_path, capsys):
    """issue 22 case 2: a second --export into the same folder deleted ``tag_onnx.py`` put there."""
    out = tmp_path / "sm"
    export(model_dir, out, "savedmodel", quiet=True)
    written = sorted(p.name for p in out.iterdir())
    assert json.loads((out / EXPORT_FILE).read_text())["files"] == written
    (out / "tag_onnx.py").write_text("print('mine')\n")
    assert main(["--export", "--model", str(model_dir), "--format", "savedmodel", "--out", str(out), "--quiet"]) == 2
    assert "holds files the export did not write (tag_onnx.py)" in capsys.readouterr().err
    assert (out / "tag_onnx.py").read_text() == "print('mine')\n" and sorted(p.name for p in out.iterdir()) == \
        sorted(written + ["tag_onnx.py"])


def test_out_dot_is_a_clear_usage_error(model_dir, tmp_path, monkeypatch, capsys):
    """issue 22 case 8: ``--export --out .`` said "unexpected ValueError: PosixPath('.') has an empty name"."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", "./", str(here), ".."):
        assert main(["--export", "--model", str(model_dir), "--format", "savedmodel", "--out", out, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "not the current one or one above it" in err and "unexpected" not in err
    assert list(here.iterdir()) == []


def test_what_a_killed_export_left_is_cleared_by_the_next(model_dir, tmp_path):
    """issue 22 case 5: a kill -9 during --export left its temporary folder for good. The next export
    clears it (only its own: another program's ``*.part`` beside it stays), and one killed in the middle
    of the swap gets the previous export back first."""
    from alt_i2v.fsutil import temp_path

    out = tmp_path / "sm"
    cmd = [sys.executable, "-m", "alt_i2v", "--export", "--model", str(model_dir), "--format", "savedmodel",
           "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob(".~alt-i2v-*-sm.part")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    left = list(tmp_path.glob(".~alt-i2v-*-sm.part"))
    assert left and not out.exists()  # what the kill left
    (tmp_path / ".sm.download.part").write_text("someone else's")
    export(model_dir, out, "savedmodel", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sm.download.part", "sm"]

    first = (out / EXPORT_FILE).read_text()
    aside = temp_path(tmp_path / "sm.old")  # killed between the swap's two renames: OUT is missing
    dead = aside.with_name(aside.name.replace(f"-{os.getpid()}-", "-999999999-", 1))
    out.rename(dead)
    export(model_dir, out, "savedmodel", quiet=True)  # gets it back, then replaces it as usual
    assert (out / EXPORT_FILE).is_file() and not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sm.download.part", "sm"]
    assert json.loads(first)["files"] == sorted(p.name for p in out.iterdir())


def test_a_missing_extra_is_named(model_dir, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(AltI2VError, match=r"onnxruntime.*'export' extra.*\.\[export\]"):
        export(model_dir, tmp_path / "o", "onnx", quiet=True)
    assert main(["--export", "--model", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "o")]) == 1
    assert '.[export]' in capsys.readouterr().err


def test_cli_usage_errors(model_dir, tmp_path):
    base = ["--export", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base) == 2  # no --format
    assert main(base + ["--format", "json"]) == 2
    assert main(["--pred", str(tmp_path), "--model", str(model_dir), "--format", "onnx"]) == 2
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("not an export")
    assert main(["--export", "--model", str(model_dir), "--format", "savedmodel", "--out", str(taken)]) == 2
    assert (taken / "mine.txt").exists()


def test_the_documented_onnxruntime_example_tags_like_alt_i2v(model_dir, tmp_path):
    _need("onnx")
    from alt_i2v import predict_tags

    doc = (ROOT / "docs" / "export.md").read_text(encoding="utf-8")
    code = re.search(r"## Tagging with the ONNX file and onnxruntime alone\s+```python\n(.*?)```", doc, re.S).group(1)
    assert len(code.strip().splitlines()) <= 13 and "alt_i2v" not in code
    export(model_dir, tmp_path / "model-onnx", "onnx", quiet=True)
    (tmp_path / "tag_onnx.py").write_text(code)
    img = shapes(1, seed=3, size=32)[0]
    img.save(tmp_path / "picture.png")
    proc = subprocess.run([sys.executable, "-I", "tag_onnx.py", "picture.png"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = ast.literal_eval(proc.stdout.strip())  # {tag: probability}
    want = predict_tags(tmp_path / "picture.png", model=model_dir)
    assert printed.keys() == want.keys()
    assert all(abs(printed[t] - want[t]) <= 2e-3 for t in want)
