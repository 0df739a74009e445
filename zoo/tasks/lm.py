"""Language modelling: next-token cross-entropy over packed text.

Data format 'text' (`zoo.data`): `inputs`, `targets` int32 [B, T] (targets = inputs shifted by one), `mask` float32
[B, T] (0 on padding), `target_bytes` float32 [B, T] (the UTF-8 bytes of text each target token stands for, 0 for
special tokens: from the tokenizer's offsets, so bits per byte are right for any tokenizer).
Model: `model(tokens=inputs[B, T]) -> (logits [B, T, V], ModelOutput)`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.tasks.base import Task, register_task


@register_task("lm")
@dataclasses.dataclass(frozen=True)
class LanguageModeling(Task):
  """Next-token prediction; reports loss (nats per token), perplexity and bits per byte."""

  formats = ("text",)
  throughput_key = "tokens_per_sec"
  default_evals = ("sample",)

  def batch_spec(self, info, data_config, batch_size):
    shape = (batch_size, int(data_config.seq_len))
    return {
      "inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
      "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
      "mask": jax.ShapeDtypeStruct(shape, jnp.float32),
      "target_bytes": jax.ShapeDtypeStruct(shape, jnp.float32),
      "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
    }

  def prepare(self, batch, rngs):
    return {"tokens": batch["inputs"]}, {}

  def stats(self, logits, targets, batch):
    """logits: [B, T, V]; batch['targets'], ['mask'], ['target_bytes']: [B, T]; batch['weight']: [B]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    w = batch["mask"] * batch["weight"][:, None]
    return {"loss_sum": jnp.sum(ce * w), "weight": jnp.sum(w), "bytes": jnp.sum(batch["target_bytes"] * w)}

  def finalize(self, sums, info):
    loss = float(sums["loss_sum"]) / max(float(sums["weight"]), 1e-9)
    bits = float(sums["loss_sum"]) / math.log(2) / max(float(sums["bytes"]), 1e-9)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": bits}

  def items(self, batch):
    return int(np.sum(batch["mask"]))
