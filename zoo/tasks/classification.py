"""Image classification: cross-entropy and accuracy.

Data format 'images' (`zoo.data`): `image` float32 [B, H, W, C], `label` int32 [B]; with `data.augment.mixup` > 0
also `label_b` int32 [B] and `mix` float32 [B] (mixup, Zhang et al. 2018: the image is mix * x_a + (1 - mix) * x_b).
Model: `model(images=image[B, H, W, C]) -> (logits [B, classes], ModelOutput)`.
"""

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from zoo.models import ConfigError
from zoo.tasks.base import Task, register_task


def label_stats(logits, labels, weight, labels_b=None, mix=None):
  """Weighted sums of cross-entropy and correct predictions; logits [B, C], labels [B], weight [B].

  With `labels_b` [B] and `mix` [B] (a mixup batch), the loss of a row is mix CE(labels) + (1 - mix) CE(labels_b),
  the cross-entropy against the mixed one-hot target (mixup, Zhang et al. 2018, eq. (1)), and a prediction is correct
  when it is the dominant label (labels where mix >= 1/2, else labels_b) [guess: the paper scores only unmixed test
  images]. mix = 1 gives exactly the unmixed sums.
  """
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mix is not None:
    ce_b = optax.softmax_cross_entropy_with_integer_labels(logits, labels_b)
    ce = mix * ce + (1.0 - mix) * ce_b
    labels = jnp.where(mix >= 0.5, labels, labels_b)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce * weight), "weight": jnp.sum(weight), "correct": jnp.sum(correct * weight)}


def label_metrics(sums):
  n = max(float(sums["weight"]), 1e-9)
  return {"loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n}


def _mixup(data_config) -> bool:
  """Whether the data config mixes batches (`data.augment.mixup` > 0); configs written before it do not."""
  augment = data_config.get("augment") if hasattr(data_config, "get") else None
  return bool(augment and augment.get("mixup"))


@dataclasses.dataclass(frozen=True)
class LabelTask(Task):
  """Base of the tasks with one label per example: the batch holds the model's inputs (`input_spec`) plus `label`
  int32 [B] and `weight` float32 [B] (and `label_b` int32 [B], `mix` float32 [B] for mixup data); the model gives
  logits [B, classes]; reports loss and accuracy."""

  def input_spec(self, info, data_config, batch_size):
    """{name: jax.ShapeDtypeStruct} of the batch entries besides `label` and `weight`."""
    raise NotImplementedError

  def batch_spec(self, info, data_config, batch_size):
    spec = {
      **self.input_spec(info, data_config, batch_size),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
    }
    if info.get("format") == "images" and _mixup(data_config):
      spec["label_b"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
      spec["mix"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return spec

  def stats(self, logits, targets, batch):
    return label_stats(logits, batch["label"], batch["weight"], batch.get("label_b"), batch.get("mix"))

  def finalize(self, sums, info):
    return label_metrics(sums)


@register_task("classification")
@dataclasses.dataclass(frozen=True)
class ImageClassification(LabelTask):
  """One label per image; reports loss and accuracy.

  `check_model` refuses, at start-up, a model whose image keys do not fit the dataset's images (after
  `data.image_size` and `data.channels`): `MODEL_IMAGE_KEYS` maps each key an image model may have to what it must
  agree with ('channels': equal to C; 'size': equal to H = W; 'divides': a divisor of H and W).
  """

  formats = ("images",)
  MODEL_IMAGE_KEYS: ClassVar[dict[str, str]] = {
    "in_channels": "channels",
    "channels": "channels",
    "image_size": "size",
    "patch_size": "divides",
  }

  def input_spec(self, info, data_config, batch_size):
    return {"image": jax.ShapeDtypeStruct((batch_size, *info["image_shape"]), jnp.float32)}

  def prepare(self, batch, rngs):
    return {"images": batch["image"]}, {}

  def check_model(self, model, info, data_config):
    """Raises ConfigError naming the first field of `MODEL_IMAGE_KEYS` of the built `model` that the dataset's images
    do not fit, the model's value, the dataset's and the data option that makes the images fit."""
    height, width, channels = info["image_shape"]
    images = f"the {height}x{width}x{channels} images of dataset {data_config.get('name')!r}"
    for key, relation in self.MODEL_IMAGE_KEYS.items():
      value = getattr(model, key, None)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        continue  # the model has no such field
      if relation == "channels" and value != channels:
        fix = f"config.data.channels={value}" if channels == 1 or (channels, value) == (3, 1) else ""
        raise ConfigError(
          f"config.model.{key}={value} does not fit {images} ({channels} channel(s)); allowed: "
          f"config.model.{key}={channels}{' or ' + fix if fix else ''}"
        )
      if relation == "size" and (height, width) != (value, value):
        square = f"config.model.{key}={height} or " if height == width else ""
        raise ConfigError(
          f"config.model.{key}={value} does not fit {images}; allowed: {square}config.data.image_size={value} "
          f"(bilinear resize)"
        )
      if relation == "divides" and (height % value or width % value):
        size = math.ceil(max(height, width) / value) * value
        raise ConfigError(
          f"config.model.{key}={value} does not divide {images}; allowed: a config.model.{key} that divides "
          f"{height} and {width}, or config.data.image_size={size} (a multiple of {value})"
        )
