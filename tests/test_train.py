"""train.py: the model directory it writes, learning, resume (also after kill -9), the NaN guard, settings
checks, mixed precision and the CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import temp_files
from alt_i2v.errors import AltI2VError, UsageError
from alt_i2v.model.history import read_history
from alt_i2v.training.optim import precision_policy
from alt_i2v.training.run import train

TINY = dict(backbone="tiny", batch_size=32, lr=3e-3, workers=2)


def _train(data, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(data, out, quiet=True, **{**TINY, **kw})


@pytest.fixture(scope="module")
def trained(built_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "model"
    result = _train(built_data, out, epochs=4)
    return built_data, out, result


def test_model_directory_has_every_contract_file(trained):
    data, out, result = trained
    for name in ("model.keras", "config.json", "vocab.json", "thresholds.json", "history.csv", "curves.png",
                 "checkpoints/best.keras", "checkpoints/state.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "checkpoints").glob("last-e*.keras"))) == 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not temp_files(out), "temporary files left behind"
    assert (out / "vocab.json").read_text() == (data / "vocab.json").read_text()


def test_config_json_records_everything_needed_to_use_the_model(trained):
    data, out, result = trained
    cfg = json.loads((out / "config.json").read_text())
    for key in ("version", "model", "train", "image", "backend", "keras_version", "num_tags", "vocab_sha256",
                "embedding_dim"):
        assert key in cfg, key
    vocab = json.loads((data / "vocab.json").read_text())
    assert cfg["num_tags"] == len(vocab["tags"]) == cfg["model"]["num_tags"]
    assert cfg["model"]["backbone"] == "tiny" and cfg["model"]["weights"] is None
    assert cfg["model"]["trunk"] == "resnet"  # the default design is recorded, so a resume rebuilds it
    assert cfg["image"]["image_size"] == 32 and cfg["image"]["resize"] == "pad"
    assert cfg["embedding_dim"] == 256 and cfg["backend"] == keras.backend.backend()
    assert cfg["train"]["epochs"] == 4 and cfg["finished"] is True


def test_thresholds_json_covers_every_tag(trained):
    data, out, _ = trained
    th = json.loads((out / "thresholds.json").read_text())
    assert th["version"] == 1 and th["method"] == "max_f1" and th["calibrated_on"] == "val"
    assert 0 < th["global"] < 1 and th["min_positives"] == 5
    names = [t["name"] for t in json.loads((data / "vocab.json").read_text())["tags"]]
    assert set(th["tags"]) == set(names)
    assert all(0 < v < 1 for v in th["tags"].values())


def test_loss_goes_down_and_history_has_one_row_per_epoch(trained):
    _, out, result = trained
    rows = read_history(out / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "auc", "f1", "val_loss", "val_auc", "val_f1", "lr", "img_per_s"):
        assert key in rows[0], key
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.8
    assert result.summary()["epochs"].startswith("1-4 of 4")
    assert result.best_epoch in (1, 2, 3, 4)


def test_model_keras_is_the_best_checkpoint_and_loads_in_safe_mode(trained):
    from alt_i2v.model.modeldir import load_model

    data, out, result = trained
    model = load_model(out)
    best = keras.saving.load_model(out / "checkpoints" / "best.keras", safe_mode=True, compile=False)
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    np.testing.assert_array_equal(model.predict(x, verbose=0), best.predict(x, verbose=0))
    assert "optimizer" not in _weight_groups(out / "model.keras")  # inference file: no optimizer state
    assert "optimizer" in _weight_groups(next((out / "checkpoints").glob("last-e*.keras")))  # resumable
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["best_epoch"] == result.best_epoch and state["epoch"] == 4 and state["finished"]


def _weight_groups(path: Path) -> list[str]:
    import io
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as h5:
        return list(h5.keys())


def test_resume_continues_at_the_next_epoch_with_the_same_history(built_data, tmp_path):
    out = tmp_path / "m"
    first = _train(built_data, out, epochs=2)
    rows_before = read_history(out / "history.csv")
    assert [r["epoch"] for r in rows_before] == [1, 2]
    second = _train(built_data, out, epochs=4, resume=True)
    rows = read_history(out / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == rows_before  # the earlier rows are kept as they were
    assert second.initial_epoch == 2 and second.resumed and first.initial_epoch == 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    # nothing left to do: a second --resume just redoes the final steps
    third = _train(built_data, out, epochs=4, resume=True)
    assert third.initial_epoch == 4 and len(read_history(out / "history.csv")) == 4


def test_existing_run_needs_resume_and_resume_keeps_its_settings(trained, tmp_path):
    data, out, _ = trained
    with pytest.raises(UsageError, match="--resume"):
        _train(data, out, epochs=1)
    with pytest.raises(UsageError, match="lr"):
        _train(data, out, epochs=5, lr=0.1, resume=True)
    with pytest.raises(UsageError, match="unknown training setting"):
        _train(data, tmp_path / "x", epochs=1, colour="blue")
    with pytest.raises(UsageError, match="32px"):
        _train(data, tmp_path / "y", epochs=1, image_size=64)


KILL_SCRIPT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from alt_i2v.training.run import train
train(sys.argv[1], sys.argv[2], backbone="tiny", epochs=30, batch_size=16, lr=3e-3, workers=2, quiet=True)
"""


@pytest.mark.slow
def test_resume_after_kill_9_mid_training(built_data, tmp_path):
    """A run killed with SIGKILL at an arbitrary moment resumes from its last completed epoch."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(built_data), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "state.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere inside the next epoch, or in the middle of writing its checkpoint
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = json.loads(state.read_text())["epoch"]
    assert 2 <= done < 30
    with open(out / "history.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) in (done, done + 1)  # killed between the csv and state.json
    result = _train(built_data, out, epochs=done + 2, resume=True, batch_size=16)
    rows = read_history(out / "history.csv")
    assert [r["epoch"] for r in rows] == list(range(1, done + 3))
    assert result.initial_epoch == done
    assert (out / "model.keras").is_file() and (out / "thresholds.json").is_file()
    assert not temp_files(out)


def test_nan_loss_stops_training_with_a_clear_message(built_data, tmp_path, monkeypatch):
    import alt_i2v.training.optim as optim_mod

    class NaNLoss(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return keras.ops.mean(y_pred, axis=-1) * float("nan")

    monkeypatch.setattr(optim_mod, "get_loss", lambda *a, **k: NaNLoss())
    out = tmp_path / "nan"
    with pytest.raises(AltI2VError, match="NaN") as err:
        _train(built_data, out, epochs=3)
    assert "--lr" in str(err.value)
    assert not (out / "model.keras").exists()
    assert not (out / "checkpoints" / "state.json").exists()


def test_precision_policies():
    assert precision_policy(None) == "float32" and precision_policy("none") == "float32"
    assert precision_policy("bfloat16") == "mixed_bfloat16"
    assert precision_policy("float16") == "mixed_float16"
    assert precision_policy("auto") in ("float32", "mixed_bfloat16")


def test_mixed_precision_run_saves_a_float32_model(built_data, tmp_path):
    out = tmp_path / "bf16"
    result = _train(built_data, out, epochs=1, mixed_precision="bfloat16", steps_per_epoch=3)
    assert result.precision_policy == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["precision_policy"] == "mixed_bfloat16" and cfg["train"]["mixed_precision"] == "bfloat16"
    from alt_i2v.model.modeldir import load_model

    model = load_model(out)
    assert model.get_layer("features").dtype_policy.name == "float32"
    probs = model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0)
    assert probs.dtype == np.float32 and np.isfinite(probs).all()


def test_cli_trains_tiny_with_weights_none_and_evaluates(built_data, tmp_path, capsys):
    from alt_i2v.cli import main

    out = tmp_path / "cli_model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["--train", "--data", str(built_data), "--model", str(out), "--backbone", "tiny",
                   "--weights", "none", "--epochs", "2", "--batch-size", "32", "--lr", "0.003", "--trunk", "plain",
                   "--tta", "none", "--quiet"])
    assert rc == 0
    assert (out / "model.keras").is_file()
    recorded = json.loads((out / "config.json").read_text())["model"]
    assert recorded["trunk"] == "plain" and recorded["tta"] == "none"  # predictions run the network alone
    from alt_i2v.tagging.tagger import Tagger
    tagger = Tagger(out)
    assert tagger.tta == "none" and tagger.predictor is tagger.model
    # the plain trunk is the original 4-block CNN: no residual additions
    from alt_i2v.model.modeldir import load_model
    assert not [la for la in load_model(out).get_layer("tiny").layers if isinstance(la, keras.layers.Add)]
    assert main(["--evaluate", "--data", str(built_data), "--model", str(out), "--split", "test", "--quiet"]) == 0
    assert (out / "reports" / "metrics.json").is_file()
    # a pretrained backbone offline fails before anything is written, naming the file
    rc = main(["--train", "--data", str(built_data), "--model", str(tmp_path / "vgg"), "--backbone", "vgg16",
               "--weights", str(tmp_path / "missing.h5"), "--epochs", "1", "--quiet"])
    assert rc == 2 and "missing.h5" in capsys.readouterr().err
    assert not (tmp_path / "vgg").exists()


_TRACE_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
from alt_i2v.model.layers import Preprocess
shapes, call = [], Preprocess.call
def traced(self, inputs):  # runs once per trace (jax.jit compiles one program per input shape)
    shapes.append([None if d is None else int(d) for d in inputs.shape])
    return call(self, inputs)
Preprocess.call = traced
from alt_i2v.training.run import train
r = train(sys.argv[1], sys.argv[2], backbone="tiny", batch_size=48, epochs=2, workers=1, quiet=True)
print(json.dumps({"shapes": shapes, "speed": r.summary()["train speed"], "history": r.history}))
"""


@pytest.mark.slow
def test_one_compiled_step_each_for_train_eval_and_predict_under_jax(built_data, tmp_path):
    """Every batch has one shape (the partial ones are padded and masked), so JAX compiles the train,
    eval and predict steps once each over a 2-epoch run, and the summary reports the steady speed."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT, str(built_data), str(tmp_path / "m")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    counts = {}
    for shape in out["shapes"]:
        counts[shape[0]] = counts.get(shape[0], 0) + 1
    # 48: shape inference + the train and eval steps; 64: calibration's predict step, whose one trace
    # runs the network twice (the picture and its mirror image: tiny's tta is flip). The splits
    # (320 / 40 images) end in partial batches, which would add traces of 32 and 40 without padding.
    assert counts == {48: 3, 64: 2}, out["shapes"]
    assert all(r["steady_img_per_s"] > 0 for r in out["history"])
    assert "steady" in out["speed"] and "first epoch" in out["speed"]
