"""Slimmable encoder for split computing: "Slimmable Encoders for Flexible Split DNNs in Bandwidth and Resource
Constrained IoT Systems" (the seed abstract; papers.md E, [paper; design guess]), with the slimmable-network mechanics
of Yu et al. 2019, "Slimmable Neural Networks" (ICLR 2019, sections 3.1-3.3).

One set of shared weights serves every width multiplier a in `width_mults`: at width a every layer uses the first
`round(a * C)` of its C output channels (and the first channels of its input that the layer before produced), so the
narrower networks are nested in the wider ones (Yu et al. section 3.1). Each width has its own BatchNorm parameters
and statistics ("switchable BatchNorm", section 3.2: `bn_{i}` for `width_mults[i]`), since the statistics of a channel
differ between widths. Training sums the losses of every width, one forward per width per step (section 3.3,
Algorithm 1; the task `slimmable` sums them).

Split computing (the seed): the device runs the encoder (`encoder_widths` convs, then a 1x1 bottleneck conv whose
output is what the device transmits), the server the decoder (`decoder_widths` convs, global average pooling, the
classifier); the width chosen at run time sets both the device's compute and the transmitted size
(`transmitted_w{a}` in the metrics: values per example). Layer sizes, the bottleneck's BatchNorm + ReLU and the
rounding of a * C are [guess]; the seed gives no architecture or parameter count.
"""

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model


def slim_channels(channels, mult):
  """The channels a layer of `channels` uses at width multiplier `mult` in (0, 1]: round(mult * channels), >= 1."""
  return max(1, int(math.floor(mult * channels + 0.5)))


def width_name(mult):
  """'0.25', '0.5', '1.0': how metric names spell a width multiplier."""
  return str(float(mult))


class SlimConv(nn.Module):
  """A convolution whose kernel [k, k, max_in, max_out] is sliced to the input's channels and `out` outputs.
  x: [B, H, W, cin <= max_in] -> [B, H', W', out]."""

  max_in: int
  max_out: int
  kernel_size: int
  strides: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, out):
    k = self.kernel_size
    init = nn.with_logical_partitioning(nn.initializers.kaiming_normal(), (None, None, "conv_in", "conv_out"))
    kernel = self.param("kernel", init, (k, k, self.max_in, self.max_out), self.param_dtype)
    kernel = kernel[:, :, : x.shape[-1], :out].astype(self.dtype)
    return jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel,
      (self.strides, self.strides),
      ((k // 2, k // 2), (k // 2, k // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class SlimDense(nn.Module):
  """A dense layer whose kernel [max_in, features] is sliced to the input's features. x: [B, in] -> [B, features]."""

  max_in: int
  features: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", None))
    kernel = self.param("kernel", init, (self.max_in, self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (self.features,))
    return x.astype(self.dtype) @ kernel[: x.shape[-1]].astype(self.dtype) + bias.astype(self.dtype)


@register_model("slimmable")
class SlimmableEncoder(nn.Module):
  """Shared-weight encoder-decoder classifier evaluated at every width multiplier. Config keys are the fields below.

  Attributes:
    num_classes: classifier outputs.
    width_mults: the width multipliers, each in (0, 1], distinct (e.g. (0.25, 0.5, 0.75, 1.0)).
    encoder_widths: the device-side 3x3 convs' channels at width 1.
    encoder_strides: their strides.
    bottleneck: the channels of the transmitted tensor at width 1 (a 1x1 conv).
    decoder_widths: the server-side 3x3 convs' channels at width 1.
    bn_momentum: BatchNorm running-average momentum (Flax convention).
    bn_epsilon: BatchNorm epsilon.
    dtype: compute dtype; logits are returned in float32.
    param_dtype: parameter dtype.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  num_classes: int = 10
  width_mults: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
  encoder_widths: tuple[int, ...] = (16, 32)
  encoder_strides: tuple[int, ...] = (1, 2)
  bottleneck: int = 16
  decoder_widths: tuple[int, ...] = (32,)
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("num_classes", "bottleneck"),
      intervals={"bn_momentum": "[0, 1)", "bn_epsilon": "(0, inf)"},
      dtypes=("dtype", "param_dtype"),
    )
    mults = self.width_mults
    if (
      not isinstance(mults, (tuple, list))
      or not mults
      or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a <= 1 for a in mults)
      or len(set(mults)) != len(mults)
    ):
      raise ConfigError(
        f"config.model.width_mults={mults!r} is invalid; allowed: distinct multipliers in (0, 1], "
        "e.g. (0.25, 0.5, 0.75, 1.0)"
      )
    for key in ("encoder_widths", "encoder_strides", "decoder_widths"):
      value = getattr(self, key)
      if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"config.model.{key}={value!r} must be a tuple of positive integers")
    if len(self.encoder_strides) != len(self.encoder_widths):
      raise ConfigError(
        f"config.model.encoder_strides={self.encoder_strides!r} must give one stride per encoder_widths entry "
        f"({len(self.encoder_widths)})"
      )
    super().__post_init__()

  def layers(self, in_channels):
    """([(name, max_in, max_out, kernel, stride)] of the convolutions, encoder then bottleneck then decoder; the
    classifier's input features)."""
    out, c = [], in_channels
    for i, (w, s) in enumerate(zip(self.encoder_widths, self.encoder_strides)):
      out.append((f"encoder_{i}", c, w, 3, s))
      c = w
    out.append(("bottleneck", c, self.bottleneck, 1, 1))
    c = self.bottleneck
    for i, w in enumerate(self.decoder_widths):
      out.append((f"decoder_{i}", c, w, 3, 1))
      c = w
    return out, c

  @nn.compact
  def __call__(self, images, *, deterministic=True):
    """Classify images at every width.

    Args:
      images: [batch, height, width, channels] float.
      deterministic: False uses each width's batch statistics and updates its running ones (apply with
        `mutable=["batch_stats"]`).

    Returns:
      (logits [num_widths, batch, num_classes] float32, ModelOutput with metrics `transmitted_w{a}`: the values per
      example the device sends at width a).
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be float [batch, height, width, channels], got {images.dtype} {images.shape}")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    layers, last = self.layers(images.shape[-1])
    convs = {name: SlimConv(cin, cout, k, s, dtype, param_dtype, name=name) for name, cin, cout, k, s in layers}
    classifier = SlimDense(last, self.num_classes, dtype, param_dtype, name="classifier")
    logits, metrics = [], {}
    for i, mult in enumerate(self.width_mults):  # one forward per width (Yu et al. Algorithm 1)
      x = images.astype(dtype)
      for name, _, cout, _, _ in layers:
        x = convs[name](x, slim_channels(cout, mult))
        x = nn.BatchNorm(
          use_running_average=deterministic,
          momentum=self.bn_momentum,
          epsilon=self.bn_epsilon,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
          dtype=dtype,
          param_dtype=param_dtype,
          name=f"{name}_bn_{i}",
        )(x)
        x = nn.relu(x)
        if name == "bottleneck":
          metrics[f"transmitted_w{width_name(mult)}"] = jnp.asarray(x.shape[1] * x.shape[2] * x.shape[3], jnp.float32)
      logits.append(classifier(jnp.mean(x, axis=(1, 2))).astype(jnp.float32))
    return jnp.stack(logits), ModelOutput(metrics=metrics)
