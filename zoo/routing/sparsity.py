"""Scheduled and learned expert sparsity: SMoE-Dropout's growing k (papers.md A7).

- `expert_count_schedule` / `truncate_routing`: SMoE-Dropout (Chen et al. 2023, "Sparse MoE as the New Dropout:
  Scaling Dense and Self-Slimmable Transformers", Sec. 3.2; VITA-Group/Random-MoE-as-Dropout). The number of active
  experts k grows with the training step; routing is computed once for k_max experts and the slots past k(t) are
  emptied, so k can follow a traced step without a new compilation per k.
"""
import math

import jax
import jax.numpy as jnp

from zoo.routing import losses
from zoo.routing.routers import Routing

K_SCHEDULES = ("linear", "cosine", "exponential", "step", "constant")


def expert_count_schedule(step, total_steps, k_min, k_max, kind="linear"):
  """Active experts k at a training step (SMoE-Dropout, Sec. 3.2).

  With `s = clip(step / total_steps, 0, 1)`:
    linear: `k = round((k_max - k_min) s) + k_min` (the paper's schedule, `zoo.routing.smoe_dropout_k`);
    cosine [guess]: `k = round((k_max - k_min) (1 - cos(pi s)) / 2) + k_min`;
    exponential [guess]: `k = round(k_min (k_max / k_min)^s)` (geometric growth);
    step [guess]: k doubles at equal intervals, `k = min(k_min 2^floor((n + 1) s), k_max)` with
      `n = ceil(log2(k_max / k_min))` doublings (k_max from the last interval on);
    constant: `k = k_max`.

  Args:
    step: scalar int (may be traced).
    total_steps: T, the step where k reaches k_max (> 0).
    k_min, k_max: 1 <= k_min <= k_max.
    kind: one of K_SCHEDULES.

  Returns:
    scalar int32 k in [k_min, k_max].
  """
  if kind not in K_SCHEDULES:
    raise ValueError(f"k schedule {kind!r} is unknown; allowed: {K_SCHEDULES}")
  if not 1 <= k_min <= k_max:
    raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1")
  s = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  span = k_max - k_min
  if kind == "linear":
    k = jnp.round(span * s) + k_min
  elif kind == "cosine":
    k = jnp.round(span * (1.0 - jnp.cos(jnp.pi * s)) / 2.0) + k_min
  elif kind == "exponential":
    k = jnp.round(k_min * (k_max / k_min) ** s)
  elif kind == "step":
    doublings = math.ceil(math.log2(k_max / k_min))
    k = k_min * 2.0 ** jnp.minimum(jnp.floor((doublings + 1) * s), doublings)
  else:
    k = jnp.asarray(float(k_max))
  return jnp.clip(k, k_min, k_max).astype(jnp.int32)


def truncate_routing(routing, k):
  """Keeps the first k slots of a top-k_max routing and renormalises their weights to sum 1.

  The slots of `softmax_topk` are sorted by probability, so the result is the softmax over the top-k logits, the
  SMoE-Dropout router, for a k that may be traced. The load and the load-balance loss are recomputed on the kept
  slots.

  Args:
    routing: a Routing whose slots are sorted by decreasing weight (`softmax_topk`).
    k: scalar int (may be traced), 1..k_max.

  Returns:
    Routing with the same [tokens, k_max] shapes: slots >= k hold expert -1 and weight 0; metrics gain 'active_k'.
  """
  num_experts = routing.num_experts
  keep = jnp.arange(routing.expert_ids.shape[-1]) < k
  expert_ids = jnp.where(keep, routing.expert_ids, -1)
  weights = jnp.where(keep, routing.weights, 0.0)
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-20)
  load = losses.expert_fraction(expert_ids, num_experts)
  aux = dict(routing.aux)
  if "load_balance" in aux:
    aux["load_balance"] = losses.load_balance_loss(routing.probs, expert_ids, num_experts)
  metrics = {**routing.metrics, "expert_load": load, "load_imbalance": num_experts * jnp.max(load),
             "active_k": jnp.asarray(k, jnp.float32)}
  return Routing(expert_ids=expert_ids, weights=weights, probs=routing.probs, aux=aux, metrics=metrics,
                 capacity=routing.capacity)
