"""Training throughput: what the input pipeline delivers against what the model consumes, side by side.

CPU mode (the default; about a minute on 2 cores): generates 150px illustrations, stores them once as one
shard and once as 2 shards, and measures

- the pipeline alone (read + decode + fixed-shape batches + augmentation parameters, no model): threads
  on the one-shard store, then 1 and 2 reader processes on the sharded store; img/s, img/s per process
  and the scaling from 1 to 2 processes,
- the ``tiny`` model training on one batch already in memory (the model alone) against ``model.fit`` fed
  by the sharded store through the reader processes (what ``--train`` does).

Ends with ``RESULT train_pipeline per_core=<img/s> scaling=<x> ratio=<x> target=1.5`` and
``RESULT train pipeline_ratio=<pipeline / model> ratio=<x> target=2``.

GPU mode, the reference setting (VGG16 150px, batch 256, 4096 tags, JAX, mixed bfloat16)::

    KERAS_BACKEND=jax python scripts/bench_train.py --backbone vgg16 --batch-size 256 \\
        --mixed-precision bfloat16 --steps 30 --num-tags 4096

stores ``--images`` (default 8704) images in one shard per core, then reports the pipeline alone by
number of reader processes (1, 2, 4, ... cores; target >= 40,000 img/s on 16 cores), and train and
predict img/s fed from the store against the same model on random device tensors: ``RESULT pipeline_gpu
... target=1`` (img/s / 40,000), ``RESULT train_gpu ... target=0.9`` and ``RESULT predict_gpu ... target=0.9``.

Scaling (distribute.py, JAX): the CPU run also trains ``tiny`` through the CLI with 1 process and with 2
processes on 127.0.0.1 (the same batch per process: weak scaling) and ends with ``RESULT train_scaling
img_s_1=... img_s_2=... epoch_s_1=... epoch_s_2=... ratio=<efficiency> target=0.9``, efficiency = img/s
with P / (P x img/s with 1); ``--scaling`` runs only that. On a machine with N GPUs, ``--scaling --devices N
[--backbone vgg16 --batch-size 64 --mixed-precision bfloat16]`` compares 1 device with N in one process
(``RESULT train_scaling_gpu``).
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    from alt_i2v.data.vocab import build_vocab

    generate_demo_dataset(data_dir, n_images=n, seed=seed, size=size)
    build_vocab(data_dir)


def stores_for(root: Path, size: int, n: int, shards: int, one_shard: bool) -> tuple[Path, Path | None]:
    """The same generated images stored in ``shards`` shards (and, if asked, in one)."""
    from alt_i2v.store import build_store

    data = root / "sharded"
    make_data(data, n, max(size, 96))
    single = None
    if one_shard:
        single = root / "one"
        single.mkdir()
        shutil.copytree(data / "images", single / "images")
        for name in ("posts.jsonl", "vocab.json"):
            shutil.copy(data / name, single / name)
        build_store(single, image_size=size, quiet=True, val_fraction=0.05, test_fraction=0.05)
    build_store(data, image_size=size, quiet=True, val_fraction=0.05, test_fraction=0.05, shards=shards)
    return data, single


def pipeline_rate(store, batch: int, *, processes: int = 0, threads: int = 1, batches: int | None = None,
                  repeat: int = 3) -> float:
    """img/s of the train split's batches (shuffled, augmentation parameters) with no model: threads of
    this process, or ``processes`` reader processes; best of ``repeat`` passes."""
    from alt_i2v.training.pipeline import StoreDataset, measure_pipeline
    from alt_i2v.training.readers import ReaderPool

    pool = ReaderPool(store, processes=processes) if processes else None
    try:
        ds = StoreDataset.from_split(store, "train", batch_size=batch, shuffle=True, augment=True, workers=threads,
                                     readers=pool)
        n = min(len(ds), batches or len(ds))
        measure_pipeline(ds, batches=2)
        best = 0.0
        for r in range(repeat):
            ds.set_epoch(r + 1)
            best = max(best, measure_pipeline(ds, batches=n))
        ds.close()
        return best
    finally:
        if pool is not None:
            pool.close()


def build_models(backbone: str, tags: int, size: int, policy: str):
    """(training model with the on-device augmentation, the tagger inside it), compiled like --train."""
    import keras

    from alt_i2v.training.augment import training_model
    from alt_i2v.model.build import build_model
    from alt_i2v.model.losses import get_loss

    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(policy)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tagger = build_model(num_tags=tags, image_size=size, backbone=backbone, weights=None,
                                 frozen=12 if backbone == "vgg16" else 0)
            model = training_model(tagger)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=get_loss("bce"))
    finally:
        keras.config.set_dtype_policy(previous)
    return model, tagger


def model_rate(model, batch: int, steps: int, num_tags: int, size: int, train: bool = True) -> float:
    """img/s of the model alone: one random batch, already a backend tensor, ``steps`` times."""
    import keras

    from alt_i2v.training.augment import augment_params

    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8))
    p = keras.ops.convert_to_tensor(augment_params(batch, size, seed=0, epoch=0, index=0))
    y = keras.ops.convert_to_tensor((rng.random((batch, num_tags)) < 0.05).astype(np.float32))
    w = keras.ops.convert_to_tensor(np.ones(batch, np.float32))
    if train:
        def step():
            return model.train_on_batch({"image": x, "augment": p}, y, sample_weight=w)
    else:
        def step():
            return model.predict_on_batch(x)
    step()
    step()  # compile and warm up
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    np.asarray(out if not isinstance(out, (list, tuple)) else out[0])  # results are host values: synced
    return batch * steps / (time.perf_counter() - t0)


def fed_train_rate(model, store, batch: int, steps: int, tags: int, pool) -> float:
    """img/s of ``model.fit`` fed by the store (reader processes when ``pool``), as ``--train`` runs it."""
    from alt_i2v.training.pipeline import EpochSetter, StoreDataset

    def ds(n: int, epoch: int):
        return StoreDataset.from_split(store, "train", num_tags=tags, batch_size=batch, shuffle=True, augment=True,
                                       steps=n, epoch=epoch, readers=pool, workers=os.cpu_count() or 1)

    warm = ds(2, 0)
    model.fit(warm, epochs=1, verbose=0)
    warm.close()
    timed = ds(steps, 1)
    t0 = time.perf_counter()
    model.fit(timed, epochs=2, initial_epoch=1, verbose=0, callbacks=[EpochSetter(timed)])
    rate = len(timed) * batch / (time.perf_counter() - t0)
    timed.close()
    return rate


def fed_predict_rate(tagger, store, batch: int, pool) -> float:
    """img/s of ``predict_split`` (what --evaluate and the calibration run) over the train split."""
    from alt_i2v.training.evaluation import predict_split

    predict_split(tagger, store, "val", batch_size=batch, readers=pool)  # compile, warm up
    t0 = time.perf_counter()
    keys, _, _ = predict_split(tagger, store, "train", batch_size=batch, readers=pool)
    return len(keys) / (time.perf_counter() - t0)


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


def train_scaling(root: Path, processes: int = 1, devices: int | None = None, backbone: str = "tiny",
            size: int = 32, batch: int = 32, epochs: int = 4, n: int = 1024, policy: str | None = None) -> dict:
    """Weak scaling: the same batch per device (or per process) with 1 and with ``devices`` x ``processes``."""
    root.mkdir(parents=True, exist_ok=True)
    from alt_i2v.store import build_store

    data = root / "data"
    make_data(data, n, max(size, 96))
    build_store(data, image_size=size, quiet=True, val_fraction=0.05, test_fraction=0.05)
    common = ["--backbone", backbone, "--weights", "none", "--epochs", str(epochs), "--workers", "0",
              "--patience", "0", *(["--mixed-precision", policy] if policy else [])]
    one = cli_train(data, root / "m1", common + ["--batch-size", str(batch), "--devices", "1"])
    k = processes * (devices or 1)
    many_args = common + ["--batch-size", str(batch * k)] + (["--devices", str(devices)] if devices else
                                                             ["--devices", "1"])
    many = cli_train(data, root / "mk", many_args, processes=processes)
    return {"k": k, "one": one, "many": many, "efficiency": many["img_s"] / (k * one["img_s"])}


def scaling_mode(args, root: Path) -> int:
    """``--scaling``: 1 vs N devices in one process (``--devices N``), or 1 vs P processes (CPU)."""
    if args.devices:
        r = train_scaling(root, devices=args.devices, backbone=args.backbone or "vgg16",
                          size=args.image_size or 150, batch=args.batch_size or 64, n=args.images or 8192,
                          policy=args.mixed_precision)
        print_scaling(r, f"1 vs {args.devices} devices, {device_name()}")
    else:
        r = train_scaling(root, processes=args.processes, backbone=args.backbone or "tiny",
                          size=args.image_size or 32, batch=args.batch_size or 32, n=args.images or 1024)
        print_scaling(r, f"1 vs {args.processes} processes on 127.0.0.1, {device_name()}")
    return 0


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
        if keras.backend.backend() == "torch":
            import torch

            if torch.cuda.is_available():
                return f"gpu:{torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - a label only
        pass
    return f"cpu ({os.cpu_count()} cores)"


def gpu_mode(args, root: Path, policy: str) -> int:
    from alt_i2v.config import resolve_workers
    from alt_i2v.model.backbones import get_backbone
    from alt_i2v.training.readers import ReaderPool
    from alt_i2v.store import open_store

    bb = get_backbone(args.backbone)
    size = args.image_size or bb.image_size
    batch = args.batch_size or 256
    steps = args.steps or 30
    cores = resolve_workers(args.workers)
    n = args.images or max(batch * (steps + 4), 8704)
    t = time.perf_counter()
    data, _ = stores_for(root, size, n, shards=cores, one_shard=False)
    print(f"generated and stored {n} images at {size}px in {cores} shards in {time.perf_counter() - t:.1f}s")
    store = open_store(data)
    tags = int(args.num_tags or store.num_tags)
    counts = [p for p in (1, 2, 4, 8, 16, 32, 64) if p < cores] + [cores]
    print(f"pipeline alone (read + batch, {size}px, batch {batch}), by reader processes:")
    by_procs = {}
    for p in counts:
        by_procs[p] = pipeline_rate(store, batch, processes=p, repeat=2)
        print(f"  {p:3d} processes: {by_procs[p]:10.0f} img/s ({by_procs[p] / p:.0f} per process)")
    model, tagger = build_models(bb.name, tags, size, policy)
    with ReaderPool(store, processes=cores) as pool:
        train_model = model_rate(model, batch, steps, tags, size)
        train_fed = fed_train_rate(model, store, batch, steps, tags, pool)
        pred_model = model_rate(tagger, batch, steps, tags, size, train=False)
        pred_fed = fed_predict_rate(tagger, store, batch, pool)
    store.close()
    print(f"{bb.name} {size}px batch {batch} {policy}, {tags} tags, {cores} reader processes, "
          f"device {device_name()}")
    print(f"  train, model alone  : {train_model:10.1f} img/s (random device tensors)")
    print(f"  train, fed by store : {train_fed:10.1f} img/s ({train_fed / train_model:.0%} of the model)")
    print(f"  predict, model alone: {pred_model:10.1f} img/s")
    print(f"  predict, fed        : {pred_fed:10.1f} img/s ({pred_fed / pred_model:.0%})")
    best = max(by_procs.values())
    scaling = ", ".join(f"{p}: {r:.0f}" for p, r in by_procs.items())
    print(f"RESULT pipeline_gpu img_s={best:.0f} by_processes={scaling.replace(' ', '')} "
          f"ratio={best / 40000:.2f} target=1")
    print(f"RESULT train_gpu fed={train_fed:.0f} model={train_model:.0f} ratio={train_fed / train_model:.2f} "
          f"target=0.9")
    print(f"RESULT predict_gpu fed={pred_fed:.0f} model={pred_model:.0f} ratio={pred_fed / pred_model:.2f} "
          f"target=0.9")
    return 0


def cpu_mode(args, root: Path, policy: str) -> int:
    from alt_i2v.training.readers import ReaderPool
    from alt_i2v.store import open_store

    size, batch = args.image_size or 150, args.batch_size or 64
    n = args.images or 1536
    t = time.perf_counter()
    data, single = stores_for(root, size, n, shards=2, one_shard=True)
    print(f"generated {n} images, stored at {size}px as 1 and as 2 shards in {time.perf_counter() - t:.1f}s")
    store = open_store(data)
    threads = p1 = p2 = 0.0
    for _ in range(2):  # alternate, so every configuration sees the same machine load
        with open_store(single) as one:
            threads = max(threads, pipeline_rate(one, batch, threads=2))
        p1 = max(p1, pipeline_rate(store, batch, processes=1))
        p2 = max(p2, pipeline_rate(store, batch, processes=2))
    scaling = p2 / p1
    print(f"pipeline alone, {size}px batch {batch} (read + fixed-shape batch + augmentation parameters):")
    print(f"  2 threads, one-shard store : {threads:8.0f} img/s")
    print(f"  1 reader process, 2 shards : {p1:8.0f} img/s")
    print(f"  2 reader processes         : {p2:8.0f} img/s ({p2 / 2:.0f} per process; {scaling:.2f}x of 1)")

    tiny = 64
    tdata, _ = stores_for(root / "tiny", tiny, 1024, shards=2, one_shard=False)
    tstore = open_store(tdata)
    model, _ = build_models("tiny", tstore.num_tags, tiny, policy)
    alone = model_rate(model, batch, 30, tstore.num_tags, tiny)
    with ReaderPool(tstore, processes=2) as pool:
        fed = fed_train_rate(model, tstore, batch, 12, tstore.num_tags, pool)
    tpipe = pipeline_rate(tstore, batch, processes=2)
    tstore.close()
    store.close()
    print(f"tiny {tiny}px batch {batch}: model alone {alone:.0f} img/s, fed by 2 reader processes {fed:.0f} img/s "
          f"({fed / alone:.0%}; they share the 2 cores), pipeline alone {tpipe:.0f} img/s = "
          f"{tpipe / alone:.1f}x the model")
    print(f"RESULT train_pipeline per_core={p2 / 2:.0f} one_process={p1:.0f} two_processes={p2:.0f} "
          f"threads={threads:.0f} scaling={scaling:.2f} ratio={scaling:.2f} target=1.5")
    print(f"RESULT train pipeline_ratio={tpipe / alone:.2f} fed={fed:.0f} model={alone:.0f} "
          f"ratio={tpipe / alone:.2f} target=2")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", help="GPU mode: one configuration, e.g. vgg16")
    ap.add_argument("--image-size", type=int, help="default: the backbone's (vgg16 150); CPU mode 150")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (GPU mode)")
    ap.add_argument("--mixed-precision", default=None, help="bfloat16 / float16")
    ap.add_argument("--num-tags", type=int, default=None, help="output units (default: the data's vocab)")
    ap.add_argument("--random-tensors", action="store_true", help="(always on in GPU mode; kept for old commands)")
    ap.add_argument("--images", type=int, default=None, help="images to generate")
    ap.add_argument("--workers", type=int, default=0, help="GPU mode: shards and reader processes (default cores)")
    ap.add_argument("--scaling", action="store_true", help="only the scaling comparison (see --devices)")
    ap.add_argument("--devices", type=int, default=None, help="--scaling: 1 device vs N in one process")
    ap.add_argument("--processes", type=int, default=2, help="--scaling on CPU: 1 process vs P (default 2)")
    args = ap.parse_args()

    import keras

    from alt_i2v.training.optim import precision_policy

    t_start = time.perf_counter()
    policy = precision_policy(args.mixed_precision)
    print(f"backend {keras.backend.backend()}, device {device_name()}, keras {keras.__version__}, "
          f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        if args.scaling:
            rc = scaling_mode(args, root)
        else:
            rc = (gpu_mode if args.backbone else cpu_mode)(args, root, policy)
            if rc == 0 and not args.backbone:
                print_scaling(train_scaling(root / "scaling", processes=2),
                              f"1 vs 2 processes on 127.0.0.1, {device_name()}")
    print(f"total {time.perf_counter() - t_start:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
