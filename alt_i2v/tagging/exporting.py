"""Export (``--export``): the tagger as a SavedModel, ONNX or TFLite model that runs without alt-i2v.

Keras' own ``model.export`` writes each format (``tf_saved_model``; ``onnx`` through tf2onnx; ``litert``
through TensorFlow's converter). The export directory also holds ``vocab.json`` and ``thresholds.json``
(copied from the model directory) and ``export.json`` (the input it expects, the tag names and per-tag
thresholds in output order, and the parity result). Right after writing, the export is run by its own
runtime (TensorFlow, onnxruntime, the LiteRT interpreter) on generated pictures and must give the Keras
model's probabilities within 1e-3; otherwise nothing is left at ``--out`` and the command fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import AltI2VError, UsageError

EXPORT_FILE = "export.json"
TOLERANCE = 1e-3
PARITY_IMAGES = 6
EXTRA = 'pip install "alt-i2v[export]"  (from a checkout: pip install ".[export]")'
# format: (Keras export format, file or folder name in OUT, modules it needs beyond TensorFlow)
FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "savedmodel": ("tf_saved_model", "saved_model", ()),
    "onnx": ("onnx", "model.onnx", ("onnx", "tf2onnx", "onnxruntime")),
    "tflite": ("litert", "model.tflite", ("ai_edge_litert",)),
}


class ExportParityError(AltI2VError):
    """The exported model's probabilities differ from the Keras model's by more than the tolerance."""


@dataclass
class ExportResult:
    format: str
    out_dir: Path
    model_file: Path
    max_abs_diff: float
    runtime: str
    images: int
    seconds: float
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"format": self.format, "model": str(self.model_file), "beside it": ", ".join(self.files),
                "parity": f"max |p - p_keras| = {self.max_abs_diff:.2e} on {self.images} generated images "
                          f"({self.runtime}; tolerance {TOLERANCE:g})",
                "seconds": round(self.seconds, 1)}


def missing_packages(fmt: str) -> list[str]:
    """The modules ``fmt`` needs that are not installed (pip names)."""
    return [m.replace("_", "-") for m in FORMATS[fmt][2] if importlib.util.find_spec(m) is None]


def check_format(fmt: str) -> None:
    """Raise a clear error for an unknown format, a backend that cannot export, or a missing extra."""
    import keras

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    missing = missing_packages(fmt)
    if missing:
        raise AltI2VError(f"exporting to {fmt} needs {', '.join(missing)}, from the optional 'export' extra: "
                          f"{EXTRA}")
    if keras.backend.backend() != "tensorflow":
        raise AltI2VError(f"export runs under the TensorFlow backend (KERAS_BACKEND={keras.backend.backend()} is "
                          "set); run it with KERAS_BACKEND=tensorflow, the model itself works under any backend")


# ---------------------------------------------------------------------------------------------------------
# Runtimes: each loads an export and returns probabilities (N, T) of uint8 images (N, S, S, 3)


def _run_savedmodel(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return (lambda x: np.asarray(loaded.serve(tf.constant(x)))), f"TensorFlow {tf.__version__}"


def _run_onnx(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), f"onnxruntime {ort.__version__}"


def _run_tflite(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    from ai_edge_litert import interpreter as litert

    interp = litert.Interpreter(model_path=str(path))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(x: np.ndarray) -> np.ndarray:
        interp.resize_tensor_input(inp["index"], list(x.shape))
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out["index"]).copy()

    version = getattr(importlib.import_module("ai_edge_litert"), "__version__", "")
    return run, f"LiteRT interpreter {version}".strip()


RUNTIMES = {"savedmodel": _run_savedmodel, "onnx": _run_onnx, "tflite": _run_tflite}


def parity_images(image_config: Any, n: int = PARITY_IMAGES) -> np.ndarray:
    """``n`` generated illustrations (the demo's drawings) as model inputs (n, S, S, 3) uint8."""
    from ..data.imaging import load_image_config
    from ..data.synthetic import draw_demo_image

    size = int(image_config.image_size)
    return np.stack([load_image_config(draw_demo_image(20240, i, max(16, min(size, 512)))[0], image_config)
                     for i in range(n)])


def check_parity(fmt: str, path: Path, reference: np.ndarray, images: np.ndarray) -> tuple[float, str]:
    """Run the export at ``path`` on ``images``; the largest difference from ``reference`` and the runtime's
    name, or ExportParityError."""
    run, runtime = RUNTIMES[fmt](path)
    got = np.asarray(run(images), np.float32)
    if got.shape != reference.shape:
        raise ExportParityError(f"the {fmt} export answers shape {got.shape}, the Keras model {reference.shape}")
    diff = float(np.max(np.abs(got - reference))) if got.size else 0.0
    if not np.isfinite(diff) or diff > TOLERANCE:
        raise ExportParityError(f"the {fmt} export does not match the Keras model: max |difference| = {diff:.3g} "
                                f"> {TOLERANCE:g} on {len(images)} generated images ({runtime}); nothing was "
                                "written. Report it with the model's config.json; another format may work")
    return diff, runtime


# ---------------------------------------------------------------------------------------------------------
# The export


def _written_by_export(out: Path) -> set[str]:
    """The names an earlier export wrote into ``out`` (its export.json lists them; one written before it
    did: the files any export writes)."""
    from ..fsutil import read_json_object

    meta = read_json_object(out / EXPORT_FILE, "export description")
    files = meta.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files)
    return {EXPORT_FILE, "vocab.json", "thresholds.json"} | {name for _, name, _ in FORMATS.values()}


def _check_out(out: Path) -> Path:
    """``out`` made absolute, after what a killed export of it left is cleared; a UsageError for a folder
    an export must not replace: the current folder or one above it, a file, a folder that is not an
    export, or an export holding files it did not write (they would be deleted with it)."""
    from ..fsutil import OLD_SUFFIX as OLD
    from ..fsutil import stale_temps

    out = out.absolute()
    here = Path.cwd().resolve()
    resolved = out.resolve()
    if not out.name or resolved == here or resolved in here.parents:
        raise UsageError(f"--out {out}: an export is a folder of its own that is replaced whole; give a new "
                         "folder, not the current one or one above it (e.g. --out export)")
    if not out.exists():  # killed between the two renames of a swap: the previous export comes back
        for old in stale_temps(out.parent, out.name + OLD)[:1]:
            os.replace(old, out)
    for stale in stale_temps(out.parent, out.name) + stale_temps(out.parent, out.name + OLD):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_FILE).is_file()):
            raise UsageError(f"--out {out} exists and is not an alt-i2v export; choose a new folder")
        if (out / EXPORT_FILE).is_file():
            foreign = sorted(p.name for p in out.iterdir() if p.name not in _written_by_export(out))
            if foreign:
                raise UsageError(f"--out {out} holds files the export did not write ({', '.join(foreign[:5])}); a new "
                                 "export replaces the folder whole, so move them out first or choose another --out")
    return out


def export(model: Any, out: str | os.PathLike, format: str = "onnx", *, quiet: bool = False) -> ExportResult:
    """Write ``model`` (a model directory or a Tagger) to the folder ``out`` in ``format`` (savedmodel, onnx,
    tflite), with vocab.json, thresholds.json and export.json beside it, then check it: its runtime must
    give the Keras model's probabilities within 1e-3 on generated pictures, else ExportParityError and
    nothing at ``out``. An earlier export at ``out`` is replaced only once the new one has passed."""
    import contextlib
    import io

    from .. import __version__
    from ..fsutil import atomic_dir, atomic_write_json
    from ..model.modeldir import ModelDir
    from ..progress import bar
    from .tagger import get_tagger

    check_format(format)
    t0 = time.perf_counter()
    out = _check_out(Path(out))
    tagger = get_tagger(model)
    if tagger.family != "alt-i2v":
        raise UsageError(f"{tagger.model_dir}: --export writes alt-i2v models; this is a {tagger.family} model "
                         "(a WD14 folder already is ONNX, a DeepDanbooru project already is Keras)")
    keras_format, name, _ = FORMATS[format]
    steps = bar(total=3, desc=f"export {format}", unit="step", quiet=quiet)
    try:
        with atomic_dir(out) as tmp:  # replaces an earlier export only once this one has passed
            images = parity_images(tagger.image_config)
            reference = tagger.probabilities(images)  # also builds the model's call graph, which ONNX needs
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # converters print progress and warn about NumPy/TF internals
                tagger.predictor.export(str(tmp / name), format=keras_format, verbose=False)
            steps.update(1)
            diff, runtime = check_parity(format, tmp / name, reference, images)
            steps.update(1)
            ModelDir(tagger.model_dir).copy_files(tmp)
            cfg = tagger.image_config
            atomic_write_json(tmp / EXPORT_FILE, {
                "format": format, "model": name, "alt_i2v_version": __version__,
                "source_model": {"path": str(tagger.model_dir.resolve()), "sha256": tagger.fingerprint()},
                "input": {"dtype": "uint8", "shape": [None, cfg.image_size, cfg.image_size, 3],
                          "range": "RGB 0-255", "image_size": cfg.image_size, "resize": cfg.resize,
                          "pad_color": list(cfg.pad_color)},
                "output": "sigmoid probabilities (N, T), tag i = tags[i]",
                "tags": list(tagger.vocab.names), "thresholds": [round(float(t), 6) for t in tagger.thresholds],
                "parity": {"images": len(images), "max_abs_diff": diff, "tolerance": TOLERANCE,
                           "runtime": runtime},
                "files": sorted([p.name for p in tmp.iterdir()] + [EXPORT_FILE])})
        steps.update(1)
    finally:
        steps.close()
    files = sorted(p.name for p in out.iterdir() if p.name != name)
    return ExportResult(format=format, out_dir=out, model_file=out / name, max_abs_diff=diff, runtime=runtime,
                        images=len(images), seconds=time.perf_counter() - t0, files=files)


__all__ = ["export", "check_parity", "check_format", "missing_packages", "parity_images", "ExportResult",
           "ExportParityError", "FORMATS", "TOLERANCE", "EXPORT_FILE"]
