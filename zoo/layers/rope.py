"""Rotary position embedding (RoPE), Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding", eq. 34, with the context-extension frequency scalings of the Hugging Face checkpoints.

Pairs are formed by splitting the head dimension in halves (feature `i` rotates with feature `i + head_dim/2`), the
layout of the LLaMA/Qwen/Mistral checkpoints, with frequencies `theta^(-2i/head_dim)`. Because each pair is rotated by
`position * frequency`, `rope(q, m) . rope(k, n)` depends on `m - n` only.

Scalings (`rope_scaling`, the Hugging Face `rope_parameters` / `rope_scaling` dict, `rope_type` in ROPE_TYPES):
- `linear`: position interpolation, every frequency divided by `factor` (Chen et al. 2023, "Extending Context Window
  of Large Language Models via Positional Interpolation").
- `llama3`: Llama 3.1's piecewise rule (released with the Llama 3.1 weights; [guess: the rule is not written out in
  "The Llama 3 Herd of Models"]): wavelengths longer than `original_max_position_embeddings / low_freq_factor` are
  divided by `factor`, those shorter than `original_max_position_embeddings / high_freq_factor` are kept, and the
  ones in between are blended linearly.
- `yarn`: Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models", section 3.2
  ("NTK-by-parts" ramp between interpolated and kept frequencies, `beta_fast`/`beta_slow`) and eq. 22 (the attention
  temperature `0.1 ln(factor) + 1`, applied by scaling cos and sin), with DeepSeek's `mscale`/`mscale_all_dim` ratio.
"""

import math

import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_REQUIRED = {
  "linear": ("factor",),
  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
  "yarn": ("factor", "original_max_position_embeddings"),
}


def rope_type(rope_scaling):
  """The scaling kind of a `rope_scaling` dict (`rope_type`, or the older `type` key; None -> 'default')."""
  rope_scaling = rope_scaling or {}
  return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def check_rope_scaling(rope_scaling):
  """Raise ValueError unless `rope_scaling` is None or a dict of a supported type with its required keys."""
  if rope_scaling is None:
    return
  if not hasattr(rope_scaling, "get"):
    raise ValueError(f"rope_scaling={rope_scaling!r} must be None or a dict with 'rope_type' in {ROPE_TYPES}")
  kind = rope_type(rope_scaling)
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling type {kind!r} is not supported; choose one of {ROPE_TYPES}")
  missing = [key for key in _REQUIRED.get(kind, ()) if rope_scaling.get(key) is None]
  if missing:
    raise ValueError(f"rope_scaling of type {kind!r} needs {list(missing)}; got {dict(rope_scaling)}")
  if kind != "default" and float(rope_scaling["factor"]) <= 0:
    raise ValueError(f"rope_scaling factor={rope_scaling['factor']} must be positive")


def yarn_mscale(factor, mscale=1.0):
  """YaRN's attention temperature `0.1 * mscale * ln(factor) + 1` (YaRN eq. 22; 1 for factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(head_dim, theta=10000.0):
  """Unscaled inverse frequencies `theta^(-2i/head_dim)` [head_dim // 2] in float32."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def scaled_rope_frequencies(dim, theta, rope_scaling=None):
  """RoPE inverse frequencies with optional context-extension scaling.

  Args:
    dim: rotary width (even).
    theta: RoPE base.
    rope_scaling: None or a dict with `rope_type` (or `type`) in ROPE_TYPES and its parameters, as in a Hugging Face
      config: `factor` (linear, llama3, yarn); `low_freq_factor`, `high_freq_factor`,
      `original_max_position_embeddings` (llama3); `original_max_position_embeddings`, `beta_fast` (32),
      `beta_slow` (1), `mscale`, `mscale_all_dim`, `attention_factor`, `truncate` (True) (yarn).

  Returns:
    (inv_freq [dim // 2] float32, attention_factor float): cos and sin are multiplied by `attention_factor` (YaRN's
    temperature; 1 for the other types).
  """
  inv_freq = rope_frequencies(dim, theta)
  check_rope_scaling(rope_scaling)
  kind = rope_type(rope_scaling)
  if kind == "default":
    return inv_freq, 1.0
  factor = float(rope_scaling["factor"])
  if kind == "linear":
    return inv_freq / factor, 1.0
  original = rope_scaling["original_max_position_embeddings"]
  if kind == "llama3":
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled), 1.0
  # YaRN: ramp between interpolated (low frequencies) and kept (high frequencies) by rotations per context.
  mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
  attention_factor = rope_scaling.get("attention_factor")
  if attention_factor is None:
    attention_factor = (
      yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
      if mscale and mscale_all_dim
      else yarn_mscale(factor)
    )
  beta_fast = rope_scaling.get("beta_fast") or 32
  beta_slow = rope_scaling.get("beta_slow") or 1

  def correction_dim(rotations):
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rope_scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
  return inv_freq, float(attention_factor)


def apply_rope(x, positions, *, theta=10000.0, rope_scaling=None):
  """Rotate `x` by its absolute positions.

  Args:
    x: [batch, length, heads, head_dim].
    positions: [batch, length] integer absolute positions.
    theta: base wavelength (`rope_theta`).
    rope_scaling: None or a Hugging Face-style scaling dict (see `scaled_rope_frequencies`).

  Returns:
    array like `x` (same dtype); the rotation is computed in float32.
  """
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions shape {positions.shape} must be [batch, length] = {x.shape[:2]}")
  inv_freq, attention_factor = scaled_rope_frequencies(x.shape[-1], theta, rope_scaling)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, D/2]
  sin, cos = jnp.sin(angles) * attention_factor, jnp.cos(angles) * attention_factor
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
