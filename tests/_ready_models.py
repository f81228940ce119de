"""Tiny ready models built from scratch in the exact on-disk formats of the real ones: a WD14 tagger folder
(``model.onnx`` + ``selected_tags.csv`` with columns tag_id,name,category,count) and a DeepDanbooru project
(``project.json`` with DeepDanbooru's keys, ``tags.txt``, ``tags-general.txt``, ``tags-character.txt``,
``model-resnet_custom_v3.h5``), plus each family's reference preprocessing done by hand. Not a test
module; imported by the tests of ready models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

# A dozen tags each: WD14 lists ratings first (category 9), then general (0), then character (4);
# DeepDanbooru lists general, character, then its system tags rating:*. The general tags name what the
# shapes dataset of conftest draws, so evaluation on it has shared tags.
WD14_TAGS = [("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
             ("red", 0), ("green", 0), ("blue", 0), ("circle", 0), ("square", 0), ("1girl", 0),
             ("hatsune_miku", 4), ("inazuma_(kancolle)", 4)]
DD_GENERAL = ["red", "green", "blue", "circle", "triangle", "smile", "solo"]
DD_CHARACTER = ["hatsune_miku", "inazuma_(kancolle)"]
DD_SYSTEM = ["rating:safe", "rating:questionable", "rating:explicit"]
DD_TAGS = DD_GENERAL + DD_CHARACTER + DD_SYSTEM
DD_PROJECT = {"image_width": 32, "image_height": 32, "database_path": None, "minimum_tag_count": 20,
              "model": "resnet_custom_v3", "minibatch_size": 32, "epoch_count": 10, "export_model_per_epoch": 10,
              "checkpoint_frequency_mb": 200, "console_logging_frequency_mb": 10, "optimizer": "adam",
              "learning_rate": 0.001, "rotation_range": [0.0, 360.0], "scale_range": [0.9, 1.1],
              "shift_range": [-0.1, 0.1], "mixed_precision": False}


def wd14_graph(size: int = 32, num_tags: int = len(WD14_TAGS), batch: int | str = "batch", seed: int = 0,
               channels: int = 16):
    """An NHWC float32 image -> Transpose -> Conv 3x3/2 -> Relu -> GlobalAveragePool -> Flatten ("feats")
    -> MatMul -> Add -> Sigmoid graph: the shape of an exported timm/Keras tagger, a few layers deep."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.normal(0, 1, (channels, 3, 3, 3)) / 255.0).astype(np.float32)
    b1 = rng.normal(0, 0.1, channels).astype(np.float32)
    w2 = rng.normal(0, 1.5, (channels, num_tags)).astype(np.float32)
    b2 = rng.normal(0, 0.5, num_tags).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["feats"], axis=1),
        helper.make_node("MatMul", ["feats", "w2"], ["mm"]),
        helper.make_node("Add", ["mm", "b2"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, num_tags])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_wd14(root: Path, size: int = 32, batch: int | str = "batch", seed: int = 0,
              tags: list[tuple[str, int]] | None = None) -> Path:
    """A WD14 tagger folder at ``root``: model.onnx and selected_tags.csv."""
    import onnx

    tags = WD14_TAGS if tags is None else tags
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(wd14_graph(size, len(tags), batch, seed), str(root / "model.onnx"))
    with open(root / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(tags):
            w.writerow([100000 + i, name, cat, 5000 - 100 * i])
    return root


def wd14_reference(model_file: Path, image_file: Path) -> np.ndarray:
    """Probabilities the WD14 taggers' own script computes: RGBA over white, padded to a white square,
    bicubic to the graph's input size, float32, RGB -> BGR, onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = inp.shape[1]
    image = Image.open(image_file).convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")
    m = max(image.size)
    padded = Image.new("RGB", (m, m), (255, 255, 255))
    padded.paste(image, ((m - image.size[0]) // 2, (m - image.size[1]) // 2))
    if m != size:
        padded = padded.resize((size, size), Image.BICUBIC)
    x = np.asarray(padded, dtype=np.float32)[:, :, ::-1]
    return sess.run(None, {inp.name: np.ascontiguousarray(x[None])})[0][0]


def wd14_features(model_file: Path, image_file: Path) -> np.ndarray:
    """The ``feats`` tensor (the tag head's input) of the hand-run reference, by naming it an output."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = onnx.load(str(model_file))
    proto.graph.output.append(helper.make_tensor_value_info("feats", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    size = sess.get_inputs()[0].shape[1]
    from alt_i2v.data.imaging import load_image

    x = load_image(image_file, size, "square")[:, :, ::-1].astype(np.float32)
    return sess.run(["feats"], {"input": np.ascontiguousarray(x[None])})[0][0]


def dd_network(size: int = 32, num_tags: int = len(DD_TAGS), seed: int = 0, channels: int = 16):
    """DeepDanbooru's architecture in miniature: conv-bn-relu blocks, then its conv_gap head (1x1 Conv2D
    with one filter per tag, no bias, global average) and a float32 sigmoid."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = layers.Conv2D(channels, 3, strides=2, padding="same", use_bias=False, kernel_initializer="he_normal")(inp)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False, kernel_initializer="he_normal")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Conv2D(num_tags, 1, padding="same", use_bias=False, kernel_initializer="he_normal")(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Activation("sigmoid", dtype="float32")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # moving statistics away from 0/1, so inference-mode BN matters
        if isinstance(layer, layers.BatchNormalization):
            g, b, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                               rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2, var.shape)])
    return model


def make_deepdanbooru(root: Path, size: int = 32, seed: int = 0, tags: list[str] | None = None) -> Path:
    """A DeepDanbooru project at ``root``: project.json, tags.txt, tags-general.txt, tags-character.txt and
    model-resnet_custom_v3.h5 (written by Keras' h5 writer, as DeepDanbooru saves)."""
    import warnings

    tags = DD_TAGS if tags is None else tags
    root.mkdir(parents=True, exist_ok=True)
    (root / "project.json").write_text(json.dumps({**DD_PROJECT, "image_width": size, "image_height": size},
                                                  indent=4))
    (root / "tags.txt").write_text("".join(t + "\n" for t in tags))
    (root / "tags-general.txt").write_text("".join(t + "\n" for t in tags if t in DD_GENERAL))
    (root / "tags-character.txt").write_text("".join(t + "\n" for t in tags if t in DD_CHARACTER))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras calls .h5 legacy
        dd_network(size, len(tags), seed).save(root / f"model-{DD_PROJECT['model']}.h5")
    return root


_networks: dict = {}  # the project networks loaded by dd_reference, by file and mtime


def dd_reference(project: Path, image_file: Path) -> np.ndarray:
    """Probabilities of the project's Keras model run by hand: the image loaded at image_width (padded
    square, RGB), divided by 255, model.predict."""
    import keras

    from alt_i2v.data.imaging import load_image

    doc = json.loads((project / "project.json").read_text())
    file = project / f"model-{doc['model']}.h5"
    key = (str(file), file.stat().st_mtime_ns)
    if key not in _networks:
        _networks[key] = keras.saving.load_model(file, compile=False)
    model = _networks[key]
    x = load_image(image_file, doc["image_width"], "pad").astype(np.float32) / 255.0
    return np.asarray(model(x[None], training=False))[0]


def pictures(folder: Path, n: int = 4, seed: int = 3) -> list[Path]:
    """``n`` pictures of different shapes and modes (a wide RGBA PNG with transparency, a tall JPEG, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = [(60, 40), (30, 70), (32, 32), (90, 90)][i % 4]
        arr = rng.integers(0, 256, (h, w, 3), np.uint8)
        if i % 4 == 0:
            alpha = np.where(rng.random((h, w)) < 0.3, 0, 255).astype(np.uint8)
            img, name = Image.fromarray(np.dstack([arr, alpha]), "RGBA"), f"p{i}.png"
        elif i % 4 == 1:
            img, name = Image.fromarray(arr), f"p{i}.jpg"
        else:
            img, name = Image.fromarray(arr), f"p{i}.png"
        img.save(folder / name)
        out.append(folder / name)
    return out
