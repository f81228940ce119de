"""explain.py: Grad-CAM maps peak on the tagged object (TensorFlow, JAX and torch backends), differ per
tag, come back at the picture's size for every input kind, work for other backbones, and --explain."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from _located import SIZE, located_image, located_model
from alt_i2v.cli import main
from alt_i2v.config import ImageConfig
from alt_i2v.errors import UsageError
from alt_i2v.tagging.gradcam import Explainer, explain, feature_layer, to_picture

ROOT = Path(__file__).resolve().parent.parent
N_PICTURES = 16  # pictures of two objects each: 32 maps
MARGIN = 2  # pixels around an object's box that still count as on it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return located_model(tmp_path_factory)


def _hit(heat: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return box[0] - MARGIN <= x <= box[2] + MARGIN and box[1] - MARGIN <= y <= box[3] + MARGIN


def _chance(boxes: list[tuple[int, int, int, int]]) -> float:
    """Share of the picture a uniformly random peak would land on."""
    return float(np.mean([min(SIZE, b[2] - b[0] + 1 + 2 * MARGIN) * min(SIZE, b[3] - b[1] + 1 + 2 * MARGIN)
                          / SIZE ** 2 for b in boxes]))


def _pictures(seed: int = 99, n: int = N_PICTURES) -> list[tuple[Image.Image, dict]]:
    rng = np.random.default_rng(seed)
    return [located_image(rng, n_objects=2) for _ in range(n)]


# The same check, run here (TensorFlow) and in subprocesses under the other backends.
_CHECK = """
import json, sys
import numpy as np
from _located import located_image
from alt_i2v import explain
rng = np.random.default_rng({seed})
maps = []
for _ in range({n}):
    img, boxes = located_image(rng, n_objects=2)
    maps.append([explain(img, tag=t, model={model!r}).tolist() for t in sorted(boxes)])
print("MAPS" + json.dumps(maps))
"""


def _maps_under(backend: str, model_dir: Path, seed: int, n: int) -> np.ndarray:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    code = _CHECK.format(seed=seed, n=n, model=str(model_dir))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MAPS"))
    return np.asarray(json.loads(line[4:]), np.float32)


def _check_localisation(maps: np.ndarray, pictures: list) -> None:
    hits, boxes_all = 0, []
    for (img, boxes), pair in zip(pictures, maps):
        tags = sorted(boxes)
        for tag, heat in zip(tags, pair):
            assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
            assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() == pytest.approx(1.0)
            hits += _hit(heat, boxes[tag])
            boxes_all.append(boxes[tag])
        # the two tags of one picture: different maps, each peaking on its own object, not the other's
        a, b = pair
        assert np.abs(a - b).mean() > 0.05
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.5
    rate, chance = hits / len(boxes_all), _chance(boxes_all)
    assert rate >= 0.8 and rate >= 4 * chance, f"peak on the object in {rate:.0%} of maps (chance {chance:.0%})"


def test_heat_map_peaks_on_the_tagged_object_and_differs_per_tag(model_dir):
    pictures = _pictures()
    maps = np.asarray([[explain(img, tag=t, model=model_dir) for t in sorted(boxes)] for img, boxes in pictures])
    _check_localisation(maps, pictures)
    # a peak elsewhere than the object would count as a miss: the other object's map misses this one
    misses = sum(_hit(pair[1], boxes[sorted(boxes)[0]]) for (_, boxes), pair in zip(pictures, maps))
    assert misses <= len(pictures) // 4


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_heat_map_localises_under_other_backends(model_dir, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install {backend})")
    n = 8
    pictures = _pictures(seed=5, n=n)
    maps = _maps_under(backend, model_dir, seed=5, n=n)
    _check_localisation(maps, pictures)
    ours = np.asarray([[explain(img, tag=t, model=model_dir) for t in sorted(boxes)] for img, boxes in pictures])
    assert np.abs(maps - ours).max() < 1e-3  # the same gradients as TensorFlow's


def test_explain_takes_every_input_kind_and_answers_at_the_pictures_size(model_dir, tmp_path):
    from alt_i2v.tagging.tagger import Tagger

    img, boxes = located_image(np.random.default_rng(7), n_objects=2)
    wide = Image.new("RGB", (96, SIZE), (255, 255, 255))
    wide.paste(img, (24, 0))  # padded back to a square when loaded: the map must undo it
    path = tmp_path / "wide.png"
    wide.save(path)
    tagger = Tagger(model_dir)
    tag = sorted(boxes)[0]
    ref = explain(path, tag=tag, model=tagger)
    assert ref.shape == (SIZE, 96) and ref.dtype == np.float32
    for source in (str(path), path.read_bytes(), wide, np.asarray(wide)):
        assert np.allclose(explain(source, tag=tag, model=model_dir), ref, atol=1e-5)
    x0, y0, x1, y1 = boxes[tag]
    assert _hit(ref, (x0 + 24, y0, x1 + 24, y1))
    top = next(iter(tagger.predict_tags(path, threshold=0.0)))
    assert np.allclose(explain(path, model=tagger), explain(path, tag=top, model=tagger))
    with pytest.raises(UsageError, match="not in this model's vocabulary"):
        explain(path, tag="no_such_tag", model=tagger)


@pytest.mark.parametrize("resize", ["pad", "crop", "stretch"])
def test_square_maps_go_back_to_the_pictures_geometry(resize):
    cfg = ImageConfig(image_size=32, resize=resize)
    width, height = 80, 40
    square = np.zeros((32, 32), np.float32)
    if resize == "pad":  # the picture fills rows 8..23 of the square; light up its left half
        square[8:24, :16] = 1.0
    elif resize == "crop":  # the square is the picture's middle 40 of 80 columns: light it all
        square[:] = 1.0
    else:
        square[:, :16] = 1.0
    out = to_picture(square, width, height, cfg)
    assert out.shape == (height, width)
    if resize == "crop":
        assert out[:, 25:55].min() > 0.9 and out[:, :15].max() < 0.1 and out[:, 65:].max() < 0.1
    else:
        assert out[:, :35].min() > 0.9 and out[:, 45:].max() < 0.1


@pytest.fixture
def fresh_names():
    """Layers these tests build take Keras' automatic names (input_layer, ...): give the counters back."""
    import keras

    yield
    keras.backend.clear_session()


@pytest.mark.parametrize("backbone", ["vgg16", "mobilenet_v2", "resnet50"])
def test_feature_map_is_found_from_the_graph_of_any_backbone(backbone, fresh_names):
    from alt_i2v.model.build import build_model

    model = build_model(4, image_size=64, backbone=backbone, weights=None, frozen=0)
    layer = feature_layer(model)
    shape = tuple(layer.output.shape)
    assert len(shape) == 4 and shape[1] > 1 and shape[2] > 1
    tagger = SimpleNamespace(model=model, predictor=model, vocab=["a", "b", "c", "d"])
    cams, indices, probs = Explainer(tagger).cams(np.full((64, 64, 3), 128, np.uint8), [1, 3])
    assert cams.shape == (2, shape[1], shape[2]) and indices == [1, 3]
    assert np.all((cams >= 0) & (cams <= 1)) and probs.shape == (4,)
    assert np.allclose(probs, np.asarray(model.predict_on_batch(np.full((1, 64, 64, 3), 128, np.uint8)))[0],
                       atol=1e-4)


def test_a_model_without_a_spatial_feature_map_gets_a_clear_error(fresh_names):
    from alt_i2v.errors import AltI2VError
    from alt_i2v.model.build import build_model

    model = build_model(4, image_size=32, backbone="vgg16", weights=None, frozen=0)  # 1x1 last map
    with pytest.raises(AltI2VError, match="no spatial feature map"):
        feature_layer(model)


def test_cli_writes_a_picture_per_image_and_tag(model_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(11)
    for name in ("a.png", "sub/a.png", "b.png"):
        located_image(rng, n_objects=2)[0].save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = tmp_path / "maps"
    code = main(["--explain", str(folder), "--model", str(model_dir), "--top-k", "2", "--out", str(out),
                 "--recursive"])
    assert code == 1  # the broken file is reported, the others are done
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(written) == 6
    assert {w.split(".")[0] for w in written} == {"a", "sub/a", "b"}
    with Image.open(out / written[0]) as im:
        assert im.width > im.height > 200
    text = capsys.readouterr()
    assert "heat maps written : 6" in text.out and "broken.png" in text.err

    code = main(["--explain", str(folder / "a.png"), "--model", str(model_dir), "--tag", "red_circle,blue_square",
                 "--out", str(tmp_path / "one"), "--quiet"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["a.blue_square.png", "a.red_circle.png"]
    assert main(["--explain", str(folder / "a.png"), "--model", str(model_dir), "--tag", "nope", "--quiet",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["--explain", str(folder / "a.png"), "--quiet"]) == 2  # no --model


def test_explain_help_shows_an_example(capsys):
    assert main(["--help"]) == 0
    assert "alt-i2v --explain img.jpg" in capsys.readouterr().out


def test_explain_is_the_same_function_however_it_was_imported(model_dir):
    import importlib
    import inspect

    import alt_i2v
    from alt_i2v import explain as public

    module = importlib.import_module("alt_i2v.tagging.gradcam")
    assert inspect.isfunction(public) and public is module.explain is alt_i2v.explain and callable(module.render)
    img, boxes = located_image(np.random.default_rng(4), n_objects=1)
    tag = next(iter(boxes))
    assert np.array_equal(public(img, tag=tag, model=model_dir), explain(img, tag=tag, model=model_dir))
