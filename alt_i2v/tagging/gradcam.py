"""Grad-CAM heat maps (``--explain``): where in a picture the evidence for a tag lies.

Grad-CAM (Selvaraju et al. 2017) weights each channel of the model's last spatial feature map by the mean
gradient of the tag's logit over it, keeps the positive sum and scales it to [0, 1]. The feature map is
found from the model graph (the last 4-D output with a spatial extent before the tag layer), so every
backbone works; the gradient is the one backend-specific step, in :func:`_logit_gradients`.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import AltI2VError, ImageLoadError, UsageError

DEFAULT_TOP_K = 3
PANEL = 320  # pixels of the long side of each half of a written heat-map picture

_explainers: "weakref.WeakKeyDictionary[Any, Explainer]" = weakref.WeakKeyDictionary()
_explainers_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------------------
# The model split: image -> feature map (body), feature map -> tag logits (head)


def feature_layer(model: Any) -> Any:
    """The layer whose output is the model's last spatial feature map: the last layer of the graph, after
    the first one with weights and before the output, whose output is 4-D (N, H, W, C) with H, W > 1.
    Nested backbones count as one layer (their output is their last feature map), so no layer name of any
    backbone is assumed."""
    out_layer = model.layers[-1]
    named = next((layer for layer in model.layers if layer.name == "features"), None)
    if named is not None and len(named.output.shape) == 4 and (named.output.shape[1] or 2) > 1:
        return named  # the feature map the head reads (alt-i2v's per-position Dense, a DeepDanbooru trunk)
    found, learned = None, False
    for layer in model.layers[:-1]:
        learned = learned or bool(layer.weights)  # input and preprocessing maps are not features
        if not learned:
            continue
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):  # a layer used several times has no single output
            continue
        if len(shape) == 4 and (shape[1] or 2) > 1 and (shape[2] or 2) > 1:
            found = layer
    if found is None:
        raise AltI2VError(f"{model.name}: no spatial feature map (a 4-D output wider than 1x1) before "
                          f"{out_layer.name}; Grad-CAM needs one (a backbone at a larger --image-size has it)")
    return found


def _split(model: Any, layer: Any) -> tuple[Any, Any, Any]:
    """``(body, head, kernel_bias)``: body maps images to the feature map, head maps it to what the output
    layer receives; kernel_bias is the output Dense's (kernel, bias) so logits are taken before the sigmoid
    (a saturated probability has no gradient), ``"sigmoid"`` when the output layer is a sigmoid Activation
    (the head then ends at its input, the logits), or None otherwise."""
    import keras

    out_layer = model.layers[-1]
    body = keras.Model(model.inputs[0], layer.output, name="explain_body")
    if isinstance(out_layer, keras.layers.Dense):
        head = keras.Model(layer.output, out_layer.input, name="explain_head")
        return body, head, (out_layer.kernel, out_layer.bias)
    if isinstance(out_layer, keras.layers.Activation) and out_layer.get_config().get("activation") == "sigmoid":
        return body, keras.Model(layer.output, out_layer.input, name="explain_head"), "sigmoid"
    return body, keras.Model(layer.output, model.outputs[0], name="explain_head"), None


def _logit_gradients(score: Any, fmap: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d sum(score(fmap) * onehot) / d fmap, score(fmap))`` as NumPy arrays: the only step that
    differs per backend (tf.GradientTape, jax.grad, torch autograd)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(fmap)
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = score(x)
            target = tf.reduce_sum(z * onehot)
        return tape.gradient(target, x).numpy(), z.numpy()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def f(a):
            z = score(a)
            return jnp.sum(z * onehot), z

        (_, z), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(fmap))
        return np.asarray(g), np.asarray(z)
    if backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(fmap).detach().requires_grad_(True)
        z = score(x)
        (g,) = torch.autograd.grad((z * torch.as_tensor(onehot, device=z.device)).sum(), x)
        return g.detach().cpu().numpy(), z.detach().cpu().numpy()
    raise AltI2VError(f"Grad-CAM is not implemented for the {backend} backend (tensorflow, jax, torch are)")


class Explainer:
    """Grad-CAM of one loaded :class:`~alt_i2v.tagging.tagger.Tagger`, split once at its last feature map."""

    def __init__(self, tagger: Any, layer: str | None = None):
        model = tagger.model
        if model is None:
            raise AltI2VError(f"{tagger.model_dir}: Grad-CAM needs gradients through a Keras model; this is a "
                              f"{getattr(tagger, 'family', 'non-Keras')} model run by onnxruntime, which gives "
                              "none (--explain works with alt-i2v models and DeepDanbooru projects)")
        self.tagger = tagger
        self.layer = model.get_layer(layer) if layer else feature_layer(model)
        self.body, self.head, self._dense = _split(model, self.layer)
        self._lock = threading.Lock()

    def _score(self, fmap: Any) -> Any:
        """Tag logits (pre-sigmoid) of a feature map, in backend tensors."""
        from keras import ops

        h = self.head(fmap, training=False)
        if self._dense is None or isinstance(self._dense, str):
            return h
        kernel, bias = self._dense
        z = ops.matmul(ops.cast(h, "float32"), ops.cast(kernel, "float32"))
        return z + ops.cast(bias, "float32") if bias is not None else z

    def cams(self, image: np.ndarray, indices: Sequence[int] | None = None, top_k: int = 1
             ) -> tuple[np.ndarray, list[int], np.ndarray]:
        """Grad-CAM maps (K, h, w) in [0, 1] at the feature map's resolution for the tag ``indices`` (None:
        the ``top_k`` most probable), those indices, and the image's probabilities (T,). ``image`` is a
        loaded uint8 (S, S, 3) model input. The maps are of the picture as given; the probabilities (and so
        the top tags) are what the tagger predicts, the mean with the mirror image for a ``flip`` model."""
        from keras import ops

        averaged = None
        if self.tagger.predictor is not self.tagger.model:
            averaged = self.tagger.probabilities_of_arrays(image[None])[0]
        with self._lock:
            fmap = ops.convert_to_numpy(self.body(image[None], training=False)).astype(np.float32)
            if indices is None:
                logits = averaged if averaged is not None else \
                    ops.convert_to_numpy(self._score(ops.convert_to_tensor(fmap)))[0]
                indices = [int(i) for i in np.argsort(-logits, kind="stable")[:top_k]]
            k = len(indices)
            onehot = np.zeros((k, len(self.tagger.vocab)), np.float32)
            onehot[np.arange(k), list(indices)] = 1.0
            maps = np.repeat(fmap, k, axis=0)
            grads, logits = _logit_gradients(self._score, maps, onehot)
        weights = grads.mean(axis=(1, 2))  # (K, C): how much each channel raises the tag
        cam = np.maximum(np.einsum("khwc,kc->khw", maps, weights), 0.0)
        peak = cam.max(axis=(1, 2), keepdims=True)
        cam = np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)
        z = logits[0].astype(np.float64)
        probs = 1.0 / (1.0 + np.exp(-z)) if self._dense is not None else z  # Dense or sigmoid: logits
        return cam, list(indices), (averaged if averaged is not None else probs).astype(np.float32)


def get_explainer(tagger: Any) -> Explainer:
    """The Explainer of ``tagger``, built once and kept as long as the tagger lives."""
    with _explainers_lock:
        ex = _explainers.get(tagger)
        if ex is None:
            ex = _explainers[tagger] = Explainer(tagger)
        return ex


# ---------------------------------------------------------------------------------------------------------
# From the model's square back to the picture


def _resize_map(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(cam.astype(np.float32), "F").resize((width, height), Image.Resampling.BILINEAR))


def to_picture(cam: np.ndarray, width: int, height: int, image_config: Any) -> np.ndarray:
    """A map over the model's input square as an (height, width) map over the picture it came from,
    undoing the pad / stretch / crop of loading (a cropped-away border gets 0: the model never saw it),
    scaled so its peak is 1 (all 0 when nothing in the picture raises the tag)."""
    from ..data.imaging import fit_geometry

    size = int(image_config.image_size)
    square = _resize_map(cam, size, size)
    nw, nh, dx, dy = fit_geometry(width, height, size, image_config.resize)
    if image_config.resize in ("pad", "square"):
        region = square[dy:dy + nh, dx:dx + nw]
    elif image_config.resize == "crop":
        region = np.zeros((nh, nw), np.float32)
        region[dy:dy + size, dx:dx + size] = square
    else:
        region = square
    out = np.clip(_resize_map(region, width, height), 0.0, None)
    peak = float(out.max()) if out.size else 0.0
    return (out / peak if peak > 0 else out).astype(np.float32)  # interpolation lowers the peak: 1 again


# ---------------------------------------------------------------------------------------------------------
# Public function


def _tag_indices(tagger: Any, tags: Sequence[str]) -> list[int]:
    index = tagger.vocab.index
    unknown = [t for t in tags if t not in index]
    if unknown:
        raise UsageError(f"tags {unknown} are not in this model's vocabulary ({len(index)} tags, e.g. "
                         f"{', '.join(list(index)[:5])})")
    return [index[t] for t in tags]


def explain(image: Any, tag: str | None = None, model: Any = None) -> np.ndarray:
    """Grad-CAM heat map of ``tag`` on ``image``: an (H, W) float32 array in [0, 1] at the picture's own
    size (1 = strongest evidence). ``image``: a path, bytes, PIL image or array (as ``predict_tags``);
    ``tag`` None = the most probable tag; ``model``: a model directory (loaded once and cached) or a
    loaded :class:`~alt_i2v.tagging.tagger.Tagger`."""
    from ..data.imaging import load_image_config, open_rgb
    from .tagger import get_tagger

    tagger = get_tagger(model)
    x = load_image_config(image, tagger.image_config)
    width, height = open_rgb(image, tagger.image_config).size
    cam, _, _ = get_explainer(tagger).cams(x, None if tag is None else _tag_indices(tagger, [tag]))
    return to_picture(cam[0], width, height, tagger.image_config)


# ---------------------------------------------------------------------------------------------------------
# Pictures for people: image | overlay, tag and probability written in


def colorize(heat: np.ndarray) -> np.ndarray:
    """A [0, 1] map as uint8 RGB (matplotlib's "jet": blue = none, red = strongest)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def render(picture: Image.Image, heat: np.ndarray, tag: str, prob: float, alpha: float = 0.45) -> Image.Image:
    """Side by side: the picture and the heat map laid over it, with ``tag`` and its probability above."""
    from PIL import ImageDraw, ImageFont

    w, h = picture.size
    scale = PANEL / max(w, h)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.Resampling.NEAREST if scale > 2 else Image.Resampling.LANCZOS
    shown = picture.resize((pw, ph), resample)
    color = Image.fromarray(colorize(_resize_map(heat, pw, ph)), "RGB")
    overlay = Image.blend(shown, color, alpha)
    strip = 28
    canvas = Image.new("RGB", (2 * pw + 8, ph + strip), (255, 255, 255))
    canvas.paste(shown, (0, strip))
    canvas.paste(overlay, (pw + 8, strip))
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        font = ImageFont.load_default()
    ImageDraw.Draw(canvas).text((6, 5), f"{tag}  p={prob:.3f}", fill=(0, 0, 0), font=font)
    return canvas


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.()+-]+", "_", text).strip("._") or "tag"


@dataclass
class ExplainResult:
    """What :func:`explain_images` wrote: one row per (image, tag), and the images it could not read."""

    out_dir: Path
    written: list[dict[str, Any]] = field(default_factory=list)  # {"file", "tag", "probability", "png"}
    failed: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason", "error"}
    images: int = 0

    def summary(self) -> dict[str, Any]:
        rows: dict[str, Any] = {"images": self.images, "heat maps written": len(self.written),
                                "failed": len(self.failed), "out": str(self.out_dir)}
        if self.failed:
            rows["first failure"] = self.failed[0]["error"]
        return rows


def explain_images(files: Sequence[str | os.PathLike], model: Any, out_dir: str | os.PathLike, *,
                   tags: Sequence[str] | None = None, top_k: int = DEFAULT_TOP_K, quiet: bool = False,
                   roots: Sequence[str | os.PathLike] = ()) -> ExplainResult:
    """Write ``OUT/<image name>.<tag>.png`` (picture | heat-map overlay, tag and probability in it) for
    each file and each of ``tags`` (or its ``top_k`` most probable tags). ``roots``: folders the files
    were found in, whose relative paths name the pictures (``a/b.jpg`` -> ``a/b.<tag>.png``). A file
    that cannot be read is reported and skipped."""
    from ..fsutil import atomic_path
    from ..data.imaging import load_image_config, open_rgb
    from ..progress import bar
    from .tagger import get_tagger

    if top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    tagger = get_tagger(model)
    fixed = _tag_indices(tagger, list(tags)) if tags else None
    explainer = get_explainer(tagger)
    out = Path(out_dir)
    result = ExplainResult(out_dir=out, images=len(files))
    used: set[str] = set()
    root_paths = [Path(r).resolve() for r in roots]
    progress = bar(total=len(files), desc="explain", unit="img", quiet=quiet)
    try:
        for file in files:
            progress.update(1)
            try:
                x = load_image_config(file, tagger.image_config)
                picture = open_rgb(file, tagger.image_config)
            except ImageLoadError as e:
                result.failed.append({"file": str(file), "reason": e.reason, "error": str(e)})
                continue
            cams, indices, probs = explainer.cams(x, fixed, top_k)
            stem = _picture_stem(Path(file), root_paths, used)
            for cam, i in zip(cams, indices):
                name = tagger.vocab.names[i]
                heat = to_picture(cam, picture.width, picture.height, tagger.image_config)
                png = out / f"{stem}.{_safe_name(name)}.png"
                with atomic_path(png, keep_suffix=True) as tmp:
                    render(picture, heat, name, float(probs[i])).save(tmp, "PNG")
                result.written.append({"file": str(file), "tag": name, "probability": float(probs[i]),
                                       "png": str(png)})
    finally:
        progress.close()
    return result


def _picture_stem(file: Path, roots: Sequence[Path], used: set[str]) -> str:
    """The output name of a picture: its path under the folder it was found in (else its name) without
    the extension; a clash gets ``-2``, ``-3``... so no picture overwrites another's maps."""
    resolved = file.resolve()
    stem = file.stem
    for root in roots:
        if root in resolved.parents:
            stem = resolved.relative_to(root).with_suffix("").as_posix()
            break
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}"
    used.add(candidate)
    return candidate


__all__ = ["explain", "explain_images", "Explainer", "ExplainResult", "feature_layer", "get_explainer",
           "to_picture", "render", "colorize", "DEFAULT_TOP_K"]
