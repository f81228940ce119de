"""The training recipe of issue 16: warm-up + cosine schedule, AdamW, label smoothing, the global-pooling
head, guarded threshold calibration, and a budget callback ending a run cleanly."""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pytest

from alt_i2v.config import ModelConfig, TrainConfig
from alt_i2v.errors import UsageError
from alt_i2v.training.metrics import prf_at
from alt_i2v.model.backbones import resolve_config
from alt_i2v.model.build import build_model
from alt_i2v.model.losses import get_loss
from alt_i2v.model.modeldir import load_model
from alt_i2v.model.thresholds import thresholds_vector
from alt_i2v.training.thresholds import calibrate_thresholds
from alt_i2v.model.history import read_history
from alt_i2v.training.optim import learning_rate, make_optimizer
from alt_i2v.training.run import train


def test_cosine_schedule_warms_up_then_decays_to_one_percent():
    tc = TrainConfig(epochs=10, lr=1e-2, warmup_epochs=1)
    sched = learning_rate(tc, steps_per_epoch=20)
    lr = [float(keras.ops.convert_to_numpy(sched(step))) for step in (0, 10, 20, 60, 120, 199, 400)]
    assert lr[0] == pytest.approx(1e-3, rel=1e-3)  # starts at lr/10
    assert lr[0] < lr[1] < lr[2] == pytest.approx(1e-2, rel=1e-3)  # linear warm-up over the first epoch
    assert lr[2] > lr[3] > lr[4] > lr[5]  # then decays, monotonically
    assert lr[6] == pytest.approx(1e-4, rel=1e-2)  # to lr/100 at the end, and stays there
    assert learning_rate(tc.replace(schedule="constant"), 20) == 1e-2
    assert isinstance(make_optimizer(tc, 20), keras.optimizers.AdamW)
    assert make_optimizer(tc, 20).weight_decay == pytest.approx(tc.weight_decay)
    assert type(make_optimizer(tc.replace(optimizer="adam"), 20)) is keras.optimizers.Adam
    with pytest.raises(UsageError):
        TrainConfig(schedule="step")
    with pytest.raises(UsageError):
        TrainConfig(label_smoothing=0.7)


def test_label_smoothing_keeps_confident_predictions_from_zero_loss():
    y = np.array([[1.0, 0.0]], dtype="float32")
    sure = np.array([[0.9999, 0.0001]], dtype="float32")
    assert float(get_loss("bce")(y, sure)) < 0.01
    smooth = get_loss("bce", label_smoothing=0.2)
    assert float(smooth(y, sure)) > 0.5  # targets are 0.9/0.1: overconfidence costs
    assert float(smooth(y, np.array([[0.9, 0.1]], "float32"))) < float(smooth(y, sure))


def test_avgmax_head_builds_saves_and_loads_in_safe_mode(tmp_path):
    cfg = resolve_config(ModelConfig(backbone="tiny", num_tags=7, image_size=32, weights=None, pooling="avgmax",
                                     dropout=0.3))
    assert cfg.dropout == 0.3 and cfg.pooling == "avgmax"
    model = build_model(config=cfg)
    assert model.get_layer("pool").output.shape[-1] == 2 * cfg.dense_units
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype("uint8")
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(load_model(tmp_path / "m.keras").predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    # the reference VGG16 head is untouched: flattened, no dropout
    vgg = resolve_config(ModelConfig(backbone="vgg16", num_tags=7, weights=None), check_weights=False, warn=False)
    assert (vgg.pooling, vgg.dropout, vgg.dense_units) == ("flatten", 0.0, 2048)


def _separable(rng, n, pos_range, neg_range, rate):
    y = (rng.random(n) < rate).astype(np.float32)
    p = np.where(y > 0, rng.uniform(*pos_range, n), rng.uniform(*neg_range, n))
    return y, p.astype(np.float32)


def test_calibration_guards_against_extreme_thresholds():
    rng = np.random.default_rng(0)
    cols = [_separable(rng, 800, (0.4, 0.95), (0.0, 0.3), 0.3),  # an ordinary tag
            _separable(rng, 800, (0.012, 0.05), (0.0, 0.006), 0.05),  # separable, but far below 0.5
            _separable(rng, 800, (0.6, 0.9), (0.0, 0.55), 0.012)]  # a handful of positives
    y = np.stack([c[0] for c in cols], 1)
    p = np.stack([c[1] for c in cols], 1)
    names = ["common", "quiet", "rare"]
    assert 5 <= y[:, 2].sum() < 15
    raw = calibrate_thresholds(y, p, names, clamp=None, shrink_prior=0)
    guarded = calibrate_thresholds(y, p, names)
    assert raw["tags"]["quiet"] < 0.02  # the extreme value the guard is for
    assert guarded["tags"]["quiet"] == 0.05  # clamped
    assert all(0.05 <= t <= 0.95 for t in guarded["tags"].values())
    # few positives: pulled most of the way toward the global threshold; many: mostly its own
    g = guarded["global"]
    assert abs(guarded["tags"]["rare"] - g) < abs(raw["tags"]["rare"] - g) / 2
    assert abs(guarded["tags"]["common"] - raw["tags"]["common"]) < 0.05
    assert guarded["guard"] == {"clamp": [0.05, 0.95], "shrink_prior": 10.0, "midpoint": "logit"}
    assert json.loads(json.dumps(guarded)) == guarded
    # a flat optimum resolves to the logit middle of the gap, not its lower end
    y1 = np.array([0, 0, 0, 1, 1, 1], np.float32)[:, None]
    p1 = np.array([0.001, 0.002, 0.002, 0.3, 0.5, 0.9], np.float32)[:, None]
    t = calibrate_thresholds(y1, p1, ["x"], min_positives=1, clamp=None, shrink_prior=0)["tags"]["x"]
    assert 0.01 < t < 0.1 and prf_at(y1, p1, np.array([t]))["micro_f1"] == 1.0
    assert thresholds_vector(guarded, names).dtype == np.float32


def test_a_budget_callback_ends_the_run_after_a_validated_partial_epoch(built_data, tmp_path):
    class StopAfter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch >= 1:
                self.model.stop_training = True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(built_data, tmp_path / "m", quiet=True, callbacks=[StopAfter()], backbone="tiny",
                    weights=None, epochs=5, batch_size=16, workers=1)
    rows = read_history(tmp_path / "m" / "history.csv")
    assert [r["epoch"] for r in rows] == [1] and res.best_epoch == 1
    assert "val_map" in rows[0] and res.train_config.monitor == "val_map"
    assert (tmp_path / "m" / "model.keras").is_file()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["train"]["optimizer"] == "adamw" and cfg["train"]["schedule"] == "cosine"
