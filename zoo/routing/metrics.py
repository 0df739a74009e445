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


def plot_expert_load(expert_load, path, *, title="Expert load by layer"):
  """Saves a PNG heatmap of expert load, one row per layer.

  Args:
    expert_load: [layers, experts] fraction of assignments per expert (e.g. `metrics['expert_load']`).
    path: output .png path.
    title: figure title.

  Returns:
    path.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  load = np.asarray(expert_load, dtype=np.float32)
  if load.ndim == 1:
    load = load[None]
  if load.ndim != 2:
    raise ValueError(f"expert_load must be [layers, experts], got shape {load.shape}")
  layers, experts = load.shape
  fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * experts + 2), max(2.5, 0.3 * layers + 1.5)))
  image = ax.imshow(load * experts, aspect="auto", cmap="viridis", interpolation="nearest")
  fig.colorbar(image, ax=ax, label="load x experts (1 = balanced)")
  ax.set_xlabel("expert")
  ax.set_ylabel("layer")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
