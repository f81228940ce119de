"""Folder tagging speed: ``alt-i2v --pred FOLDER`` (threaded decoding of the next batch while the model
runs the current one, one compiled call per batch) against the naive loop: load one image,
``model.predict`` on it, next. Both use the same model, the same loader and the same thresholds, side
by side in one run.

The model is the ``tiny`` backbone (64px, 512 tags, random weights: speed does not depend on them), so
the benchmark runs in well under a minute on 2 cores; the images are illustration-sized JPEGs and PNGs.
The per-call overhead that batching removes matters less for a heavy network: ``--backbone vgg16
--image-size 150 --tags 4096 --images 48`` measures the reference model (a few minutes on 2 cores).

    python scripts/bench_predict.py [--images 160] [--batch-size 64] [--backbone tiny]

The folder case: ``--folder-images N`` (default 384) 512x512 JPEGs tagged by ``--pred FOLDER`` (decoded
by worker processes on 4+ cores) against the model alone on a batch already on the device, and against
``predict_tags`` decoding on threads and in processes. On a GPU, the reference setting (target: ``--pred``
at >= 50% of the model alone)::

    KERAS_BACKEND=jax python scripts/bench_predict.py --backbone vgg16 --image-size 150 --tags 4096 \
        --batch-size 256 --images 48 --folder-images 8192

Result lines: ``RESULT predict speedup=<x> ratio=<x> target=5`` and
``RESULT predict_folder ... ratio=<pred / model alone> target=0.5``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Illustration-like files: 600x800 JPEGs and 512x512 PNGs with shapes and gradients."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        w, h = (600, 800) if i % 2 == 0 else (512, 512)
        grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
        base = np.broadcast_to(grad, (h, w, 3)).astype(np.uint8)
        img = Image.fromarray(np.ascontiguousarray(base))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            d.ellipse((x0, y0, x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 200))),
                      fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = folder / (f"img{i:04d}.jpg" if i % 2 == 0 else f"img{i:04d}.png")
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        files.append(path)
    return files


def make_jpegs(folder: Path, n: int, seed: int = 1) -> list[Path]:
    """``n`` 512x512 illustration-like JPEGs (smooth gradients and shapes, quality 90)."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((512, 512), Image.Resampling.BICUBIC)
        d = ImageDraw.Draw(img)
        x0, y0 = (int(v) for v in rng.integers(0, 400, 2))
        d.ellipse((x0, y0, x0 + 100, y0 + 100), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        files.append(folder / f"j{i:05d}.jpg")
        img.save(files[-1], quality=90)
    return files


def folder_case(tmp: Path, n: int, batch_size: int) -> dict[str, float]:
    """``--pred FOLDER`` over ``n`` 512px JPEGs vs the model alone vs decoding on threads (img/s)."""
    import keras

    import alt_i2v.tagging.tagger as tagger_module
    from alt_i2v.cli import main as cli_main
    from alt_i2v.config import resolve_workers
    from alt_i2v.tagging.tagger import Tagger

    folder = tmp / "jpegs512"
    folder.mkdir()
    files = [str(f) for f in make_jpegs(folder, n)]
    make_model_dir(tmp / "model150", 512, 150)  # the reference image size: 512px JPEGs decoded to 150px
    tagger = Tagger(tmp / "model150", batch_size=batch_size)
    size = tagger.image_config.image_size
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3))
                                    .astype(np.uint8))
    for _ in range(2):
        np.asarray(tagger.model.predict_on_batch(x))
    steps = max(3, min(30, n // batch_size))
    t = time.perf_counter()
    for _ in range(steps):
        out = tagger.model.predict_on_batch(x)
    np.asarray(out)
    alone = batch_size * steps / (time.perf_counter() - t)

    limit = tagger_module.PROCESS_DECODE_MIN
    tagger_module.PROCESS_DECODE_MIN = n + 1  # threads only
    try:
        t = time.perf_counter()
        tagger.predict_tags(files)
        threads = n / (time.perf_counter() - t)
    finally:
        tagger_module.PROCESS_DECODE_MIN = limit
    cli_args = ["--pred", str(folder), "--model", str(tmp / "model150"), "--format", "json", "--quiet",
                "--batch-size", str(batch_size)]
    workers = tagger_module.PROCESS_DECODE_WORKERS
    tagger_module.PROCESS_DECODE_WORKERS = 2  # processes even on 2-3 cores, to compare
    try:
        t = time.perf_counter()
        tagger.predict_tags(files)  # more than PROCESS_DECODE_MIN files: decoding processes
        procs = n / (time.perf_counter() - t)
    finally:
        tagger_module.PROCESS_DECODE_WORKERS = workers
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(cli_args)  # load the CLI's cached Tagger (model loading is not what is measured)
        t = time.perf_counter()
        rc = rc or cli_main(cli_args)
        pred = n / (time.perf_counter() - t)
    if rc != 0:
        raise SystemExit(f"alt-i2v --pred failed with exit code {rc}")
    print(f"folder of {n} 512x512 JPEGs -> {size}px, batch {batch_size}, {resolve_workers(0)} cores:")
    print(f"  model alone (batch already a tensor)   : {alone:8.1f} img/s")
    print(f"  predict_tags, decoding on threads      : {threads:8.1f} img/s")
    print(f"  predict_tags, decoding processes       : {procs:8.1f} img/s")
    how = "processes" if resolve_workers(0) >= tagger_module.PROCESS_DECODE_WORKERS else "threads"
    print(f"  alt-i2v --pred FOLDER ({how:9s})       : {pred:8.1f} img/s ({pred / alone:.0%} of the model)")
    return {"pred": pred, "alone": alone, "threads": threads, "processes": procs}


def _on_gpu() -> bool:
    from alt_i2v.training.optim import has_accelerator

    return has_accelerator()


def make_model_dir(model_dir: Path, num_tags: int, image_size: int, backbone: str = "tiny") -> None:
    """A model directory in the documented format (docs/formats.md) around an untrained model."""
    from alt_i2v.config import ImageConfig, ModelConfig
    from alt_i2v.data.vocab import Vocab
    from alt_i2v.model.backbones import resolve_config
    from alt_i2v.model.build import build_model, embedding_dim
    from alt_i2v.model.modeldir import ModelDir, config_record
    from alt_i2v.model.thresholds import uniform_thresholds

    vocab = Vocab(tags=[{"name": f"tag_{i:04d}", "category": "general", "count": num_tags - i}
                        for i in range(num_tags)])
    # tta none: the network runs once per picture, so the pipeline is measured against the same network
    # (a flip model runs it twice on every path alike)
    config = resolve_config(ModelConfig(num_tags=num_tags, image_size=image_size, backbone=backbone, weights=None,
                                        frozen=0, tta="none"))
    model = build_model(config=config)
    md = ModelDir(model_dir).create()
    md.write_model(model)
    md.write_vocab(vocab)
    md.write_config(config_record(config, None, ImageConfig(image_size=image_size), vocab,
                                  embedding_dim(model)))
    md.write_thresholds(uniform_thresholds(0.5))


def naive(files: list[Path], model, cfg, names: list[str], thr: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """The loop the issue compares with: one image at a time through model.predict."""
    from alt_i2v.data.imaging import load_image_config

    out, probs = [], []
    for f in files:
        x = load_image_config(f, cfg)
        p = model.predict(x[None], verbose=0)[0]
        idx = np.flatnonzero(p >= thr)
        out.append({names[i]: float(p[i]) for i in idx[np.argsort(-p[idx])]})
        probs.append(p)
    return out, np.stack(probs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tags", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--backbone", default="tiny", help="tiny (default) or vgg16 (random weights, slow on a CPU)")
    ap.add_argument("--folder-images", type=int, default=384, help="512px JPEGs of the folder case (0: skip)")
    args = ap.parse_args()

    import keras

    from alt_i2v.cli import main as cli_main
    from alt_i2v.model.modeldir import load_model
    from alt_i2v.tagging.tagger import Tagger

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "pictures"
        folder.mkdir()
        t = time.perf_counter()
        files = make_images(folder, args.images)
        make_model_dir(tmp / "model", args.tags, args.image_size, args.backbone)
        print(f"{len(files)} images (600x800 JPEG / 512x512 PNG), {args.backbone} model {args.image_size}px "
              f"{args.tags} tags, "
              f"backend {keras.backend.backend()}, {os.cpu_count()} cores; setup {time.perf_counter() - t:.1f} s")

        tagger = Tagger(tmp / "model", batch_size=args.batch_size)
        model = load_model(tmp / "model")
        names, thr = tagger.vocab.names, tagger.thresholds

        # warm both paths (graph tracing / compilation is not what is measured)
        naive(files[:2], model, tagger.image_config, names, thr)
        tagger.predict_tags([str(f) for f in files[:args.batch_size]])
        tagger.predict_tags([str(f) for f in files[:3]])

        t = time.perf_counter()
        _, slow_probs = naive(files, model, tagger.image_config, names, thr)
        t_naive = time.perf_counter() - t

        t = time.perf_counter()
        tagger.predict_tags([str(f) for f in files])
        t_api = time.perf_counter() - t

        cli_args = ["--pred", str(folder), "--model", str(tmp / "model"), "--format", "json", "--quiet",
                    "--batch-size", str(args.batch_size)]
        with contextlib.redirect_stdout(io.StringIO()):
            cli_main(cli_args)  # warm the CLI's cached Tagger
            t = time.perf_counter()
            rc = cli_main(cli_args)
            t_cli = time.perf_counter() - t
        if rc != 0:
            print(f"alt-i2v --pred failed with exit code {rc}")
            return 1

        diff = float(np.abs(tagger.probabilities([str(f) for f in files]) - slow_probs).max())
        same = diff < 1e-4  # batched and one-by-one give the same probabilities (up to float rounding)
        n = len(files)
        print(f"naive loop (load, model.predict, next) : {n / t_naive:8.1f} img/s  ({t_naive:.2f} s)")
        print(f"Tagger.predict_tags(list)              : {n / t_api:8.1f} img/s  ({t_api:.2f} s)  "
              f"x{t_naive / t_api:.1f}")
        print(f"alt-i2v --pred FOLDER --format json    : {n / t_cli:8.1f} img/s  ({t_cli:.2f} s)  "
              f"x{t_naive / t_cli:.1f}")
        print(f"same probabilities both ways           : {same} (max difference {diff:.1e})")
        speedup = t_naive / t_cli
        folder = folder_case(tmp, args.folder_images, args.batch_size) if args.folder_images else None
        print(f"RESULT predict speedup={speedup:.1f} ratio={speedup:.1f} target=5")
        if folder:
            name = "predict_folder_gpu" if _on_gpu() else "predict_folder"
            print(f"RESULT {name} pred_img_s={folder['pred']:.1f} model_img_s={folder['alone']:.1f} "
                  f"threads_img_s={folder['threads']:.1f} processes_img_s={folder['processes']:.1f} "
                  f"ratio={folder['pred'] / folder['alone']:.2f} target=0.5")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
