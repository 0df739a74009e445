"""Rotary position embedding (RoPE), Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding", eq. 34.

Pairs are formed by splitting the head dimension in halves (feature `i` rotates with feature `i + head_dim/2`), the
layout of the LLaMA/Qwen/Mistral checkpoints, with frequencies `theta^(-2i/head_dim)`. Because each pair is rotated by
`position * frequency`, `rope(q, m) . rope(k, n)` depends on `m - n` only.
"""
import jax.numpy as jnp


def rope_frequencies(head_dim, theta=10000.0):
  """Inverse frequencies [head_dim // 2] in float32."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x, positions, *, theta=10000.0):
  """Rotate `x` by its absolute positions.

  Args:
    x: [batch, length, heads, head_dim].
    positions: [batch, length] integer absolute positions.
    theta: base wavelength (`rope_theta`).

  Returns:
    array like `x` (same dtype); the rotation is computed in float32.
  """
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions shape {positions.shape} must be [batch, length] = {x.shape[:2]}")
  freqs = rope_frequencies(x.shape[-1], theta)
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, T, 1, D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
