"""Feed-forward layers: gated (GLU family) and plain two-layer MLPs.

- GLU variants (SwiGLU, ReGLU, GEGLU): Shazeer 2020, "GLU Variants Improve Transformer", eqs. 5-6:
  `down(act(gate(x)) * up(x))`.
- Plain MLP: Vaswani et al. 2017, eq. 2: `down(act(up(x)))`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers.linear import DenseGeneral

# name -> (activation function, gated)
ACTIVATIONS = {
  "swiglu": (jax.nn.silu, True),
  "reglu": (jax.nn.relu, True),
  "geglu": (lambda x: jax.nn.gelu(x, approximate=True), True),
  "gelu": (lambda x: jax.nn.gelu(x, approximate=True), False),
  "gelu_exact": (lambda x: jax.nn.gelu(x, approximate=False), False),
  "relu": (jax.nn.relu, False),
  "silu": (jax.nn.silu, False),
}


def check_activation(activation):
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is not known; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[activation]


class MLP(nn.Module):
  """Position-wise feed-forward layer.

  Parameters: `gate/kernel` (gated only) and `up/kernel` [embed, mlp], `down/kernel` [mlp, embed] (+ biases).

  Attributes:
    hidden_dim: inner width.
    activation: one of ACTIVATIONS (`swiglu`, `reglu`, `geglu` are gated; `gelu`, `gelu_exact`, `relu`, `silu`
      plain).
    use_bias: biases on every projection.
  """

  hidden_dim: int
  activation: str = "swiglu"
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic=True, hidden_gates=None):
    """x: [batch, length, embed] -> [batch, length, embed]. `deterministic` is unused (uniform FFN interface).
    hidden_gates: optional [batch, hidden_dim] multipliers of the inner units (structured pruning: a 0 removes the
    unit; APTP, `zoo.models.aptp`)."""
    del deterministic
    act, gated = check_activation(self.activation)
    dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h = DenseGeneral(self.hidden_dim, kernel_axes=("embed", "mlp"), name="up", **dense)(x)
    if gated:
      h = act(DenseGeneral(self.hidden_dim, kernel_axes=("embed", "mlp"), name="gate", **dense)(x)) * h
    else:
      h = act(h)
    if hidden_gates is not None:
      h = h * hidden_gates.astype(h.dtype)[:, None, :]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return DenseGeneral(x.shape[-1], kernel_axes=("mlp", "embed"), name="down", **dense)(h)
