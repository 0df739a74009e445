"""A dense projection over one or more input axes with logically partitioned parameters."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers import nf4


def _as_tuple(value):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class DenseGeneral(nn.Module):
  """`y = x . kernel (+ bias)`, contracting the input axes `axis` against the leading kernel axes.

  Attributes:
    features: output feature shape, an int or a tuple (e.g. `(heads, head_dim)`).
    axis: input axes to contract (e.g. `(-2, -1)` for `[.., heads, head_dim]` inputs).
    kernel_axes: logical axis names of the kernel `[*contracted, *features]` (see `zoo/layers/axes.py`).
    use_bias: add a bias of shape `features` (logical names = the trailing `kernel_axes`).
    dtype: compute dtype; parameters are cast to it.
    param_dtype: storage dtype of the parameters.
    kernel_init: initializer called with the full kernel shape; default: fan-in truncated normal (LeCun) where
      fan-in is the product of the contracted axes.

  A kernel given as an `nf4.NF4Tensor` (a frozen base quantised for QLoRA, `zoo.layers.lora`) is dequantised to
  `dtype` inside the call.
  """

  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  kernel_axes: tuple[str | None, ...] = ()
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable | None = None
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    """x: [..., *contracted] -> [..., *features]."""
    features = _as_tuple(self.features)
    axis = tuple(a % x.ndim for a in _as_tuple(self.axis))
    n_in = len(axis)
    if axis != tuple(range(x.ndim - n_in, x.ndim)):
      raise ValueError(f"{self.name}: axis={self.axis} must be the trailing axes of an input of rank {x.ndim}")
    kernel_shape = tuple(x.shape[a] for a in axis) + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(
        f"{self.name}: kernel_axes={self.kernel_axes} must name all {len(kernel_shape)} kernel axes "
        f"of shape {kernel_shape}"
      )
    init = self.kernel_init or nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, len(kernel_shape)))
    )
    stored = self.get_variable("params", "kernel")
    if isinstance(stored, nf4.NF4Tensor):  # a frozen base kept in 4 bits (QLoRA): dequantised for this matmul
      if stored.shape != kernel_shape:
        raise ValueError(f"{self.name}: the NF4 kernel has shape {stored.shape}, the layer needs {kernel_shape}")
      kernel = nf4.dequantize(stored, self.dtype)
    else:
      kernel = self.param(
        "kernel", nn.with_logical_partitioning(init, self.kernel_axes), kernel_shape, self.param_dtype
      )
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param(
        "bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[n_in:]), features, self.param_dtype
      )
      y = y + jnp.asarray(bias, self.dtype)
    return y
