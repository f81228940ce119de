"""Training: the store in, a self-contained model directory out (docs/formats.md, "The model directory").

``MODEL/``::

    model.keras        the best epoch's weights (float32, no optimizer), written atomically
    config.json        model + train + image settings, backend, Keras version, vocab sha256, embedding dim
    vocab.json         copy of the data's vocabulary
    thresholds.json    per-tag thresholds calibrated on the validation split
    history.csv        one row per completed epoch; curves.png: loss, AUC and F1 per epoch
    checkpoints/       best.keras, last-eNNNN.keras (with the optimizer) and state.json

A run is resumable at any point: after every epoch the last checkpoint is written under a new name, then
history.csv, then ``state.json`` (atomic) which names it; ``--resume`` loads what state.json names,
keeps the history rows up to that epoch and continues with the next one. Killed during the final steps
(thresholds, model.keras), ``--resume`` just redoes them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from .augment import tagger_of, training_model
from ..config import ImageConfig, ModelConfig, TrainConfig, resolve_workers
from .distribute import Cluster, DistConfig, start
from ..errors import AltI2VError, UsageError
from .evaluation import predict_split
from .groups import exclusive_groups, label_matrix
from .history import plot_curves, read_history, write_history
from ..fsutil import atomic_copy, atomic_path, atomic_write_json, remove_stale_temps
from ..data.layout import CHECKPOINTS_DIR as CKPT_DIR
from ..data.layout import CONFIG_FILE, CURVES_FILE, HISTORY_FILE, MODEL_FILE, THRESHOLDS_FILE, ModelDir
from .metrics import prf_at
from .optim import compile_model, learning_rate, precision_policy
from ..model.build import FROM_PROJECT, build_model, count_params, embedding_dim, get_backbone, resolve_config
from .pipeline import EpochSetter, StoreDataset
from .readers import ReaderPool
from ..store import Store
from .thresholds import calibrate_thresholds, thresholds_vector
from ..data.vocab import VOCAB_FILE, Vocab

CONFIG_VERSION = 1
STATE_FILE = "state.json"
BEST_FILE = "best.keras"
MODEL_FIELDS = {f.name for f in fields(ModelConfig)} - {"num_tags"}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
RESUME_OVERRIDES = {"epochs", "patience", "workers"}  # what --resume may change


# ---------------------------------------------------------------------------------------------------------
# Result


@dataclass
class TrainResult:
    """What a training run did; ``summary()`` is the one-screen report the CLI prints."""

    model_dir: Path
    model_config: ModelConfig
    train_config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_epoch: int = 0
    best_epoch: int | None = None
    best_value: float | None = None
    stopped_early: bool = False
    resumed: bool = False
    params: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    val_scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    precision_policy: str = "float32"
    devices: str = "one device"
    process: int = 0  # this process's index in a distributed run (0 writes MODEL and prints the summary)
    seconds: float = 0.0
    bad_records: list[dict] = field(default_factory=list)  # store records left out: they did not decode

    @property
    def epochs_completed(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0

    def summary(self) -> dict[str, Any]:
        mc, tc = self.model_config, self.train_config
        last = self.history[-1] if self.history else {}
        ran = self.history[self.initial_epoch:]
        steady = [r.get("steady_img_per_s") for r in (ran[1:] or ran) if r.get("steady_img_per_s")]
        rows: dict[str, Any] = {
            "model": str(self.model_dir),
            "backbone": f"{mc.backbone} {mc.image_size}px, weights={mc.weights or 'none'}, frozen={mc.frozen}, "
                        f"{self.precision_policy}",
            "parameters": f"{self.params.get('total', 0):,} ({self.params.get('trainable', 0):,} trainable)",
            "tags": mc.num_tags,
            "devices": f"{self.devices}, global batch {tc.batch_size}",
            "images": ", ".join(f"{k} {v}" for k, v in self.counts.items()),
            "epochs": (f"{self.initial_epoch + 1}-{self.epochs_completed} of {tc.epochs}"
                       if self.epochs_completed > self.initial_epoch else
                       f"{self.epochs_completed} of {tc.epochs} (nothing left to train)")
                      + (" (resumed)" if self.resumed else "") + (", stopped early" if self.stopped_early else ""),
            "best epoch": f"{self.best_epoch} ({tc.monitor} {self.best_value:.4f})"
                          if self.best_value is not None else "-",
            "last epoch": ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "val_loss", "val_auc", "val_f1")
                                    if isinstance(last.get(k), float)) or "-",
        }
        if self.val_scores:
            v = self.val_scores
            rows["val micro F1"] = (f"{v['micro_f1']:.4f} calibrated, {v['micro_f1_at_0.5']:.4f} at 0.5; "
                                    f"macro {v['macro_f1']:.4f} / {v['macro_f1_at_0.5']:.4f}")
        if self.thresholds:
            rows["thresholds"] = (f"global {self.thresholds['global']:.2f}, "
                                  f"{self.thresholds.get('tags_with_own_threshold', 0)} tags calibrated on "
                                  f"{self.thresholds.get('calibrated_on')}")
        if steady:
            rows["train speed"] = (f"{np.median(steady):.1f} img/s steady (first epoch {ran[0]['img_per_s']:.1f} "
                                   "img/s with compiling)")
        if self.bad_records:
            rows["bad store records"] = (f"{len(self.bad_records)} left out (first: {self.bad_records[0]['key']}: "
                                         f"{self.bad_records[0]['reason'][:80]}); run --build --rebuild")
        rows["seconds"] = round(self.seconds, 1)
        rows["files"] = "model.keras, config.json, vocab.json, thresholds.json, history.csv, curves.png"
        return rows


# ---------------------------------------------------------------------------------------------------------
# Helpers: files, precision, settings


def save_model_atomic(model: keras.Model, path: Path) -> Path:
    """``model.save`` to a temporary name in the same directory, then rename: never a torn file."""
    with atomic_path(path, keep_suffix=True) as tmp:
        model.save(tmp)
    return Path(path)


def _remove_temps(model_dir: Path) -> None:
    """Temporary files of writes a kill interrupted (model saves, JSON/CSV writes)."""
    remove_stale_temps(model_dir)


def _split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(settings) - MODEL_FIELDS - TRAIN_FIELDS
    if unknown:
        raise UsageError(f"unknown training setting(s): {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(sorted(MODEL_FIELDS | TRAIN_FIELDS))}")
    model_kw = {k: v for k, v in settings.items() if k in MODEL_FIELDS and v is not None}
    train_kw = {k: v for k, v in settings.items() if k in TRAIN_FIELDS and v is not None}
    return model_kw, train_kw


def _check_resume_settings(saved_model: ModelConfig, saved_train: TrainConfig, model_kw: dict,
                           train_kw: dict) -> None:
    """A resumed run keeps its settings; only epochs, patience and workers may change."""
    problems = []
    for k, v in model_kw.items():
        old = getattr(saved_model, k)
        if k == "backbone":
            v = get_backbone(v).name
        if k == "weights":
            continue  # the checkpoint holds the weights now
        if _norm(old) != _norm(v):
            problems.append(f"{k} (was {old!r}, given {v!r})")
    for k, v in train_kw.items():
        if k not in RESUME_OVERRIDES and _norm(getattr(saved_train, k)) != _norm(v):
            problems.append(f"{k} (was {getattr(saved_train, k)!r}, given {v!r})")
    if problems:
        raise UsageError("--resume continues a run with its own settings; these differ: " + "; ".join(problems) +
                         ". Only --epochs, --patience and --workers may change; train into a new --model "
                         "directory to change the others")


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# ---------------------------------------------------------------------------------------------------------
# Callbacks


class NaNGuard(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that remembers where the loss went bad, so train() can say so clearly."""

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.batch: int | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and self.batch is None and not math.isfinite(float(loss)):
            self.batch = batch
        super().on_batch_end(batch, logs)


class RunState(keras.callbacks.Callback):
    """After each epoch: best checkpoint (on the monitored metric), last checkpoint, history.csv, early
    stopping counters and state.json, in an order that a kill at any moment cannot make inconsistent."""

    def __init__(self, run: "_Run"):
        super().__init__()
        self.run = run
        self._t0 = 0.0
        self._train_seconds = 0.0
        self._steps, self._first, self._last = 0, 0.0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._train_seconds = 0.0
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._last = time.perf_counter()
        if self._steps == 1:
            self._first = self._last

    def steady_rate(self) -> float | None:
        """img/s of this epoch's steps after its first (which compiles the step in a run's first epoch)."""
        if self._steps < 2 or self._last <= self._first:
            return None
        return (self._steps - 1) * self.run.train_cfg.batch_size / (self._last - self._first)

    def on_test_begin(self, logs=None):
        if not self._train_seconds:
            self._train_seconds = time.perf_counter() - self._t0

    def on_epoch_end(self, epoch, logs=None):
        run = self.run
        logs = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        if run.nan_guard.batch is not None or not all(math.isfinite(v) for v in logs.values()):
            if run.nan_guard.batch is None:  # finite training loss, but a metric or the validation went bad
                run.nan_guard.batch, run.nan_guard.epoch = -1, epoch
                self.model.stop_training = True
            return  # nothing of this epoch is kept
        seconds = time.perf_counter() - self._t0
        train_seconds = self._train_seconds or seconds
        row = {"epoch": epoch + 1, **logs,
               "lr": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
               "seconds": round(seconds, 3),
               "img_per_s": round(run.train_images_per_epoch / max(train_seconds, 1e-9), 2)}
        steady = self.steady_rate()
        if steady is not None:
            row["steady_img_per_s"] = round(steady, 2)
        value = logs.get(run.monitor)
        if value is None:
            raise AltI2VError(f"the monitored metric {run.monitor!r} is not in the training logs "
                              f"({', '.join(logs)})")
        improved = run.best_value is None or (value > run.best_value if run.mode == "max"
                                              else value < run.best_value)
        if improved:
            run.best_value, run.best_epoch, run.wait = value, epoch + 1, 0
        else:
            run.wait += 1
        run.history.append(row)
        stop = run.train_cfg.patience > 0 and run.wait >= run.train_cfg.patience
        run.stopped_early = stop
        if run.writer:  # every process keeps the same counters; process 0 alone writes them
            with run.cluster.local():
                self._write(epoch, seconds, improved)
        if stop:
            self.model.stop_training = True

    def _write(self, epoch: int, seconds: float, improved: bool) -> None:
        run = self.run
        if improved:
            run.export.set_weights(tagger_of(self.model).get_weights())
            save_model_atomic(run.export, run.ckpt / BEST_FILE)
        last = f"last-e{epoch + 1:04d}.keras"
        save_model_atomic(run.saveable(self.model), run.ckpt / last)
        write_history(run.model_dir / HISTORY_FILE, run.history)
        run.write_state(epoch + 1, last)
        for old in run.ckpt.glob("last-e*.keras"):
            if old.name != last:
                old.unlink(missing_ok=True)
        if seconds > 10:
            plot_curves(run.history, run.model_dir / CURVES_FILE)


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    model_dir: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    monitor: str
    mode: str
    history: list = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    stopped_early: bool = False
    train_images_per_epoch: int = 0
    export: Any = None
    nan_guard: Any = None
    cluster: Any = None  # distribute.Cluster: which process this is, and its devices
    shadow: Any = None  # distributed: a local copy of the training model that checkpoints are saved from
    groups: list = field(default_factory=list)  # exclusive tag groups the loss uses (indices into the vocabulary)

    def saveable(self, model: keras.Model) -> keras.Model:
        """What to save as the last checkpoint: the model itself, or (distributed) its local copy with the
        same weights and optimizer state: saving variables that live on every process is collective."""
        if self.shadow is None:
            return model
        src = [*model.trainable_variables, *model.non_trainable_variables, *model.optimizer.variables]
        dst = [*self.shadow.trainable_variables, *self.shadow.non_trainable_variables,
               *self.shadow.optimizer.variables]
        with self.cluster.host_scope():
            for d, v in zip(dst, src):
                d.assign(keras.ops.convert_to_numpy(v))
        return self.shadow

    @property
    def writer(self) -> bool:
        return self.cluster is None or self.cluster.is_writer

    @property
    def ckpt(self) -> Path:
        return self.model_dir / CKPT_DIR

    def write_state(self, epoch: int, last: str | None, finished: bool = False) -> None:
        atomic_write_json(self.ckpt / STATE_FILE, {
            "version": 1, "epoch": epoch, "last": last, "best": BEST_FILE if self.best_epoch else None,
            "best_epoch": self.best_epoch, "best_value": self.best_value, "monitor": self.monitor,
            "mode": self.mode, "wait": self.wait, "stopped_early": self.stopped_early, "finished": finished,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _config_record(mc: ModelConfig, tc: TrainConfig, image: ImageConfig, vocab: Vocab, dim: int | None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    if mc.backbone == FROM_PROJECT:  # --init-from: how much of the project's head the vocabulary kept
        from ..ready.deepdanbooru import tags_kept

        kept = tags_kept(mc.weights, vocab.names)
        extra = {"init_from": {"project": mc.weights, "tags_kept": kept, "tags_new": len(vocab) - kept},
                 **(extra or {})}
    return {"version": CONFIG_VERSION, "model": mc.get_config(), "train": tc.get_config(),
            "image": image.get_config(), "backend": keras.backend.backend(), "keras_version": keras.__version__,
            "num_tags": mc.num_tags, "vocab_sha256": vocab.sha256, "embedding_dim": dim, **(extra or {})}


def train(data_dir: str | os.PathLike, model_dir: str | os.PathLike, *, resume: bool = False,
          quiet: bool = False, callbacks: Sequence[keras.callbacks.Callback] = (),
          distribution: DistConfig | None = None, **settings: Any) -> TrainResult:
    """Train a tagger on ``DATA/store`` into ``MODEL`` (see the module docstring for what is written).

    ``settings`` are ModelConfig / TrainConfig fields (epochs, batch_size, lr, backbone, weights, frozen,
    image_size, mixed_precision, patience, loss, workers, ...). Without ``weights`` a backbone uses its
    default: ImageNet for keras.applications backbones, none for ``tiny``. ``resume=True`` continues an
    interrupted run from its last completed epoch with the settings it was started with. ``callbacks`` are
    extra Keras callbacks (one that sets ``model.stop_training`` mid-epoch ends the run after that epoch
    is validated and recorded, as with a budget). ``distribution`` spreads the global batch over devices
    and processes (training/distribute.py; default: every local device of the JAX backend); only process 0 reads
    and writes ``MODEL``.
    """
    t_start = time.perf_counter()
    cluster = start(distribution, quiet=quiet)
    with cluster.guard():
        return _train_on(cluster, Path(data_dir), Path(model_dir), resume, quiet or not cluster.is_writer,
                         settings, list(callbacks), t_start)


def _train_on(cluster: Cluster, data_dir: Path, model_dir: Path, resume: bool, quiet: bool,
              settings: dict[str, Any], callbacks: list, t_start: float) -> TrainResult:
    model_kw, train_kw = _split_settings(settings)
    vocab = Vocab.load(data_dir / VOCAB_FILE)
    if len(vocab) == 0:
        raise AltI2VError(f"{data_dir / VOCAB_FILE} has no tags")

    def read_run() -> dict[str, Any]:  # process 0 reads MODEL; the others get what it read
        state_path = model_dir / CKPT_DIR / STATE_FILE
        saved = ModelDir(model_dir).read_config(required=False)
        state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else None
        if saved is not None and not resume:
            raise UsageError(f"{model_dir} already holds a training run; continue it with --resume, or train "
                             "into a new --model directory")
        history = read_history(model_dir / HISTORY_FILE) if (resume and state) else []
        return {"saved": saved, "state": state, "history": history}

    got = cluster.agree(read_run)
    saved, state = got["saved"], got["state"]
    resumed = bool(resume and saved is not None)
    if resumed:
        mc = ModelConfig.from_config(saved["model"])
        saved_tc = TrainConfig.from_config(saved["train"])
        _check_resume_settings(mc, saved_tc, model_kw, train_kw)
        tc = saved_tc.replace(**{k: v for k, v in train_kw.items() if k in RESUME_OVERRIDES})
        if saved.get("vocab_sha256") != vocab.sha256:
            raise AltI2VError(f"{data_dir / VOCAB_FILE} is not the vocabulary {model_dir} was trained with; "
                              "resume with the same data, or train into a new --model directory")
        if state is None:  # killed before the first epoch finished: start again, weights checked again
            mc = resolve_config(mc.replace(weights=saved["model"].get("weights")))
    else:
        bb = get_backbone(model_kw.get("backbone", "vgg16"))
        model_kw.setdefault("weights", "imagenet" if bb.pretrained else None)
        tc = TrainConfig(**train_kw)
        if tc.lr is None:
            tc = tc.replace(lr=bb.lr)
        size_given = model_kw.pop("image_size", None)
        mc = ModelConfig(num_tags=len(vocab), **model_kw)
    store = cluster.open_store(data_dir, vocab=vocab)
    try:
        if not resumed:
            if size_given is not None and int(size_given) != store.image_size:
                raise UsageError(f"the store holds {store.image_size}px images, not {size_given}px: rebuild it "
                                 f"with `--build --image-size {size_given} --rebuild`, or leave --image-size out")
            mc = resolve_config(mc.replace(image_size=store.image_size),  # weights checked before building
                                check_weights=cluster.is_writer)
        elif int(mc.image_size) != store.image_size:
            raise AltI2VError(f"{model_dir} was trained on {mc.image_size}px images but the store now holds "
                              f"{store.image_size}px ones; rebuild the store at {mc.image_size}px to resume")
        result = _train(store, data_dir, model_dir, mc, tc, vocab, state if resumed else None, resumed, quiet,
                        t_start, cluster, got["history"], callbacks)
        result.bad_records = store.bad_report()
        return result
    finally:
        store.close()


def _train(store: Store, data_dir: Path, model_dir: Path, mc: ModelConfig, tc: TrainConfig, vocab: Vocab,
           state: dict | None, resumed: bool, quiet: bool, t_start: float, cluster: Cluster,
           history: list[dict[str, Any]], callbacks: list | None = None) -> TrainResult:
    counts = store.counts()
    if counts["train"] == 0:
        raise AltI2VError(f"{store.path} has no training images; add data and run --build")
    has_val = counts["val"] > 0
    monitor = tc.monitor if has_val else tc.monitor.replace("val_", "")
    if not has_val:
        warnings.warn("the store has no validation images: early stopping and the best checkpoint follow the "
                      "training metric, and thresholds are calibrated on the training split", UserWarning,
                      stacklevel=3)
    mode = "min" if monitor.endswith("loss") else "max"
    image = store.image_config()
    if cluster.is_writer:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / CKPT_DIR).mkdir(exist_ok=True)
        _remove_temps(model_dir)
        atomic_copy(data_dir / VOCAB_FILE, model_dir / VOCAB_FILE)

    policy = precision_policy(tc.mixed_precision)
    previous_policy = keras.config.dtype_policy().name
    run = _Run(model_dir, mc, tc, monitor, mode, cluster=cluster)
    run.history = list(history) if state else []
    initial_epoch = 0
    readers = None
    try:
        keras.config.set_dtype_policy(policy)
        if state:
            initial_epoch = int(state["epoch"])
        workers = resolve_workers(tc.workers)
        if store.num_shards > 1 and readers is None and not cluster.multi_process:  # (processes read slices)
            readers = ReaderPool(store, processes=min(workers, store.num_shards))
        train_ds = StoreDataset.from_split(store, "train", batch_size=tc.batch_size, shuffle=True,
                                           augment=tc.augment, zoom=tc.zoom, seed=tc.seed, epoch=initial_epoch,
                                           workers=workers, steps=tc.steps_per_epoch, readers=readers)
        run.train_images_per_epoch = min(train_ds.num_images, len(train_ds) * tc.batch_size)
        val_ds = StoreDataset.from_split(store, "val", batch_size=tc.batch_size, workers=workers,
                                         readers=readers) if has_val else None
        if state:
            run.history = [r for r in run.history if int(r["epoch"]) <= initial_epoch]
            run.best_value, run.best_epoch = state.get("best_value"), state.get("best_epoch")
            run.wait = int(state.get("wait", 0))
            run.stopped_early = tc.patience > 0 and run.wait >= tc.patience  # --patience may have changed
        checkpoint = run.ckpt / state["last"] if state else None
        steps = len(train_ds)
        groups = run.groups = _groups(store, tc)
        if cluster.distribution is None:
            model = _model(mc, tc, checkpoint, steps, vocab.names, groups)
        else:
            model = _replicated_model(cluster, mc, tc, checkpoint, steps, vocab.names, groups)
            if cluster.is_writer:
                with cluster.host_scope():
                    run.shadow = training_model(build_model(config=mc, load_weights=False))
                    compile_model(run.shadow, tc, steps, groups)
                    run.shadow.optimizer.build(run.shadow.trainable_variables)
        keras.config.set_dtype_policy("float32")
        run.export = build_model(config=mc, load_weights=False)  # float32, uncompiled: best.keras, model.keras
        keras.config.set_dtype_policy(policy)
        dim = embedding_dim(tagger_of(model))
        if cluster.is_writer:
            atomic_write_json(model_dir / CONFIG_FILE, _config_record(mc, tc, image, vocab, dim, {
                "precision_policy": policy, "finished": False, **_groups_record(run.groups, vocab)}))

        run.nan_guard = NaNGuard()
        done = run.stopped_early or initial_epoch >= tc.epochs
        if not done:
            verbose = 0 if quiet else (1 if sys.stdout.isatty() else 2)
            try:
                with cluster.scope():
                    model.fit(cluster.dataset(train_ds), epochs=tc.epochs, initial_epoch=initial_epoch,
                              validation_data=cluster.dataset(val_ds, "val") if val_ds is not None else None,
                              callbacks=[EpochSetter(train_ds), run.nan_guard, *(callbacks or []), RunState(run)],
                              verbose=verbose, shuffle=False)
            finally:
                for ds in (train_ds, val_ds):
                    if ds is not None:
                        ds.close()
        if run.nan_guard.batch is not None:
            good = run.history[-1]["epoch"] if run.history else 0
            where = (f"batch {run.nan_guard.batch + 1}" if run.nan_guard.batch >= 0 else
                     "its metrics or validation")
            raise AltI2VError(
                f"training stopped: the loss became NaN/inf in epoch {run.nan_guard.epoch + 1}, {where} "
                f"(lr {tc.lr:g}, loss {tc.loss}, precision {policy}). "
                f"Checkpoints up to epoch {good} are kept. Try a lower --lr (e.g. {tc.lr / 10:g})"
                + (", or drop --mixed-precision" if policy != "float32" else "") +
                ", then start a new --model directory" + (f" or --resume from epoch {good}" if good else ""))
        if not run.history:
            raise AltI2VError("no epoch completed; nothing to save")
        if cluster.is_writer:  # thresholds are calibrated on process 0 alone (one pass over val)
            result = _finish(run, store, model_dir, mc, tc, image, vocab, dim, has_val, policy, quiet, readers)
        else:
            result = TrainResult(model_dir=model_dir, model_config=mc, train_config=tc, history=run.history,
                                 best_epoch=run.best_epoch, best_value=run.best_value,
                                 stopped_early=run.stopped_early, precision_policy=policy)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if readers is not None:
            readers.close()
    result.initial_epoch, result.resumed = initial_epoch, resumed
    result.params = count_params(run.export)
    result.counts = counts
    result.devices, result.process = cluster.describe(), cluster.process_index
    result.seconds = time.perf_counter() - t_start
    return result


def _groups(store: Store, tc: TrainConfig) -> list[list[int]]:
    """The exclusive tag groups of the training labels (groups.py), when the loss uses them."""
    if not (tc.group_loss and tc.loss == "bce"):
        return []
    _, labels = store.index("train")
    return exclusive_groups(label_matrix(labels, store.num_tags))


def _groups_record(groups: list[list[int]], vocab: Vocab) -> dict[str, Any]:
    """config.json's record of the groups the loss used, by tag name (none: nothing)."""
    return {"tag_groups": [[vocab.names[i] for i in g] for g in groups]} if groups else {}


def _model(mc: ModelConfig, tc: TrainConfig, checkpoint: Path | None, steps: int,
           tag_names: Sequence[str] | None = None, groups: list[list[int]] | None = None) -> keras.Model:
    """The compiled training model (augmentation step + tagger): fresh, or the checkpoint's. ``tag_names``
    map a DeepDanbooru project's head onto the vocabulary (--init-from); ``groups`` are the loss's."""
    keras.utils.set_random_seed(int(tc.seed))  # the same initial weights for the same settings
    if checkpoint is None:
        model = training_model(build_model(config=mc, tag_names=tag_names))
        compile_model(model, tc, steps, groups)
        return model
    model = keras.saving.load_model(checkpoint, safe_mode=True, compile=True)
    if tc.schedule == "cosine":  # --epochs may have changed: the schedule spans the new total
        model.optimizer.learning_rate = learning_rate(tc, steps)
    if tagger_of(model) is model:  # a checkpoint from before on-device augmentation
        warnings.warn("the checkpoint has no augmentation step; the optimizer state restarts",
                      UserWarning, stacklevel=4)
        model = training_model(model)
        compile_model(model, tc, steps, groups)
    return model


def _replicated_model(cluster: Cluster, mc: ModelConfig, tc: TrainConfig, checkpoint: Path | None,
                      steps: int, tag_names: Sequence[str] | None = None,
                      groups: list[list[int]] | None = None) -> keras.Model:
    """The training model with its variables on the device mesh, every replica starting from process 0's
    values: its fresh weights, or the checkpoint only process 0 reads (the model directory may be local
    to process 0)."""
    keras.utils.set_random_seed(int(tc.seed))
    with cluster.scope():
        model = training_model(build_model(config=mc, load_weights=cluster.is_writer and checkpoint is None,
                                           tag_names=tag_names))
        compile_model(model, tc, steps, groups)
        model.optimizer.build(model.trainable_variables)
    variables = [*model.trainable_variables, *model.non_trainable_variables, *model.optimizer.variables]
    values = None
    if cluster.is_writer:
        source = _model(mc, tc, checkpoint, steps, tag_names, groups) if checkpoint else model
        if not source.optimizer.built:
            source.optimizer.build(source.trainable_variables)
        values = [keras.ops.convert_to_numpy(v) for v in
                  (*source.trainable_variables, *source.non_trainable_variables, *source.optimizer.variables)]
    with cluster.scope():
        cluster.sync_variables(variables, values)
    return model


def _finish(run: _Run, store: Store, model_dir: Path, mc: ModelConfig, tc: TrainConfig, image: ImageConfig,
            vocab: Vocab, dim: int, has_val: bool, policy: str, quiet: bool, readers: ReaderPool | None = None
            ) -> TrainResult:
    """Best weights -> model.keras, thresholds on val -> thresholds.json, curves, final config.json."""
    best = run.ckpt / BEST_FILE
    run.export.load_weights(best)
    split = "val" if has_val else "train"
    _, y_true, y_prob = predict_split(run.export, store, split, batch_size=max(tc.batch_size, 64),
                                      workers=tc.workers, quiet=quiet, desc=f"calibrate on {split}", readers=readers)
    thresholds = calibrate_thresholds(y_true, y_prob, vocab.names, min_positives=tc.min_positives,
                                      calibrated_on=split)
    cal = prf_at(y_true, y_prob, thresholds_vector(thresholds, vocab.names))
    half = prf_at(y_true, y_prob, 0.5)
    val_scores = {"micro_f1": cal["micro_f1"], "macro_f1": cal["macro_f1"],
                  "micro_f1_at_0.5": half["micro_f1"], "macro_f1_at_0.5": half["macro_f1"]}
    atomic_write_json(model_dir / THRESHOLDS_FILE, thresholds)
    plot_curves(run.history, model_dir / CURVES_FILE)
    atomic_copy(best, model_dir / MODEL_FILE)
    atomic_write_json(model_dir / CONFIG_FILE, _config_record(mc, tc, image, vocab, dim, {
        "precision_policy": policy, "finished": True, "epochs_completed": run.history[-1]["epoch"],
        "best_epoch": run.best_epoch, "monitor": run.monitor, "best_value": run.best_value,
        "stopped_early": run.stopped_early, f"{split}_scores": val_scores, **_groups_record(run.groups, vocab)}))
    run.write_state(int(run.history[-1]["epoch"]), _last_name(run), finished=True)
    return TrainResult(model_dir=model_dir, model_config=mc, train_config=tc, history=run.history,
                       best_epoch=run.best_epoch, best_value=run.best_value, stopped_early=run.stopped_early,
                       val_scores=val_scores, thresholds=thresholds, precision_policy=policy)


def _last_name(run: _Run) -> str | None:
    lasts = sorted(run.ckpt.glob("last-e*.keras"))
    return lasts[-1].name if lasts else None


__all__ = ["train", "TrainResult", "save_model_atomic"]
