"""DeepDanbooru projects: ``project.json``, ``tags.txt`` (+ ``tags-general.txt``, ``tags-character.txt``)
and the Keras weights ``model-<project.json "model">.h5``, as DeepDanbooru writes and releases them.

``tags.txt`` lists one tag a line in output order (general tags, character tags, then the system tags
``rating:*``); the per-category files say which are general and which character, ``rating:`` names the
ratings (a project without the per-category files counts its tags as general). The network takes RGB
values in [0, 1] at ``image_width`` x ``image_height`` and ends in a 1x1 convolution with one filter per tag,
a global average and a sigmoid.

:func:`wrap` puts the network into the shape of an alt-i2v model (uint8 input ``image``, a ``preprocess``
step dividing by 255, the trunk as ``features``, the head, ``tags``), so tagging, embeddings, Grad-CAM and
fine-tuning (``--train --init-from``) use the code every alt-i2v model goes through.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import ImageConfig
from ..errors import AltI2VError
from ..fsutil import read_json_object
from .files import DEEPDANBOORU, ReadyFiles

PROJECT_FILE = "project.json"
TAGS_FILE = "tags.txt"
CATEGORY_FILES = {"general": "tags-general.txt", "character": "tags-character.txt"}
THRESHOLDS = {"general": 0.5, "character": 0.5}  # DeepDanbooru's own evaluate default (--threshold 0.5)
PROJECT_KEYS = ("image_width", "image_height", "model")


def weights_file(root: Path, project: dict[str, Any]) -> Path:
    return root / f"model-{project['model']}.h5"


def read_tag_file(path: Path) -> list[str]:
    """Tags of a DeepDanbooru tag file: one a line, blank lines skipped."""
    try:
        return [t for t in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()) if t]
    except UnicodeDecodeError as e:
        raise AltI2VError(f"{path}: not a UTF-8 text file ({e})") from None


def read_tags(root: Path) -> Any:
    """``tags.txt`` as a Vocab, categories from the per-category files and the ``rating:`` prefix."""
    from ..data.vocab import Vocab

    names = read_tag_file(root / TAGS_FILE)
    if not names:
        raise AltI2VError(f"{root / TAGS_FILE}: no tags")
    repeated = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if repeated:
        raise AltI2VError(f"{root / TAGS_FILE}: tags listed twice: {', '.join(repeated[:5])}")
    category: dict[str, str] = {}
    for cat, file in CATEGORY_FILES.items():
        if (root / file).is_file():
            for t in read_tag_file(root / file):
                category.setdefault(t, cat)
    tags = []
    for n in names:
        cat = "rating" if n.startswith("rating:") else category.get(n, "meta" if ":" in n and
                                                                    n.split(":")[0] == "score" else "general")
        tags.append({"name": n, "category": cat, "count": 0})
    order = ["general", "character", "meta", "rating"]
    present = {t["category"] for t in tags}
    return Vocab(tags=tags, categories=[c for c in order if c in present])


def read_project(path: str | os.PathLike) -> ReadyFiles:
    """A DeepDanbooru project: project.json (checked: image_width, image_height, model), the tags and the
    weights file it names."""
    root = Path(path)
    project = read_json_object(root / PROJECT_FILE, "DeepDanbooru project.json")
    lacking = [k for k in PROJECT_KEYS if k not in project]
    if lacking:
        raise AltI2VError(f"{root / PROJECT_FILE}: no {', '.join(lacking)} (a DeepDanbooru project.json has "
                          "image_width, image_height, database_path, minimum_tag_count, model, ...)")
    width, height = project["image_width"], project["image_height"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise AltI2VError(f"{root / PROJECT_FILE}: image_width and image_height must be positive integers, "
                          f"got {width!r} x {height!r}")
    if width != height:
        raise AltI2VError(f"{root / PROJECT_FILE}: {width}x{height} input; alt-i2v feeds square images, so only "
                          "projects with image_width == image_height are supported")
    weights = weights_file(root, project)
    if not weights.is_file():
        others = sorted(p.name for p in root.glob("model-*.h5"))
        raise AltI2VError(f"{weights}: missing; project.json names the model {project['model']!r}" +
                          (f" (the project holds {', '.join(others)}: set \"model\" to match)" if others else ""))
    vocab = read_tags(root)
    return ReadyFiles(family=DEEPDANBOORU, root=root, vocab=vocab,
                      image=ImageConfig(image_size=int(width), resize="pad"), weights=weights,
                      thresholds=dict(THRESHOLDS), info={"project": project}, load=_load_runner)


def load_network(files: ReadyFiles) -> Any:
    """The project's Keras network as saved (RGB [0, 1] input), uncompiled."""
    import keras

    try:
        model = keras.saving.load_model(files.weights, compile=False)
    except Exception as e:  # noqa: BLE001 - truncated h5, foreign file, layers Keras 3 cannot read
        raise AltI2VError(f"{files.weights}: cannot load the Keras model ({type(e).__name__}: {e})") from None
    n_out = int(model.outputs[0].shape[-1])
    if n_out != len(files.vocab):
        raise AltI2VError(f"{files.weights}: the network gives {n_out} outputs per image but tags.txt lists "
                          f"{len(files.vocab)} tags; the weights and tags.txt come from different projects")
    return model


def find_head(model: Any) -> tuple[Any, list[Any]]:
    """``(head layer, layers after it)``: the Dense or Conv2D making one value per tag, walking back from the
    output through activations, pooling and reshapes; the layers after it are applied in order."""
    from keras import layers

    num_tags = int(model.outputs[0].shape[-1])
    after: list[Any] = []
    tensor = model.outputs[0]
    for _ in range(32):
        layer = tensor._keras_history.operation
        width = getattr(layer, "units", None) or getattr(layer, "filters", None)
        if isinstance(layer, (layers.Dense, layers.Conv2D)) and width == num_tags:
            return layer, after[::-1]
        if not isinstance(layer, (layers.Activation, layers.GlobalAveragePooling2D, layers.Flatten,
                                  layers.Reshape, layers.BatchNormalization, layers.GlobalMaxPooling2D)):
            break
        after.append(layer)
        tensor = layer.input
    raise AltI2VError(f"{model.name}: cannot find the tag head (a Dense or 1x1 Conv2D with one unit per tag "
                      "before the output), so the network cannot be split into trunk and head")


def _trunk_at(trunk: Any, size: int) -> Any:
    """``trunk`` taking ``size`` x ``size`` images: itself, or a copy with the same weights built for that
    size (a fully convolutional trunk works at any size)."""
    import keras

    if tuple(trunk.inputs[0].shape[1:3]) in ((size, size), (None, None)):
        return trunk
    clone = keras.models.clone_model(trunk, input_tensors=[keras.Input((size, size, 3))])
    clone.set_weights(trunk.get_weights())
    return clone


def wrap(network: Any, *, image_size: int | None = None, head: Any = None, name: str = "deepdanbooru") -> Any:
    """The network as an alt-i2v model: ``image`` (uint8 0-255) -> ``preprocess`` (/255) -> ``trunk`` (up to
    the head's input) -> ``features`` (that feature map, named) -> head -> ``tags``. ``head`` replaces the
    network's own head layer (one for another vocabulary); ``image_size`` builds the trunk for another
    input size."""
    import keras
    from keras import layers

    own_head, after = find_head(network)
    size = int(image_size or network.inputs[0].shape[1])
    trunk = _trunk_at(keras.Model(network.inputs, own_head.input, name="trunk"), size)
    if trunk.name != "trunk":
        trunk = keras.Model(trunk.inputs, trunk.outputs, name="trunk")
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255.0, name="preprocess")(inputs)
    x = layers.Identity(name="features")(trunk(x))  # the named feature map: embeddings and Grad-CAM
    own = head is None
    if own:  # the network's own head, copied: every layer after the trunk is called once, here
        head = own_head.__class__.from_config({**own_head.get_config(), "name": "tag_head"})
        head.build(tuple(own_head.input.shape))
        head.set_weights(own_head.get_weights())
    x = head(x)
    for i, layer in enumerate(after):
        last = i == len(after) - 1
        copy = layer.__class__.from_config({**layer.get_config(), "name": "tags" if last else layer.name})
        if layer.weights and own:  # e.g. a per-tag BatchNormalization: its values fit the own head only
            copy.build(tuple(layer.input.shape))
            copy.set_weights(layer.get_weights())
        x = copy(x)
    if not after:
        x = layers.Activation("linear", dtype="float32", name="tags")(x)
    return keras.Model(inputs, x, name=name)


def remapped_head(network: Any, names: Sequence[str], new_names: Sequence[str]) -> tuple[Any, int]:
    """A head layer for ``new_names``: a copy of the network's head whose units for tags it already knows
    keep their weights, the others freshly initialised. Returns ``(layer, tags kept)``."""
    head, _ = find_head(network)
    cfg = head.get_config()
    cfg["name"] = "tag_head"
    if "units" in cfg:
        cfg["units"] = len(new_names)
    else:
        cfg["filters"] = len(new_names)
    layer = head.__class__.from_config(cfg)
    layer.build(tuple(head.input.shape))
    old = [np.asarray(w) for w in head.get_weights()]
    new = [np.asarray(w).copy() for w in layer.get_weights()]
    index = {n: i for i, n in enumerate(names)}
    kept = [(j, index[n]) for j, n in enumerate(new_names) if n in index]
    for o, w in zip(old, new):
        for j, i in kept:
            w[..., j] = o[..., i]
    layer.set_weights(new)
    return layer, len(kept)


def check_project(path: str | os.PathLike) -> str:
    """``path`` as an absolute path if it is a DeepDanbooru project (every file there), else the error
    naming what is missing; for ``--train --init-from``."""
    from .files import detect

    if detect(path) != DEEPDANBOORU:
        raise AltI2VError(f"{path}: --init-from takes a DeepDanbooru project (project.json, tags.txt, "
                          "model-<model>.h5), not an alt-i2v model directory or a WD14 folder")
    return str(Path(path).resolve())


def build_from_project(project: str | os.PathLike, num_tags: int, image_size: int, *,
                       tag_names: Sequence[str] | None = None, frozen: int = 0) -> Any:
    """An alt-i2v model started from a DeepDanbooru project, for ``num_tags`` tags at ``image_size``: the
    project's trunk and weights, and a head for the new vocabulary where tags the project knows keep their
    head weights (``tag_names`` given), new ones start fresh. ``frozen`` freezes the trunk's first layers."""
    files = read_project(project)
    network = load_network(files)
    if tag_names is not None:
        if len(tag_names) != num_tags:
            raise AltI2VError(f"{len(tag_names)} tag names for {num_tags} tags")
        head, _ = remapped_head(network, files.vocab.names, list(tag_names))
    else:  # the architecture only (its weights come from a checkpoint): every unit fresh
        head, _ = remapped_head(network, [], [str(i) for i in range(num_tags)])
    model = wrap(network, image_size=image_size, head=head, name="alt_i2v_deepdanbooru")
    trunk = model.get_layer("trunk")
    for layer in trunk.layers[:max(0, int(frozen or 0))]:
        layer.trainable = False
    return model


def tags_kept(project: str | os.PathLike, tag_names: Sequence[str]) -> int:
    """How many of ``tag_names`` the project's head already knows."""
    known = set(read_tag_file(Path(project) / TAGS_FILE))
    return sum(1 for t in tag_names if t in known)


def _load_runner(files: ReadyFiles, **_: Any) -> Any:
    return wrap(load_network(files), image_size=files.image.image_size)


__all__ = ["read_project", "read_tags", "load_network", "wrap", "find_head", "remapped_head", "build_from_project",
           "check_project", "tags_kept", "PROJECT_FILE",
           "TAGS_FILE", "CATEGORY_FILES", "THRESHOLDS"]
