"""Image classification: cross-entropy and accuracy.

Data format 'images' (`zoo.data`): `image` float32 [B, H, W, C], `label` int32 [B].
Model: `model(images=image[B, H, W, C]) -> (logits [B, classes], ModelOutput)`.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax

from zoo.tasks.base import Task, register_task


def label_stats(logits, labels, weight):
  """Weighted sums of cross-entropy and correct predictions; logits [B, C], labels [B], weight [B]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce * weight), "weight": jnp.sum(weight), "correct": jnp.sum(correct * weight)}


def label_metrics(sums):
  n = max(float(sums["weight"]), 1e-9)
  return {"loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n}


@register_task("classification")
@dataclasses.dataclass(frozen=True)
class ImageClassification(Task):
  """One label per image; reports loss and accuracy."""
  formats = ("images",)
  throughput_key = "examples_per_sec"

  def batch_spec(self, info, data_config, batch_size):
    return {"image": jax.ShapeDtypeStruct((batch_size, *info["image_shape"]), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def prepare(self, batch, rngs):
    return {"images": batch["image"]}, {}

  def stats(self, logits, targets, batch):
    return label_stats(logits, batch["label"], batch["weight"])

  def finalize(self, sums, info):
    return label_metrics(sums)
