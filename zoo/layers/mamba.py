"""Mamba-1: a selective state-space mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", Section 3.2 Algorithm 2, Section 3.4 Figure 3), its pre-norm residual block and a stack of blocks.

The mixer (`Mamba`), for x [batch, length, d_model], with d_inner = expand * d_model:
  x, z = in_proj(x)                                 # two [.., d_inner] branches
  x = silu(causal_depthwise_conv1d(x))              # kernel d_conv, left padding d_conv - 1
  dt, B, C = x_proj(x)                              # [.., dt_rank], [.., d_state], [.., d_state]
  delta = softplus(dt_proj(dt))                     # [.., d_inner], dt_proj with bias
  A = -exp(A_log)                                   # [d_inner, d_state], S4D-real init A_log = log(1..d_state)
  h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t    # zero-order hold on A, Euler on B (Section 2, eq. 4 / 3.5)
  y_t = h_t . C_t + D x_t
  out = out_proj(y * silu(z))

The scan runs in float32 with `jax.lax.associative_scan` (Blelloch-style, Section 3.3.2 "parallel scan"), which
materialises the [batch, length, d_inner, d_state] states as the mambapy reference does (not the fused kernel's
SRAM-only recomputation); `sequential_scan` is the `lax.scan` reference. Parameter names, defaults and
initialisation follow the `mambapy` package (alxndrTL/mamba.py, `mambapy/mamba.py`, `MambaConfig`, `MambaBlock`,
`ResidualBlock`), and `load_mambapy_state_dict` converts its torch state_dicts.
"""

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers.linear import DenseGeneral
from zoo.layers.norms import RMSNorm

SCANS = ("associative", "sequential")


def _scan_inputs(x, delta, A, B):
  """Discretisation in float32: deltaA = exp(delta A), deltaB_u = delta B x, both [b, l, e, n]."""
  x, delta, A, B = (jnp.asarray(v, jnp.float32) for v in (x, delta, A, B))
  delta_a = jnp.exp(delta[..., None] * A)
  delta_b_u = delta[..., None] * B[:, :, None, :] * x[..., None]
  return delta_a, delta_b_u


def _readout(hs, x, C, D):
  """y_t = h_t . C_t + D x_t: hs [b, l, e, n], x [b, l, e], C [b, l, n], D [e] -> [b, l, e] float32."""
  C, D, x = (jnp.asarray(v, jnp.float32) for v in (C, D, x))
  return jnp.einsum("blen,bln->ble", hs, C) + D * x


def selective_scan(x, delta, A, B, C, D):
  """The selective scan (Algorithm 2, "SSM"), parallel over time with `jax.lax.associative_scan`, in float32.

  The recurrence h_t = a_t h_{t-1} + b_t (h_{-1} = 0) is the scan of the pairs (a_t, b_t) under the associative
  operator (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2); the second component of the prefix up to t is h_t.

  Args:
    x: [batch, length, d_inner] the conv branch input u.
    delta: [batch, length, d_inner] positive step sizes (after softplus).
    A: [d_inner, d_state] the (negative) state matrix diagonal.
    B: [batch, length, d_state] input projections.
    C: [batch, length, d_state] output projections.
    D: [d_inner] the skip.

  Returns:
    y [batch, length, d_inner], float32.
  """
  delta_a, delta_b_u = _scan_inputs(x, delta, A, B)

  def combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2

  _, hs = jax.lax.associative_scan(combine, (delta_a, delta_b_u), axis=1)
  return _readout(hs, x, C, D)


def sequential_scan(x, delta, A, B, C, D):
  """The same selective scan as `selective_scan`, one step at a time with `jax.lax.scan` (the reference).

  Shapes as `selective_scan`; returns y [batch, length, d_inner], float32.
  """
  delta_a, delta_b_u = _scan_inputs(x, delta, A, B)

  def step(h, ab):
    a, b = ab
    h = a * h + b
    return h, h

  h0 = jnp.zeros(delta_a.shape[:1] + delta_a.shape[2:], jnp.float32)
  _, hs = jax.lax.scan(step, h0, (jnp.moveaxis(delta_a, 1, 0), jnp.moveaxis(delta_b_u, 1, 0)))
  return _readout(jnp.moveaxis(hs, 0, 1), x, C, D)


def _uniform(scale):
  """U(-scale, scale) initialiser."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


class CausalDepthwiseConv1d(nn.Module):
  """Causal depthwise 1-D convolution over time (Algorithm 2's `Conv1d`): one `d_conv`-tap filter per channel, left
  padding `d_conv - 1`, so the output at t sees inputs t - d_conv + 1 .. t.

  Parameters: `kernel` [d_conv, channels] (tap k multiplies input t - (d_conv - 1) + k, as torch's Conv1d weight
  [channels, 1, d_conv] transposed), `bias` [channels]. Initialisation U(-1/sqrt(d_conv), 1/sqrt(d_conv)) for both,
  torch's Conv1d default, which mambapy keeps.

  Attributes:
    d_conv: kernel width.
    use_bias: learn a per-channel bias.
    channel_axis: logical name of the channel axis.
  """

  d_conv: int = 4
  use_bias: bool = True
  channel_axis: str = "mlp"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [batch, length, channels] -> [batch, length, channels] in `dtype`."""
    channels, length = x.shape[-1], x.shape[1]
    init = _uniform(1.0 / math.sqrt(self.d_conv))
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(init, (None, self.channel_axis)), (self.d_conv, channels), self.param_dtype
    )
    x = jnp.asarray(x, self.dtype)
    padded = jnp.pad(x, ((0, 0), (self.d_conv - 1, 0), (0, 0)))
    kernel = jnp.asarray(kernel, self.dtype)
    y = sum(padded[:, k : k + length] * kernel[k] for k in range(self.d_conv))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(init, (self.channel_axis,)), (channels,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class Mamba(nn.Module):
  """The Mamba-1 mixer (Section 3.4 Figure 3, Algorithm 2); mambapy's `MambaBlock`.

  Parameters (d_inner = expand * d_model, r = dt_rank): `in_proj/kernel` [d_model, 2, d_inner] (x branch, z branch),
  `conv1d/kernel` [d_conv, d_inner] and `conv1d/bias` [d_inner], `x_proj/kernel` [d_inner, r + 2 d_state],
  `dt_proj/kernel` [r, d_inner] and `dt_proj/bias` [d_inner], `A_log` [d_inner, d_state], `D` [d_inner],
  `out_proj/kernel` [d_inner, d_model] (+ `in_proj/bias` [2, d_inner], `out_proj/bias` [d_model] when `use_bias`).

  Initialisation as mambapy's mixer (which follows the paper's reference `mamba_simple.py`): `dt_proj/kernel`
  U(-s, s) ("random") or the constant s ("constant"), s = dt_rank^-0.5 * dt_scale; `dt_proj/bias` =
  softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at dt_init_floor, so softplus(bias) starts in that
  range (Section 3.6); `A_log` = log(1..d_state) per channel (S4D-real); `D` = 1. in_proj, x_proj and out_proj use
  the zoo's fan-in truncated normal [guess: mambapy's mixer keeps torch's Linear default U(+-1/sqrt(fan_in)), and
  its MambaLM re-initialises them N(0, 0.02)].

  Attributes:
    d_state: N, the state size per channel.
    d_conv: width of the causal depthwise convolution.
    expand: E, d_inner = E * d_model.
    dt_rank: rank of the delta projection; "auto" = ceil(d_model / 16).
    dt_min, dt_max, dt_init, dt_scale, dt_init_floor: initialisation of dt_proj (above).
    use_bias: biases on in_proj and out_proj (mambapy `bias`, default False).
    conv_bias: bias on the convolution (mambapy `conv_bias`, default True).
    scan: "associative" (`selective_scan`) or "sequential" (`sequential_scan`); the same numbers.
    dtype: compute dtype of the projections and the convolution; the scan always runs in float32.
  """

  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init: str = "random"
  dt_scale: float = 1.0
  dt_init_floor: float = 1e-4
  use_bias: bool = False
  conv_bias: bool = True
  scan: str = "associative"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def rank(self, d_model):
    """dt_rank resolved for a model width."""
    return math.ceil(d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

  @nn.compact
  def __call__(self, x):
    """x: [batch, length, d_model] -> [batch, length, d_model] in `dtype`."""
    if self.scan not in SCANS:
      raise ValueError(f"scan={self.scan!r} is not known; choose one of {SCANS}")
    if self.dt_init not in ("random", "constant"):
      raise ValueError(f"dt_init={self.dt_init!r}: choose 'random' or 'constant'")
    d_model = x.shape[-1]
    d_inner, rank, n = self.expand * d_model, self.rank(d_model), self.d_state
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    in_proj = DenseGeneral(
      (2, d_inner), kernel_axes=("embed", None, "mlp"), use_bias=self.use_bias, name="in_proj", **dense
    )
    xz = in_proj(x)
    x, z = xz[..., 0, :], xz[..., 1, :]
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = jax.nn.silu(CausalDepthwiseConv1d(self.d_conv, self.conv_bias, name="conv1d", **dense)(x))

    dt_b_c = DenseGeneral(rank + 2 * n, kernel_axes=("mlp", None), name="x_proj", **dense)(x)
    dt, B, C = jnp.split(dt_b_c, [rank, rank + n], axis=-1)
    dt_std = rank**-0.5 * self.dt_scale
    dt_kernel_init = _uniform(dt_std) if self.dt_init == "random" else nn.initializers.constant(dt_std)
    delta = DenseGeneral(
      d_inner,
      kernel_axes=(None, "mlp"),
      use_bias=True,
      kernel_init=dt_kernel_init,
      bias_init=self._dt_bias_init,
      name="dt_proj",
      **dense,
    )(dt)
    delta = jax.nn.softplus(delta.astype(jnp.float32))

    a_log_init = lambda key, shape, dtype: jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=dtype)), shape)
    A_log = self.param("A_log", nn.with_logical_partitioning(a_log_init, ("mlp", None)), (d_inner, n), jnp.float32)
    D = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)), (d_inner,), jnp.float32)
    A = -jnp.exp(A_log.astype(jnp.float32))
    scan = selective_scan if self.scan == "associative" else sequential_scan
    y = scan(x, delta, A, B, C, D)

    y = y.astype(self.dtype) * jax.nn.silu(z)
    y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
    return DenseGeneral(d_model, kernel_axes=("mlp", "embed"), use_bias=self.use_bias, name="out_proj", **dense)(y)

  def _dt_bias_init(self, key, shape, dtype=jnp.float32):
    """softplus^-1(dt), dt = exp(U(log dt_min, log dt_max)) floored at dt_init_floor (mambapy / mamba_simple.py)."""
    log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(self.dt_min), math.log(self.dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), self.dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


# The `Mamba` fields `MambaBlock` and `MambaStack` pass on.
MIXER_FIELDS = ("d_state", "d_conv", "expand", "dt_rank", "use_bias", "conv_bias", "scan", "dtype", "param_dtype")


class MambaBlock(nn.Module):
  """Pre-norm residual Mamba block, mambapy's `ResidualBlock`: `x + Mamba(RMSNorm(x))`.

  Parameters: `norm/scale` [d_model], `mixer/...` (see `Mamba`).

  Attributes:
    d_state, d_conv, expand, dt_rank, use_bias, conv_bias, scan: passed to `Mamba` (its other fields keep their
      defaults).
    norm_eps: RMSNorm epsilon (mambapy `rms_norm_eps`, 1e-5).
  """

  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"
  use_bias: bool = False
  conv_bias: bool = True
  scan: str = "associative"
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [batch, length, d_model] -> [batch, length, d_model]."""
    h = RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    h = Mamba(**{k: getattr(self, k) for k in MIXER_FIELDS}, name="mixer")(h)
    return x + h.astype(x.dtype)


class MambaStack(nn.Module):
  """`n_layers` `MambaBlock`s (mambapy's `Mamba`), then an optional final RMSNorm (mambapy's `MambaLM.norm_f`).

  Parameters: `layers_{i}/...` (see `MambaBlock`), `norm_f/scale` [d_model] when `final_norm`.

  Attributes:
    n_layers: number of blocks.
    final_norm: apply `norm_f` after the last block.
    remaining fields: as `MambaBlock`.
  """

  n_layers: int
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"
  use_bias: bool = False
  conv_bias: bool = True
  scan: str = "associative"
  norm_eps: float = 1e-5
  final_norm: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [batch, length, d_model] -> [batch, length, d_model]."""
    for i in range(self.n_layers):
      x = MambaBlock(**{k: getattr(self, k) for k in (*MIXER_FIELDS, "norm_eps")}, name=f"layers_{i}")(x)
    if self.final_norm:
      x = RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm_f")(x)
    return x


def _convert_leaf(module, param, value):
  """One mambapy tensor (numpy) -> (flax module name, flax param name, array)."""
  if module in ("norm", "norm_f") and param == "weight":
    return module, "scale", value
  if module == "conv1d":  # weight [d_inner, 1, d_conv] -> kernel [d_conv, d_inner]
    return module, "kernel" if param == "weight" else "bias", value[:, 0, :].T if param == "weight" else value
  if module in ("in_proj", "x_proj", "dt_proj", "out_proj"):
    if param == "weight":  # torch Linear [out, in] -> kernel [in, out]
      kernel = value.T
      if module == "in_proj":  # [d_model, 2 d_inner] -> [d_model, 2, d_inner] (x branch first, as torch.chunk)
        kernel = kernel.reshape(kernel.shape[0], 2, kernel.shape[1] // 2)
      return module, "kernel", kernel
    if param == "bias":
      return module, "bias", value.reshape(2, -1) if module == "in_proj" else value
  raise ValueError(f"mambapy parameter {module}.{param} has no counterpart here (muP / inner layernorms unsupported)")


def load_mambapy_state_dict(state_dict, *, prefix=""):
  """A mambapy torch state_dict -> the Flax params tree (the contents of `variables["params"]`), as numpy float32.

  Accepts the state_dict of mambapy's `MambaBlock` (-> `Mamba`), `ResidualBlock` (-> `MambaBlock`), `Mamba`
  (-> `MambaStack(final_norm=False)`) or, with `prefix="mamba."` plus its `norm_f.weight`, a `MambaLM` body
  (-> `MambaStack(final_norm=True)`; embedding and lm_head are skipped). Linear weights are transposed, the conv
  weight [d_inner, 1, d_conv] becomes the depthwise kernel [d_conv, d_inner], in_proj splits into [.., 2, d_inner].

  Args:
    state_dict: name -> torch tensor (or anything `np.asarray` takes).
    prefix: stripped from every key; keys outside it (other than `norm_f.*`) are ignored.

  Returns:
    nested dict of numpy arrays, e.g. `{"layers_0": {"mixer": {"in_proj": {"kernel": ...}}, "norm": ...}}`.
  """
  params = {}
  for key, tensor in state_dict.items():
    if key.startswith(prefix):
      key = key[len(prefix) :]
    elif not key.startswith("norm_f."):
      continue
    if key.split(".")[0] in ("embedding", "lm_head"):
      continue
    value = tensor.detach().cpu().float().numpy() if hasattr(tensor, "detach") else np.asarray(tensor, np.float32)
    parts = re.sub(r"(^|\.)layers\.(\d+)(?=\.)", r"\1layers_\2", key).split(".")
    if parts[-1] in ("A_log", "D"):  # mixer-level parameters, kept as they are
      path, name = parts[:-1], parts[-1]
    elif len(parts) >= 2:
      module, name, value = _convert_leaf(parts[-2], parts[-1], value)
      path = parts[:-2] + [module]
    else:
      raise ValueError(f"mambapy parameter {key} has no counterpart here")
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[name] = np.ascontiguousarray(value, np.float32)
  return params
