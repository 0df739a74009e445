"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4), computed in float32."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def rms_norm(x, scale=None, *, epsilon=1e-6):
  """`x / sqrt(mean(x^2) + eps) * scale` over the last axis, in float32.

  Args:
    x: [..., features], any float dtype.
    scale: [features] or None.
    epsilon: added to the mean square.

  Returns:
    float32 array of the shape of `x`.
  """
  x = x.astype(jnp.float32)
  y = x * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + epsilon))
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned scale (init 1); math in float32, output in `dtype`.

  Attributes:
    epsilon: added to the mean square (1e-6 in Qwen2/3, 1e-5 in LLaMA).
    use_scale: learn a per-feature scale `scale` [features].
    axis_name: logical name of the scale's axis.
  """

  epsilon: float = 1e-6
  use_scale: bool = True
  axis_name: str = "norm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [..., features] -> [..., features] in `dtype`."""
    scale = None
    if self.use_scale:
      scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype
      )
    return rms_norm(x, scale, epsilon=self.epsilon).astype(self.dtype)
