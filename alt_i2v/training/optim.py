"""How a run optimises: the mixed-precision policy, the learning-rate schedule, the optimizer, compile."""

from __future__ import annotations

import keras

from ..config import TrainConfig
from ..errors import UsageError
from ..model.losses import get_loss


def precision_policy(mixed_precision: str | None) -> str:
    """The Keras dtype policy for ``--mixed-precision`` (auto: bfloat16 on an accelerator, else float32)."""
    mp = (mixed_precision or "none").lower()
    if mp in ("none", "float32"):
        return "float32"
    if mp in ("float16", "mixed_float16"):
        return "mixed_float16"
    if mp in ("bfloat16", "mixed_bfloat16"):
        return "mixed_bfloat16"
    if mp == "auto":
        return "mixed_bfloat16" if has_accelerator() else "float32"
    raise UsageError(f"unknown mixed precision {mixed_precision!r}; use auto, float16 or bfloat16")


def has_accelerator() -> bool:
    """Whether the current Keras backend sees a GPU (or other accelerator)."""
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return jax.default_backend() != "cpu"
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - detection only
        return False
    return False


def learning_rate(tc: TrainConfig, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """``constant``: ``lr`` throughout. ``cosine``: linear warm-up from lr/10 over ``warmup_epochs``, then cosine
    decay to lr/100 at the last epoch: the large early steps that find a good region, then the small late
    ones that settle in it, without a decay schedule to tune per dataset."""
    lr = float(tc.lr)
    if tc.schedule == "constant":
        return lr
    total = max(1, int(tc.epochs) * max(1, int(steps_per_epoch)))
    warm = min(int(round(float(tc.warmup_epochs) * steps_per_epoch)), total // 2)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr / 10 if warm else lr, decay_steps=max(1, total - warm), alpha=0.01,
        warmup_target=lr if warm else None, warmup_steps=warm)


def make_optimizer(tc: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """AdamW (decoupled weight decay, the default) or Adam, on :func:`learning_rate`'s schedule."""
    lr = learning_rate(tc, steps_per_epoch)
    if tc.optimizer == "adamw" and float(tc.weight_decay) > 0:
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=float(tc.weight_decay))
    return keras.optimizers.Adam(learning_rate=lr)


def compile_model(model: keras.Model, tc: TrainConfig, steps_per_epoch: int,
                  groups: list[list[int]] | None = None) -> None:
    """Compile with the run's optimizer, loss and the AUC / mAP / micro-F1 metrics that history.csv records;
    ``groups`` (exclusive tag groups, groups.py) get the loss's softmax term when ``tc.group_loss`` > 0."""
    model.compile(
        optimizer=make_optimizer(tc, steps_per_epoch),
        loss=get_loss(tc.loss, focal_gamma=tc.focal_gamma, asl_gamma_neg=tc.asl_gamma_neg,
                      asl_gamma_pos=tc.asl_gamma_pos, asl_clip=tc.asl_clip, label_smoothing=tc.label_smoothing,
                      groups=groups, group_weight=tc.group_loss),
        metrics=[keras.metrics.AUC(name="auc"),
                 keras.metrics.AUC(curve="PR", multi_label=True, num_thresholds=100, name="map"),
                 keras.metrics.F1Score(average="micro", threshold=0.5, name="f1")])
