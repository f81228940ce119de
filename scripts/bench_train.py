"""Training throughput: the model's consumption vs what the input pipeline delivers, measured side by side.

Default (CPU, ~1-2 min on 2 cores): generates a small dataset in a temp dir, builds 64px and 150px
stores, then measures for ``tiny`` @64px and ``vgg16`` @150px (few steps, it is slow on a CPU):

- model: training img/s on tensors already in memory (``train_on_batch``; no input pipeline at all),
- pipeline: img/s the threaded ``StoreDataset`` produces on its own (read + decode + augment),
- fed: training img/s through ``model.fit`` on the store pipeline (what a real run gets),
- naive: a single-threaded per-image loop, for reference.

The last line is ``RESULT train pipeline_ratio=<x> ratio=<x> target=2``: pipeline img/s over the
fastest model's consumption (the worst case).

GPU mode (one config): ``--backbone vgg16 --batch-size 256 --mixed-precision bfloat16 --steps 30
--random-tensors [--num-tags 4096]`` reports train and predict img/s fed from the store against the same
model on random device tensors, and ends with ``RESULT train fed_ratio=<x> ratio=<x> target=0.9``.
Set KERAS_BACKEND=jax for the reference setting.

Scaling (distribute.py, JAX): the default run also trains ``tiny`` through the CLI with 1 process and with 2
processes on 127.0.0.1 (each process the same per-process batch: weak scaling) and ends with
``RESULT train_scaling img_s_1=... img_s_2=... epoch_s_1=... epoch_s_2=... ratio=<efficiency> target=0.9``,
efficiency = img/s with P / (P x img/s with 1). On a machine with N GPUs: ``--scaling --devices N
[--backbone vgg16 --batch-size 64 --mixed-precision bfloat16]`` compares 1 device with N in one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

def make_data(data_dir: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` posts of the demo's generated illustrations (contract layout) with vocab.json."""
    from alt_i2v.demo import generate_demo_dataset
    from alt_i2v.vocab import build_vocab

    generate_demo_dataset(data_dir, n_images=n, seed=seed, size=size)
    build_vocab(data_dir)


def store_for(root: Path, size: int, n: int) -> Path:
    from alt_i2v.store import build_store

    data = root / f"data{size}"
    make_data(data, n, max(size, 96))
    build_store(data, image_size=size, quiet=True, val_fraction=0.05, test_fraction=0.05)
    return data


def model_rate(model, batch: int, steps: int, num_tags: int, image_size: int, train: bool = True) -> float:
    """img/s of the model alone: the same random batch, already a backend tensor, ``steps`` times."""
    import keras

    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.integers(0, 256, (batch, image_size, image_size, 3)).astype(np.uint8))
    y = keras.ops.convert_to_tensor((rng.random((batch, num_tags)) < 0.05).astype(np.float32))
    step = (lambda: model.train_on_batch(x, y)) if train else (lambda: model.predict_on_batch(x))
    step()
    step()  # compile and warm up
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    np.asarray(out if not isinstance(out, (list, tuple)) else out[0])  # results are host values: synced
    return batch * steps / (time.perf_counter() - t0)


def fed_rate(model, ds, steps: int, train: bool = True) -> float:
    """img/s through ``model.fit`` / ``model.predict`` on the store pipeline (threads included)."""
    from alt_i2v.pipeline import StoreDataset

    steps = min(steps, len(ds))
    sub = StoreDataset(ds.store, ds.keys, ds.labels, num_tags=ds.num_tags, batch_size=ds.batch_size,
                       shuffle=ds.shuffle, augment=ds.augment, workers=ds.workers, steps=steps)
    warm = StoreDataset(ds.store, ds.keys, ds.labels, num_tags=ds.num_tags, batch_size=ds.batch_size,
                        shuffle=ds.shuffle, augment=ds.augment, workers=ds.workers, steps=2)
    if train:
        model.fit(warm, epochs=1, verbose=0)
        t0 = time.perf_counter()
        model.fit(sub, epochs=1, verbose=0)
    else:
        model.predict(warm, verbose=0)
        t0 = time.perf_counter()
        model.predict(sub, verbose=0)
    return steps * ds.batch_size / (time.perf_counter() - t0)


def naive_rate(store, keys, batch: int) -> float:
    """One thread, one record at a time, per-image flip/crop with Python loops: the obvious first version."""
    from alt_i2v.store import unpack

    t0 = time.perf_counter()
    n = 0
    rng = np.random.default_rng(0)
    for i in range(0, min(len(keys), batch * 8), batch):
        imgs = []
        for k in keys[i:i + batch]:
            rec = unpack(store.db.get(b"r/" + k))
            img = rec["image"]
            if rng.random() < 0.5:
                img = img[:, ::-1]
            s = img.shape[0]
            c = int(s / rng.uniform(1.0, 1.15))
            oy, ox = rng.integers(0, s - c + 1, 2)
            crop = img[oy:oy + c, ox:ox + c]
            idx = (np.arange(s) * c) // s
            imgs.append(np.stack([crop[r][idx] for r in idx]))
        np.stack(imgs)
        n += len(imgs)
    return n / (time.perf_counter() - t0)


def bench_config(data: Path, backbone: str, batch: int, steps: int, workers: int, policy: str,
                 num_tags: int | None, random_tensors: bool, predict: bool) -> dict:
    import keras

    from alt_i2v.config import resolve_workers
    from alt_i2v.model import build_model, get_loss
    from alt_i2v.pipeline import StoreDataset, measure_pipeline
    from alt_i2v.store import Store

    store = Store(data)
    workers = resolve_workers(workers)
    tags = int(num_tags or store.num_tags)
    keys, labels = store.index("train")
    ds = StoreDataset(store, keys, labels, num_tags=tags, batch_size=batch, shuffle=True, augment=True,
                      workers=workers)
    out = {"backbone": backbone, "image_size": store.image_size, "batch": batch, "workers": workers,
           "tags": tags, "policy": policy}
    measure_pipeline(ds, batches=2)
    out["pipeline"] = measure_pipeline(ds, batches=max(4, min(len(ds), 4096 // batch)))
    out["naive"] = naive_rate(store, keys, batch)
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(policy)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(num_tags=tags, image_size=store.image_size, backbone=backbone, weights=None,
                                frozen=12 if backbone == "vgg16" else 0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=get_loss("bce"))
        out["model"] = model_rate(model, batch, steps, tags, store.image_size)
        out["fed"] = fed_rate(model, ds, steps)
        if predict:
            pred_ds = StoreDataset(store, keys, labels, num_tags=tags, batch_size=batch, workers=workers)
            out["predict_fed"] = fed_rate(model, pred_ds, steps, train=False)
            out["predict_model"] = model_rate(model, batch, steps, tags, store.image_size, train=False)
    finally:
        keras.config.set_dtype_policy(previous)
        store.close()
    out["random_tensors"] = random_tensors
    return out


def cli_train(data: Path, model: Path, extra: list[str], processes: int = 1, env: dict | None = None,
              timeout: float = 1200) -> dict:
    """Train through ``python -m alt_i2v --train`` (``processes`` of them on 127.0.0.1) and read the steady
    epoch from history.csv: the median over epochs after the first (which compiles)."""
    import csv
    import socket
    import subprocess

    env = {**os.environ, "KERAS_BACKEND": "jax", **(env or {})}
    base = [sys.executable, "-m", "alt_i2v", "--train", "--data", str(data), "--model", str(model), "--quiet",
            *extra]
    if processes > 1:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        cmds = [base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                        "--process-id", str(i)] for i in range(processes)]
    else:
        cmds = [base]
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen(c, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"training failed ({p.returncode}):\n{out[-3000:]}")
    with open(model / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))[1:]
    return {"img_s": float(np.median([float(r["img_per_s"]) for r in rows])),
            "epoch_s": float(np.median([float(r["seconds"]) for r in rows]))}


def scaling(root: Path, processes: int = 1, devices: int | None = None, backbone: str = "tiny",
            size: int = 32, batch: int = 32, epochs: int = 4, n: int = 1024, policy: str | None = None) -> dict:
    """Weak scaling: the same batch per device (or per process) with 1 and with ``devices`` x ``processes``."""
    root.mkdir(parents=True, exist_ok=True)
    data = store_for(root, size, n)
    common = ["--backbone", backbone, "--weights", "none", "--epochs", str(epochs), "--workers", "0",
              "--patience", "0", *(["--mixed-precision", policy] if policy else [])]
    one = cli_train(data, root / "m1", common + ["--batch-size", str(batch), "--devices", "1"])
    k = processes * (devices or 1)
    many_args = common + ["--batch-size", str(batch * k)] + (["--devices", str(devices)] if devices else
                                                             ["--devices", "1"])
    many = cli_train(data, root / "mk", many_args, processes=processes)
    return {"k": k, "one": one, "many": many, "efficiency": many["img_s"] / (k * one["img_s"])}


def print_scaling(r: dict, label: str) -> None:
    k = r["k"]
    print(f"\nscaling ({label}, same batch per {'process' if 'process' in label else 'device'}):")
    print(f"  {'':<12} {'img/s':>9} {'epoch s':>9}")
    print(f"  {'1':<12} {r['one']['img_s']:>9.1f} {r['one']['epoch_s']:>9.2f}")
    print(f"  {k:<12} {r['many']['img_s']:>9.1f} {r['many']['epoch_s']:>9.2f}")
    print(f"  efficiency {r['efficiency']:.2f} (img/s with {k} / ({k} x img/s with 1))")
    name = "train_scaling_gpu" if "devices" in label else "train_scaling"
    print(f"RESULT {name} workers={k} img_s_1={r['one']['img_s']:.1f} img_s_{k}={r['many']['img_s']:.1f} "
          f"epoch_s_1={r['one']['epoch_s']:.2f} epoch_s_{k}={r['many']['epoch_s']:.2f} "
          f"ratio={r['efficiency']:.2f} target=0.9")


def device_name() -> str:
    import keras

    try:
        if keras.backend.backend() == "jax":
            import jax

            d = jax.devices()[0]
            return f"{d.platform}:{getattr(d, 'device_kind', d)}"
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                return f"gpu:{tf.config.experimental.get_device_details(gpus[0]).get('device_name', 'GPU')}"
    except Exception:  # noqa: BLE001 - a label only
        pass
    return f"cpu ({os.cpu_count()} cores)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", help="one config only (GPU mode): e.g. vgg16")
    ap.add_argument("--image-size", type=int, help="default: the backbone's (vgg16 150, tiny 64)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps")
    ap.add_argument("--mixed-precision", default=None, help="bfloat16 / float16")
    ap.add_argument("--num-tags", type=int, default=None, help="output units (default: the data's vocab)")
    ap.add_argument("--random-tensors", action="store_true", help="also time the model on random tensors")
    ap.add_argument("--images", type=int, default=None, help="images to generate")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--scaling", action="store_true", help="only the scaling comparison (see --devices)")
    ap.add_argument("--devices", type=int, default=None, help="--scaling: 1 device vs N in one process")
    ap.add_argument("--processes", type=int, default=2, help="--scaling on CPU: 1 process vs P (default 2)")
    args = ap.parse_args()

    import keras

    from alt_i2v.model import get_backbone
    from alt_i2v.train import precision_policy

    t_start = time.perf_counter()
    policy = precision_policy(args.mixed_precision)
    print(f"backend {keras.backend.backend()}, device {device_name()}, keras {keras.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        if args.scaling:
            if args.devices:
                r = scaling(root, devices=args.devices, backbone=args.backbone or "vgg16",
                            size=args.image_size or 150, batch=args.batch_size or 64, n=args.images or 8192,
                            policy=args.mixed_precision)
                print_scaling(r, f"1 vs {args.devices} devices, {device_name()}")
            else:
                r = scaling(root, processes=args.processes, backbone=args.backbone or "tiny",
                            size=args.image_size or 32, batch=args.batch_size or 32, n=args.images or 1024)
                print_scaling(r, f"1 vs {args.processes} processes on 127.0.0.1, {device_name()}")
            return 0
        if args.backbone:  # one configuration (the GPU run)
            bb = get_backbone(args.backbone)
            size = args.image_size or bb.image_size
            batch = args.batch_size or 32
            steps = args.steps or 20
            n = args.images or max(batch * (steps + 4), 512)
            t = time.perf_counter()
            data = store_for(root, size, n)
            print(f"generated and stored {n} images at {size}px in {time.perf_counter() - t:.1f}s")
            r = bench_config(data, bb.name, batch, steps, args.workers, policy, args.num_tags,
                             args.random_tensors, predict=True)
            print(f"{bb.name} {size}px batch {batch} {policy}, {r['tags']} tags, {r['workers']} pipeline threads")
            print(f"  pipeline alone      : {r['pipeline']:10.1f} img/s (naive loop {r['naive']:.1f})")
            print(f"  train, model alone  : {r['model']:10.1f} img/s (random tensors)")
            print(f"  train, fed by store : {r['fed']:10.1f} img/s ({r['fed'] / r['model']:.0%} of the model)")
            print(f"  predict, model alone: {r['predict_model']:10.1f} img/s")
            print(f"  predict, fed        : {r['predict_fed']:10.1f} img/s "
                  f"({r['predict_fed'] / r['predict_model']:.0%})")
            ratio = r["fed"] / r["model"]
            print(f"total {time.perf_counter() - t_start:.1f}s")
            print(f"RESULT train fed_ratio={ratio:.2f} ratio={ratio:.2f} target=0.9")
            return 0

        results = []
        for backbone, size, batch, steps, n in [("tiny", 64, args.batch_size or 64, args.steps or 30,
                                                 args.images or 2048),
                                                ("vgg16", 150, 8, 3, 512)]:
            t = time.perf_counter()
            data = store_for(root, size, n)
            build_s = time.perf_counter() - t
            r = bench_config(data, backbone, batch, steps, args.workers, policy, args.num_tags, False,
                             predict=False)
            r["store_s"] = build_s
            results.append(r)
        print(f"\n{'config':<22} {'model train':>12} {'fed (fit)':>11} {'pipeline':>10} {'naive':>8} "
              f"{'pipeline/model':>15}")
        for r in results:
            name = f"{r['backbone']} {r['image_size']}px b{r['batch']}"
            print(f"{name:<22} {r['model']:>8.1f} i/s {r['fed']:>7.1f} i/s {r['pipeline']:>6.0f} i/s "
                  f"{r['naive']:>4.0f} i/s {r['pipeline'] / r['model']:>14.1f}x")
        print(f"(pipeline: {results[0]['workers']} threads, read + decode + flip/crop; "
              f"pipeline vs naive loop {results[0]['pipeline'] / results[0]['naive']:.1f}x at 64px, "
              f"{results[1]['pipeline'] / results[1]['naive']:.1f}x at 150px)")
        worst = min(r["pipeline"] / r["model"] for r in results)
        print(f"RESULT train pipeline_ratio={worst:.2f} ratio={worst:.2f} target=2")
        print_scaling(scaling(root / "scaling", processes=2), f"1 vs 2 processes on 127.0.0.1, {device_name()}")
        print(f"total {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
