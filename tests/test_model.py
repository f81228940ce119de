"""model.py: the reference VGG16 architecture, the backbone registry, weights handling, preprocessing,
losses, embeddings, save -> load, and a smoke run under the JAX backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from alt_i2v.errors import AltI2VError, UsageError
from alt_i2v.model.backbones import get_backbone, keras_cache_dir, resolve_weights
from alt_i2v.model.build import build_model, count_params, embedding_model
from alt_i2v.model.layers import Preprocess
from alt_i2v.model.losses import AsymmetricLoss, FocalLoss, get_loss
from alt_i2v.model.modeldir import load_model

VGG16_FROZEN = ["input_layer", "block1_conv1", "block1_conv2", "block1_pool", "block2_conv1", "block2_conv2",
                "block2_pool", "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool", "block4_conv1"]


@pytest.mark.slow  # builds the full 150-million-parameter network (about 600 MB)
def test_reference_vgg16_architecture_and_parameter_count():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen=12 with random weights warns; asserted below
        model = build_model(4096, 150, "vgg16", weights=None, frozen=12)
    assert model.count_params() == 149_989_184
    assert [layer.name for layer in model.layers] == ["image", "preprocess", "vgg16", "bn", "features", "flatten",
                                                       "tags"]
    trunk = model.get_layer("vgg16")
    assert len(trunk.layers) == 19  # input + 13 conv + 5 pool
    assert [layer.name for layer in trunk.layers if not layer.trainable] == VGG16_FROZEN
    assert trunk.output.shape[1:] == (4, 4, 512)
    assert model.get_layer("features").output.shape[1:] == (4, 4, 2048)
    assert model.output.shape[1:] == (4096,)
    assert model.get_layer("tags").dtype_policy.compute_dtype == "float32"
    assert model.get_layer("tags").activation.__name__ == "sigmoid"
    assert model.input.dtype == "uint8"
    counts = count_params(model)
    frozen_params = sum(int(np.prod(w.shape)) for layer in trunk.layers[:12] for w in layer.weights)
    assert counts["trainable"] == 149_989_184 - frozen_params - 1024  # minus BN moving statistics


def test_weights_none_defaults_to_nothing_frozen_with_a_warning():
    with pytest.warns(UserWarning, match="frozen=0"):
        model = build_model(num_tags=8, image_size=64, weights=None)
    assert all(layer.trainable for layer in model.get_layer("vgg16").layers)


def test_offline_imagenet_error_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    (tmp_path / "kh").mkdir()

    def offline(*a, **k):
        raise Exception("URL fetch failure on https://example/x.h5: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(AltI2VError) as err:
        build_model(num_tags=4, image_size=64, weights="imagenet")
    msg = str(err.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(tmp_path / "kh" / "models") in msg and "~/.keras/models" in msg
    assert "--weights none" in msg and "--weights PATH" in msg
    assert keras_cache_dir() == tmp_path / "kh" / "models"


def test_cached_imagenet_file_is_not_downloaded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"x")
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: pytest.fail("downloaded again"))
    assert resolve_weights("imagenet", "vgg16") == "imagenet"


def test_weights_validation_before_building(tmp_path):
    assert resolve_weights(None) is None and resolve_weights("none") is None and resolve_weights("None") is None
    with pytest.raises(UsageError, match="not found"):
        resolve_weights(str(tmp_path / "missing.h5"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=".h5"):
        resolve_weights(str(tmp_path / "notes.txt"))
    with pytest.raises(UsageError, match="no pretrained weights"):
        build_model(num_tags=4, backbone="tiny", weights="imagenet")
    with pytest.raises(UsageError, match="unknown backbone"):
        build_model(num_tags=4, backbone="alexnet", weights=None)
    with pytest.raises(UsageError, match="at least"):
        build_model(num_tags=4, image_size=16, backbone="vgg16", weights=None)


def test_weights_file_path_loads_into_the_backbone(tmp_path):
    src = build_model(num_tags=3, image_size=32, backbone="tiny", weights=None)
    path = tmp_path / "tiny_trunk.weights.h5"
    src.get_layer("tiny").save_weights(path)
    dst = build_model(num_tags=3, image_size=32, backbone="tiny", weights=str(path))
    for a, b in zip(src.get_layer("tiny").get_weights(), dst.get_layer("tiny").get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AltI2VError, match="cannot load backbone weights"):  # other layer widths
        build_model(num_tags=3, image_size=32, backbone="tiny", weights=str(path), filters=(8, 8, 8))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"definitely not hdf5")
    with pytest.raises(AltI2VError, match="cannot load backbone weights"):
        build_model(num_tags=3, image_size=32, backbone="tiny", weights=str(junk))


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_preprocess_matches_keras_applications(mode):
    from keras.applications import imagenet_utils

    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    want = imagenet_utils.preprocess_input(x.astype("float32"), mode=mode)
    got = keras.ops.convert_to_numpy(Preprocess(mode)(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_registry_entries_know_their_input_config():
    assert get_backbone("VGG16").name == "vgg16" and get_backbone("MobileNetV2").name == "mobilenet_v2"
    assert get_backbone("mobilenet-v2").name == "mobilenet_v2"
    vgg = get_backbone("vgg16").input_config()
    assert vgg["image_size"] == 150 and vgg["preprocess"] == "caffe"
    assert get_backbone("tiny").pretrained is False


def _convs(model):
    return [layer for layer in model.get_layer("tiny").layers if isinstance(layer, keras.layers.Conv2D)]


def test_tiny_resnet_trunk_is_the_default_and_plain_the_original_cnn():
    res = build_model(num_tags=7, image_size=96, backbone="tiny", weights=None)
    plain = build_model(num_tags=7, image_size=96, backbone="tiny", weights=None, trunk="plain")
    # both end on the same 6x6 map, so the flattened head is the same size
    assert res.get_layer("tiny").output.shape[1:] == plain.get_layer("tiny").output.shape[1:] == (6, 6, 128)
    # plain: 4 stride-1 convs 16-32-64-128; resnet: 1 strided conv (--stem 1), then conv + residual pair per
    # stage; --stem 2 (the previous default): 2 strided convs, then the same from the third width
    assert [(c.filters, c.strides) for c in _convs(plain)] == [(16, (1, 1)), (32, (1, 1)), (64, (1, 1)),
                                                              (128, (1, 1))]
    assert [(c.filters, c.strides[0]) for c in _convs(res)] == [(24, 2)] + [(32, 1)] * 3 + [(64, 1)] * 3 + \
        [(128, 1)] * 3
    assert [layer.name for layer in res.get_layer("tiny").layers if isinstance(layer, keras.layers.Add)] == [
        "block2_add", "block3_add", "block4_add"]
    two = build_model(num_tags=7, image_size=96, backbone="tiny", weights=None, stem=2)
    assert [(c.filters, c.strides[0]) for c in _convs(two)] == [(24, 2), (32, 2)] + [(64, 1)] * 3 + [(128, 1)] * 3
    x = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    assert res.predict_on_batch(x).shape == (2, 7)


def test_trunk_option_is_checked_and_old_tiny_configs_read_as_plain():
    from alt_i2v.config import ModelConfig
    from alt_i2v.model.backbones import resolve_config

    cfg = resolve_config(ModelConfig(backbone="tiny", weights=None, num_tags=3, image_size=64))
    assert cfg.trunk == "resnet" and cfg.filters == (24, 32, 64, 128)
    assert ModelConfig.from_config(cfg.get_config()) == cfg  # round-trips with the trunk recorded
    # a config.json written before the option existed: its tiny model was the plain CNN
    old = {k: v for k, v in cfg.get_config().items() if k != "trunk"}
    assert ModelConfig.from_config(old).trunk == "plain"
    with pytest.raises(UsageError, match="trunk must be one of"):
        ModelConfig(backbone="tiny", trunk="dense")
    with pytest.raises(UsageError, match="tiny backbone only"):
        resolve_config(ModelConfig(backbone="mobilenet_v2", weights=None, trunk="plain"))


def test_other_keras_application_backbone_builds():
    model = build_model(num_tags=5, image_size=32, backbone="mobilenet_v2", weights=None)
    assert model.output.shape[1:] == (5,)
    assert model.get_layer("preprocess").mode == "tf"
    assert model.get_layer("features").output.shape[-1] == 1024


def test_losses_registered_and_sensible():
    y = np.array([[1.0, 0.0, 1.0, 0.0]], dtype="float32")
    good = np.array([[0.95, 0.05, 0.9, 0.1]], dtype="float32")
    bad = 1.0 - good
    bce = get_loss("bce")
    for loss in (FocalLoss(gamma=2.0), AsymmetricLoss(), get_loss("focal"), get_loss("asl")):
        assert float(loss(y, good)) < float(loss(y, bad))
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
        assert type(clone) is type(loss) and clone.get_config() == loss.get_config()
    np.testing.assert_allclose(float(FocalLoss(gamma=0.0)(y, good)), float(bce(y, good)), rtol=1e-4)
    np.testing.assert_allclose(float(AsymmetricLoss(0.0, 0.0, 0.0)(y, good)), float(bce(y, good)), rtol=1e-4)
    with pytest.raises(UsageError):
        get_loss("hinge")


def test_save_load_safe_mode_gives_identical_predictions_and_embeddings(tmp_path):
    model = build_model(num_tags=6, image_size=32, backbone="tiny", weights=None)
    model.compile(optimizer="adam", loss=get_loss("asl"))
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    model.fit(x, np.eye(6, dtype="float32")[:4], epochs=1, verbose=0)  # BN statistics move off their init
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_model(tmp_path)  # a model directory works as well as the file
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))

    emb = embedding_model(loaded)
    probs, vec = emb.predict(x, verbose=0)
    np.testing.assert_allclose(probs, loaded.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
    feats = keras.Model(loaded.inputs, loaded.get_layer("features").output).predict(x, verbose=0)
    np.testing.assert_allclose(vec, feats.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    assert vec.shape == (4, 256) and vec.dtype == np.float32
    # float pixels are accepted too
    np.testing.assert_allclose(loaded.predict(x.astype("float32"), verbose=0), probs, rtol=1e-6, atol=1e-7)


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(AltI2VError, match="no model file"):
        load_model(tmp_path)
    (tmp_path / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(AltI2VError, match="not a Keras model file"):
        load_model(tmp_path)


JAX_SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, keras
from alt_i2v.training.run import train
from alt_i2v.model.build import embedding_model
from alt_i2v.model.modeldir import load_model
data, out = sys.argv[1], sys.argv[2]
r = train(data, out, backbone="tiny", epochs=2, batch_size=32, lr=3e-3, quiet=True, workers=2)
m = load_model(out)
x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
p, e = embedding_model(m).predict(x, verbose=0)
np.save(out + "/probe.npy", m.predict(x, verbose=0))
print(json.dumps({"backend": keras.backend.backend(), "losses": [h["loss"] for h in r.history],
                  "emb": list(e.shape)}))
"""


@pytest.mark.slow  # a JAX subprocess: importing JAX and compiling take 20-70 s on 2 cores
def test_jax_backend_smoke_trains_and_saves_a_portable_model(built_data, tmp_path):
    """The same code trains under KERAS_BACKEND=jax; its model.keras loads and agrees under TensorFlow."""
    pytest.importorskip("jax")
    out = tmp_path / "jax_model"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", JAX_SCRIPT, str(built_data), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["backend"] == "jax" and info["emb"] == [3, 256]
    assert info["losses"][-1] < info["losses"][0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backend"] == "jax"
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    here = load_model(out).predict(x, verbose=0)
    np.testing.assert_allclose(here, np.load(out / "probe.npy"), rtol=1e-4, atol=1e-5)


def test_flip_tta_answers_the_mean_over_the_picture_and_its_mirror_for_every_output(tmp_path):
    from alt_i2v.model.build import with_tta

    model = build_model(4, 32, backbone="tiny", weights=None)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mirrored = x[:, :, ::-1]
    assert with_tta(model, "none") is model
    flip = with_tta(model, "flip")
    want = (model.predict_on_batch(x) + model.predict_on_batch(mirrored)) / 2
    np.testing.assert_allclose(flip.predict_on_batch(x), want, atol=1e-6)
    # a picture and its mirror image get the same answer
    np.testing.assert_allclose(flip.predict_on_batch(mirrored), want, atol=1e-6)
    embed = embedding_model(model)
    probs, emb = with_tta(embed, "flip").predict_on_batch(x)
    np.testing.assert_allclose(probs, want, atol=1e-6)
    np.testing.assert_allclose(emb, (embed.predict_on_batch(x)[1] + embed.predict_on_batch(mirrored)[1]) / 2,
                               atol=1e-5)
    flip.save(tmp_path / "flip.keras")  # the wrapper is saved and loaded safely (its Mirror layer registered)
    np.testing.assert_allclose(load_model(tmp_path / "flip.keras").predict_on_batch(x), want, atol=1e-6)
    with pytest.raises(UsageError, match="tta"):
        with_tta(model, "rotate")


def test_tta_defaults_to_flip_for_tiny_none_for_pretrained_and_old_configs_read_as_none():
    from alt_i2v.config import ModelConfig
    from alt_i2v.model.backbones import resolve_config

    assert resolve_config(ModelConfig(backbone="tiny", num_tags=3, weights=None)).tta == "flip"
    assert resolve_config(ModelConfig(backbone="tiny", num_tags=3, weights=None, tta="none")).tta == "none"
    assert resolve_config(ModelConfig(backbone="vgg16", num_tags=3, weights=None)).tta == "none"
    # a model directory written before the option was calibrated on single pictures
    assert ModelConfig.from_config({"backbone": "tiny", "num_tags": 3}).tta == "none"
    with pytest.raises(UsageError, match="tta"):
        ModelConfig(num_tags=3, tta="both")
