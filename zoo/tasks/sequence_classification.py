"""Sequence classification: one label per token window (e.g. which part of a corpus a window of text comes from).

Data format 'labelled_text' (`zoo.data`, a text dataset read with `data.label_key`): `inputs` int32 [B, T] (one
window of a document, padded), `mask` float32 [B, T] (1 on real tokens), `label` int32 [B] (the document's label).
Model: `model(tokens=inputs[B, T], mask=mask[B, T]) -> (logits [B, classes], ModelOutput)` (e.g. `text_encoder`).
Reports loss, accuracy and macro F1 over the classes the evaluated split holds.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zoo.tasks.base import register_task
from zoo.tasks.classification import LabelTask


@register_task("sequence_classification")
@dataclasses.dataclass(frozen=True)
class SequenceClassification(LabelTask):
  """Cross-entropy of one label per sequence."""

  formats = ("labelled_text",)

  def input_spec(self, info, data_config, batch_size):
    shape = (batch_size, int(data_config.seq_len))
    return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32), "mask": jax.ShapeDtypeStruct(shape, jnp.float32)}

  def prepare(self, batch, rngs):
    return {"tokens": batch["inputs"], "mask": batch["mask"]}, {}

  def stats(self, logits, targets, batch):
    """logits: [B, C]; also per-class true positives, predictions and labels (weighted) for macro F1."""
    sums = super().stats(logits, targets, batch)
    classes = logits.shape[-1]
    w = batch["weight"][:, None]
    predicted = jax.nn.one_hot(jnp.argmax(logits, -1), classes) * w
    actual = jax.nn.one_hot(batch["label"], classes) * w
    return {
      **sums,
      "class_true_positive": jnp.sum(predicted * actual, 0),
      "class_predicted": jnp.sum(predicted, 0),
      "class_actual": jnp.sum(actual, 0),
    }

  def finalize(self, sums, info):
    tp, predicted, actual = (
      np.asarray(sums[k], np.float64) for k in ("class_true_positive", "class_predicted", "class_actual")
    )
    present = actual > 0
    f1 = 2 * tp[present] / np.maximum(predicted[present] + actual[present], 1e-9)
    return {**super().finalize(sums, info), "f1_macro": float(f1.mean()) if f1.size else 0.0}
