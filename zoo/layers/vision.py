"""Pieces the image models share: PyTorch's default initialisation (for weights converted to and from PyTorch
models, and for inits that follow the authors' PyTorch code) and stochastic depth."""

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's default Conv and Linear init (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def drop_path(x, rate, rng):
  """Stochastic depth (Huang et al. 2016): each example's branch x [B, ...] is zeroed with probability `rate`, the
  rest scaled by 1 / (1 - rate)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))
