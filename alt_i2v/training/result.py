"""What a training run did (:class:`TrainResult`) and the one-screen summary the CLI prints of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig, TrainConfig


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


__all__ = ["TrainResult"]
