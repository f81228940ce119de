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

import os
import sys
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import keras

from ..config import ImageConfig, ModelConfig, TrainConfig, resolve_workers
from ..data.vocab import VOCAB_FILE, Vocab
from ..errors import AltI2VError, UsageError
from ..model.backbones import FROM_PROJECT, get_backbone, resolve_config
from ..model.build import build_model, count_params, embedding_dim, with_tta
from ..model.modeldir import ModelDir, config_record
from ..model.thresholds import thresholds_vector
from ..store import Store
from .augment import tagger_of, training_model
from .distribute import Cluster, DistConfig, start
from .epochs import NaNGuard, Run, RunState
from .evaluation import predict_split
from .groups import exclusive_groups, label_matrix
from .metrics import prf_at
from .optim import compile_model, learning_rate, precision_policy
from .pipeline import EpochSetter, StoreDataset
from .readers import ReaderPool
from .result import TrainResult
from .thresholds import calibrate_thresholds

MODEL_FIELDS = {f.name for f in fields(ModelConfig)} - {"num_tags"}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
RESUME_OVERRIDES = {"epochs", "patience", "workers"}  # what --resume may change


# ---------------------------------------------------------------------------------------------------------
# Helpers: files, precision, settings


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
        md = ModelDir(model_dir)
        saved = md.read_config(required=False)
        state = md.read_state()
        if saved is not None and not resume:
            raise UsageError(f"{model_dir} already holds a training run; continue it with --resume, or train "
                             "into a new --model directory")
        history = md.read_history() if (resume and state) else []
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
        result = _train(_Job(store, data_dir, model_dir, mc, tc, vocab, state if resumed else None, resumed, quiet,
                             t_start, cluster, got["history"], callbacks))
        result.bad_records = store.bad_report()
        return result
    finally:
        store.close()


def _init_from(mc: ModelConfig, vocab: Vocab) -> dict[str, Any]:
    """config.json's ``init_from`` (--init-from): how much of the project's head the vocabulary kept."""
    if mc.backbone != FROM_PROJECT:
        return {}
    from ..ready.deepdanbooru import tags_kept

    kept = tags_kept(mc.weights, vocab.names)
    return {"init_from": {"project": mc.weights, "tags_kept": kept, "tags_new": len(vocab) - kept}}


@dataclass
class _Job:
    """One training run as :func:`_train_on` resolved it: the open store, the directories, the settings
    (fresh or resumed), where a resumed run stands, and this process's place in the cluster."""

    store: Store
    data_dir: Path
    model_dir: Path
    model: ModelConfig
    train: TrainConfig
    vocab: Vocab
    state: dict[str, Any] | None  # checkpoints/state.json of a resumed run
    resumed: bool
    quiet: bool
    t_start: float
    cluster: Cluster
    history: list[dict[str, Any]]
    callbacks: list


def _train(job: _Job) -> TrainResult:
    store, data_dir, model_dir, mc, tc, vocab = job.store, job.data_dir, job.model_dir, job.model, job.train, job.vocab
    state, cluster, quiet = job.state, job.cluster, job.quiet
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
        ModelDir(model_dir).create().write_vocab(data_dir / VOCAB_FILE)

    policy = precision_policy(tc.mixed_precision)
    previous_policy = keras.config.dtype_policy().name
    run = Run(model_dir, mc, tc, monitor, mode, cluster=cluster)
    run.history = list(job.history) if state else []
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
        checkpoint = run.dir.checkpoints / state["last"] if state else None
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
            run.dir.write_config(config_record(mc, tc, image, vocab, dim, **_init_from(mc, vocab),
                                               **_groups_record(run.groups, vocab), precision_policy=policy,
                                               finished=False))

        run.nan_guard = NaNGuard()
        done = run.stopped_early or initial_epoch >= tc.epochs
        if not done:
            verbose = 0 if quiet else (1 if sys.stdout.isatty() else 2)
            try:
                with cluster.scope():
                    model.fit(cluster.dataset(train_ds), epochs=tc.epochs, initial_epoch=initial_epoch,
                              validation_data=cluster.dataset(val_ds, "val") if val_ds is not None else None,
                              callbacks=[EpochSetter(train_ds), run.nan_guard, *job.callbacks, RunState(run)],
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
            result = _finish(job, run, image, dim, has_val, policy, readers)
        else:
            result = TrainResult(model_dir=model_dir, model_config=mc, train_config=tc, history=run.history,
                                 best_epoch=run.best_epoch, best_value=run.best_value,
                                 stopped_early=run.stopped_early, precision_policy=policy)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if readers is not None:
            readers.close()
    result.initial_epoch, result.resumed = initial_epoch, job.resumed
    result.params = count_params(run.export)
    result.counts = counts
    result.devices, result.process = cluster.describe(), cluster.process_index
    result.seconds = time.perf_counter() - job.t_start
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


def _finish(job: _Job, run: Run, image: ImageConfig, dim: int, has_val: bool, policy: str,
            readers: ReaderPool | None = None) -> TrainResult:
    """Best weights -> model.keras, thresholds on val -> thresholds.json, curves, final config.json."""
    store, model_dir, mc, tc, vocab, quiet = job.store, job.model_dir, job.model, job.train, job.vocab, job.quiet
    best = run.dir.best_file
    run.export.load_weights(best)
    split = "val" if has_val else "train"
    _, y_true, y_prob = predict_split(with_tta(run.export, mc.tta), store, split, batch_size=max(tc.batch_size, 64),
                                      workers=tc.workers, quiet=quiet, desc=f"calibrate on {split}", readers=readers)
    thresholds = calibrate_thresholds(y_true, y_prob, vocab.names, min_positives=tc.min_positives,
                                      calibrated_on=split)
    cal = prf_at(y_true, y_prob, thresholds_vector(thresholds, vocab.names))
    half = prf_at(y_true, y_prob, 0.5)
    val_scores = {"micro_f1": cal["micro_f1"], "macro_f1": cal["macro_f1"],
                  "micro_f1_at_0.5": half["micro_f1"], "macro_f1_at_0.5": half["macro_f1"]}
    md = run.dir
    md.write_thresholds(thresholds)
    md.write_curves(run.history)
    md.write_model(best)
    md.write_config(config_record(mc, tc, image, vocab, dim, **_init_from(mc, vocab), **{
        "precision_policy": policy, "finished": True, "epochs_completed": run.history[-1]["epoch"],
        "best_epoch": run.best_epoch, "monitor": run.monitor, "best_value": run.best_value,
        "stopped_early": run.stopped_early, f"{split}_scores": val_scores, **_groups_record(run.groups, vocab)}))
    last = md.last_checkpoint()
    run.write_state(int(run.history[-1]["epoch"]), last.name if last else None, finished=True)
    return TrainResult(model_dir=model_dir, model_config=mc, train_config=tc, history=run.history,
                       best_epoch=run.best_epoch, best_value=run.best_value, stopped_early=run.stopped_early,
                       val_scores=val_scores, thresholds=thresholds, precision_policy=policy)


__all__ = ["train", "TrainResult"]
