"""Routing metrics per layer (pure functions returning arrays) and the expert-load heatmap used by evaluate.py."""

import jax
import jax.numpy as jnp

from zoo.routing import losses


def routing_metrics(logits, probs, expert_ids, num_experts):
  """Per-layer routing metrics.

  Args:
    logits: [tokens, E] router logits.
    probs: [tokens, E] router probabilities (a distribution per token).
    expert_ids: [tokens, k] selected experts (-1 = empty slot).
    num_experts: E.

  Returns:
    dict with
      'expert_load': [E] fraction of assignments per expert (sums to 1);
      'load_imbalance': scalar, max load / mean load (1 = perfectly balanced, E = all on one expert);
      'router_entropy': scalar, mean over tokens of -sum_e p log p (nats);
      'router_z': scalar, mean over tokens of logsumexp(logits).
  """
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  probs = jax.lax.stop_gradient(probs.astype(jnp.float32))
  load = losses.expert_fraction(expert_ids, num_experts)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
  return {
    "expert_load": load,
    "load_imbalance": num_experts * jnp.max(load),
    "router_entropy": jnp.mean(entropy),
    "router_z": jnp.mean(jax.nn.logsumexp(logits, axis=-1)),
  }


def stack_layer_metrics(per_layer):
  """Stacks a list of per-layer metric dicts (same keys) into one dict of [layers, ...] arrays."""
  if not per_layer:
    return {}
  keys = set(per_layer[0])
  for i, m in enumerate(per_layer):
    if set(m) != keys:
      raise ValueError(f"layer {i} has metrics {sorted(m)}, layer 0 has {sorted(keys)}")
  return {k: jnp.stack([m[k] for m in per_layer]) for k in sorted(keys)}
