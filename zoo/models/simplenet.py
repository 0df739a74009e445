"""SimpleNet: Hasanpour et al. 2016, "Lets Keep it simple, Using simple architectures to outperform deeper and more
complex architectures" (arXiv:1608.06037), the 13-layer CIFAR-10 network (section 3, table of the architecture).

13 convolutions, each Conv-BN-ReLU: 64, 128, 128, 128, P, 128, 128, 256, P, 256, 256, P, 512, 2048 (1x1),
256 (1x1), P, 256; then global max pooling and a linear classifier. P = 2x2 max pooling, stride 2. The paper reports
5.48M parameters for CIFAR-10 (the convolution kernels alone: 5,482,176).

From the authors' PyTorch port [code]: BatchNorm eps 1e-5, momentum 0.05 (Flax momentum 0.95), Dropout2d(0.1) after
every pooling stage (here channel-wise dropout, `dropout_rate`). Differences [guess]: the convolutions have no bias
(a BatchNorm follows each one) and dropout is also applied before the classifier.

Reduced configs: `width_multiplier` scales every width (rounded, at least 1), or `widths` gives all 13 explicitly;
`num_pools` keeps only the first `num_pools` pooling stages, so e.g. `num_pools=3` works on 8x8 digits.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model

# (width, kernel size) per convolution; the pooling stages follow the convolutions at these 0-based indices.
CONVS = (
  (64, 3),
  (128, 3),
  (128, 3),
  (128, 3),
  (128, 3),
  (128, 3),
  (256, 3),
  (256, 3),
  (256, 3),
  (512, 3),
  (2048, 1),
  (256, 1),
  (256, 3),
)
POOL_AFTER = (3, 6, 8, 11)


@register_model("simplenet")
class SimpleNet(nn.Module):
  """SimpleNet image classifier. Config keys are the fields below.

  Attributes:
    num_classes: classifier outputs.
    width_multiplier: scales the paper's widths (ignored when `widths` is given).
    widths: optional 13 explicit widths.
    num_pools: how many of the 4 pooling stages to keep (the first ones).
    dropout_rate: channel-wise dropout after each kept pooling stage and before the classifier (training only).
    bn_momentum: BatchNorm running-average momentum.
    bn_epsilon: BatchNorm epsilon.
    dtype: compute dtype (name or dtype); logits are returned in float32.
    param_dtype: parameter dtype.

  `exposes` (the `zoo.models` contract): the per-token outputs the model sows into 'intermediates'; none here.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  num_classes: int = 10
  width_multiplier: float = 1.0
  widths: tuple[int, ...] | None = None
  num_pools: int = 4
  dropout_rate: float = 0.1
  bn_momentum: float = 0.95
  bn_epsilon: float = 1e-5
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("num_classes",),
      intervals={"width_multiplier": "(0, inf)", "dropout_rate": "[0, 1)"},
      dtypes=("dtype", "param_dtype"),
    )
    if self.widths is not None and (len(self.widths) != len(CONVS) or min(self.widths) < 1):
      raise ConfigError(f"config.model.widths={self.widths} must be {len(CONVS)} positive integers (or None)")
    if self.num_pools not in range(len(POOL_AFTER) + 1):
      raise ConfigError(f"config.model.num_pools={self.num_pools} must be in 0..{len(POOL_AFTER)}")
    super().__post_init__()

  @property
  def resolved_widths(self):
    if self.widths is not None:
      return tuple(int(w) for w in self.widths)
    return tuple(max(1, round(w * self.width_multiplier)) for w, _ in CONVS)

  @nn.compact
  def __call__(self, images, *, deterministic=True):
    """Classify images.

    Args:
      images: [batch, height, width, channels] float.
      deterministic: True uses the BatchNorm running statistics and no dropout; False normalises with the batch
        statistics and updates `batch_stats` (apply with `mutable=["batch_stats"]`).

    Returns:
      (logits [batch, num_classes] float32, ModelOutput with no aux loss).
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be float [batch, height, width, channels], got {images.dtype} {images.shape}")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    pools = POOL_AFTER[: self.num_pools]
    norm_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    zero_init = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
    x = images.astype(dtype)
    for i, (width, (_, kernel)) in enumerate(zip(self.resolved_widths, CONVS)):
      conv_init = nn.with_logical_partitioning(nn.initializers.kaiming_normal(), (None, None, "conv_in", "conv_out"))
      x = nn.Conv(
        width,
        (kernel, kernel),
        padding="SAME",
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=f"conv_{i}",
      )(x)
      x = nn.BatchNorm(
        use_running_average=deterministic,
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        scale_init=norm_init,
        bias_init=zero_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=f"bn_{i}",
      )(x)
      x = nn.relu(x)
      if i in pools:
        if min(x.shape[1:3]) < 2:
          raise ValueError(
            f"image {images.shape[1:3]} is too small for {self.num_pools} pooling stages "
            f"(feature map {x.shape[1:3]} before pool {pools.index(i) + 1}); lower num_pools"
          )
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(x, deterministic=deterministic)
    x = jnp.max(x, axis=(1, 2))  # global max pooling
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    logits = nn.Dense(
      self.num_classes,
      dtype=dtype,
      param_dtype=param_dtype,
      name="classifier",
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
    )(x)
    return logits.astype(jnp.float32), ModelOutput()
