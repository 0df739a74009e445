"""Slimmable classification: the summed loss over widths of a slimmable network (Yu et al. 2019, "Slimmable Neural
Networks", section 3.3, Algorithm 1) and the accuracy at every width.

Data format 'images'. Model: `model(images=[B, H, W, C]) -> (logits [num_widths, B, classes], ModelOutput)`, one
row of logits per width multiplier of `width_mults` (the model's `width_mults`, in the same order), e.g. `slimmable`.
The objective is `sum_widths mean_examples CE`; metrics: `loss` (that sum), `loss_w{a}` and `accuracy_w{a}` per width
a, and `accuracy` at the widest width.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.models import ConfigError
from zoo.models.slimmable import width_name
from zoo.tasks.base import Task, register_task


@register_task("slimmable")
@dataclasses.dataclass(frozen=True)
class SlimmableClassification(Task):
  """Option `width_mults`: the model's width multipliers (names the per-width metrics; must match the model's)."""

  width_mults: tuple = (0.25, 0.5, 0.75, 1.0)
  formats = ("images",)

  def __post_init__(self):
    mults = self.width_mults
    if (
      not isinstance(mults, (tuple, list))
      or not mults
      or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a <= 1 for a in mults)
      or len(set(mults)) != len(mults)
    ):
      raise ConfigError(
        f"config.task_options.width_mults={mults!r} is invalid; allowed: distinct multipliers in (0, 1], "
        "the model's width_mults"
      )
    object.__setattr__(self, "width_mults", tuple(float(a) for a in mults))

  def batch_spec(self, info, data_config, batch_size):
    return {
      "image": jax.ShapeDtypeStruct((batch_size, *info["image_shape"]), jnp.float32),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
    }

  def check_model(self, model, info, data_config):
    """A model with `width_mults` (e.g. `slimmable`) must list the task's widths, in the same order."""
    del info, data_config
    mults = getattr(model, "width_mults", None)
    if mults is not None and tuple(float(a) for a in mults) != self.width_mults:
      raise ConfigError(
        f"config.model.width_mults={tuple(mults)} must equal config.task_options.width_mults={self.width_mults}"
      )

  def prepare(self, batch, rngs):
    return {"images": batch["image"]}, {}

  def stats(self, logits, targets, batch):
    """logits [num_widths, B, classes] -> the summed weighted loss and, per width, loss and correct sums [W]."""
    if logits.ndim != 3 or logits.shape[0] != len(self.width_mults):
      raise ConfigError(
        f"task 'slimmable' needs logits [num_widths={len(self.width_mults)}, batch, classes] (one per "
        f"config.task_options.width_mults={self.width_mults}); the model gives {tuple(logits.shape)}: set both "
        "width_mults alike"
      )
    labels = jnp.broadcast_to(batch["label"], logits.shape[:2])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)  # [W, B]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    width_loss = jnp.sum(ce * batch["weight"], axis=1)
    return {
      "loss_sum": jnp.sum(width_loss),
      "weight": jnp.sum(batch["weight"]),
      "width_loss_sum": width_loss,
      "width_correct": jnp.sum(correct * batch["weight"], axis=1),
    }

  def finalize(self, sums, info):
    n = max(float(sums["weight"]), 1e-9)
    loss = np.asarray(sums["width_loss_sum"], np.float64) / n
    accuracy = np.asarray(sums["width_correct"], np.float64) / n
    metrics = {"loss": float(sums["loss_sum"]) / n, "accuracy": float(accuracy[int(np.argmax(self.width_mults))])}
    for a, acc, value in zip(self.width_mults, accuracy, loss):
      metrics[f"accuracy_w{width_name(a)}"] = float(acc)
      metrics[f"loss_w{width_name(a)}"] = float(value)
    return metrics
