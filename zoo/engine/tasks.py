"""The task table: how a batch feeds a model and how its output is scored. The engine knows tasks, not models.

Every task reduces a batch to weighted sums (`loss_sum`, `weight`, ...) so that evaluation over many batches, some of
them padded, is exact; `finalize` turns accumulated sums into the reported metrics.
"""
import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Task:
  """One task.

  inputs: batch -> the model's positional input (`tokens` [B, T] or `images` [B, H, W, C]).
  dummy_batch: (info, data_config, batch_size) -> a batch of jnp arrays with the right shapes; the engine only
    takes its shapes (`jax.eval_shape`), so nothing is allocated.
  stats: (logits, batch) -> dict of weighted sums; `loss_sum / weight` is the loss that is minimised.
  finalize: (sums, info) -> dict of float metrics.
  throughput_key: the metrics.jsonl name of the throughput, and how many items a batch holds.
  """
  inputs: Callable
  dummy_batch: Callable
  stats: Callable
  finalize: Callable
  throughput_key: str
  items: Callable


def _lm_dummy(info, data_config, batch_size):
  seq_len = int(data_config.seq_len)
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {"inputs": z, "targets": z, "mask": jnp.ones((batch_size, seq_len), jnp.float32),
          "weight": jnp.ones((batch_size,), jnp.float32)}


def _lm_stats(logits, batch):
  """logits: [B, T, V]; batch['targets']: [B, T]; batch['mask']: [B, T]; batch['weight']: [B]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  w = batch["mask"] * batch["weight"][:, None]
  return {"loss_sum": jnp.sum(ce * w), "weight": jnp.sum(w)}


def _lm_finalize(sums, info):
  loss = float(sums["loss_sum"]) / max(float(sums["weight"]), 1e-9)
  # Bits per byte: the byte tokenizer gives one token per byte; other tokenizers report bytes_per_token.
  bytes_per_token = float(info.get("bytes_per_token", 1.0))
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
          "bits_per_byte": loss / math.log(2) / bytes_per_token}


def _cls_dummy(info, data_config, batch_size):
  return {"image": jnp.zeros((batch_size, *info["image_shape"]), jnp.float32),
          "label": jnp.zeros((batch_size,), jnp.int32), "weight": jnp.ones((batch_size,), jnp.float32)}


def _cls_stats(logits, batch):
  """logits: [B, classes]; batch['label']: [B]; batch['weight']: [B]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
  w = batch["weight"]
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce * w), "weight": jnp.sum(w), "correct": jnp.sum(correct * w)}


def _cls_finalize(sums, info):
  n = max(float(sums["weight"]), 1e-9)
  return {"loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n}


TASKS = {
    "lm": Task(inputs=lambda b: b["inputs"], dummy_batch=_lm_dummy, stats=_lm_stats, finalize=_lm_finalize,
               throughput_key="tokens_per_sec", items=lambda b: int(np.sum(b["mask"]))),
    "classification": Task(inputs=lambda b: b["image"], dummy_batch=_cls_dummy, stats=_cls_stats,
                           finalize=_cls_finalize, throughput_key="examples_per_sec",
                           items=lambda b: int(b["label"].shape[0])),
}


def get_task(name):
  from zoo.models import ConfigError
  if name not in TASKS:
    raise ConfigError(f"config.task={name!r} is not a known task; choose one of {sorted(TASKS)}")
  return TASKS[name]


def reduce_stats(stats_list):
  """Sum a list of stats dicts (host floats)."""
  return {k: sum(float(s[k]) for s in stats_list) for k in stats_list[0]}

