"""What happens at the end of every epoch: the NaN guard, then the best and last checkpoints, history.csv,
early-stopping counters and state.json, in an order that a kill at any moment cannot make inconsistent
(:class:`RunState` over a :class:`Run`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from ..config import ModelConfig, TrainConfig
from ..errors import AltI2VError
from ..model.modeldir import BEST_FILE, ModelDir
from .augment import tagger_of


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

    def __init__(self, run: "Run"):
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
            run.dir.write_checkpoint(run.export, BEST_FILE)
        last = f"last-e{epoch + 1:04d}.keras"
        run.dir.write_checkpoint(run.saveable(self.model), last)
        run.dir.write_history(run.history)
        run.write_state(epoch + 1, last)
        for old in run.dir.checkpoints.glob("last-e*.keras"):
            if old.name != last:
                old.unlink(missing_ok=True)
        if seconds > 10:
            run.dir.write_curves(run.history)


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


@dataclass
class Run:
    """A run's state between epochs: settings, history, the best epoch so far, early-stopping counters,
    and (distributed) the cluster and the local copy checkpoints are saved from."""

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
    def dir(self) -> ModelDir:
        return ModelDir(self.model_dir)

    def write_state(self, epoch: int, last: str | None, finished: bool = False) -> None:
        self.dir.write_state({
            "version": 1, "epoch": epoch, "last": last, "best": BEST_FILE if self.best_epoch else None,
            "best_epoch": self.best_epoch, "best_value": self.best_value, "monitor": self.monitor,
            "mode": self.mode, "wait": self.wait, "stopped_early": self.stopped_early, "finished": finished,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


__all__ = ["NaNGuard", "RunState", "Run"]
