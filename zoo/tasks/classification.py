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


@dataclasses.dataclass(frozen=True)
class LabelTask(Task):
  """Base of the tasks with one label per example: the batch holds the model's inputs (`input_spec`) plus `label`
  int32 [B] and `weight` float32 [B]; the model gives logits [B, classes]; reports loss and accuracy."""

  def input_spec(self, info, data_config, batch_size):
    """{name: jax.ShapeDtypeStruct} of the batch entries besides `label` and `weight`."""
    raise NotImplementedError

  def batch_spec(self, info, data_config, batch_size):
    return {
      **self.input_spec(info, data_config, batch_size),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
    }

  def stats(self, logits, targets, batch):
    return label_stats(logits, batch["label"], batch["weight"])

  def finalize(self, sums, info):
    return label_metrics(sums)


@register_task("classification")
@dataclasses.dataclass(frozen=True)
class ImageClassification(LabelTask):
  """One label per image; reports loss and accuracy."""

  formats = ("images",)

  def input_spec(self, info, data_config, batch_size):
    return {"image": jax.ShapeDtypeStruct((batch_size, *info["image_shape"]), jnp.float32)}

  def prepare(self, batch, rngs):
    return {"images": batch["image"]}, {}
