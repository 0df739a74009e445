"""LowFormer: Nottebaum, Dunnhofer and Micheloni, "LowFormer: Hardware Efficient Design for Convolutional Transformer
Backbones" (WACV 2025, arXiv:2409.03460; code altair199797/LowFormer), the convolutional transformer classifier with
"lowtention", computed exactly as timm's `lowformer_*` models (timm 1.0.31, `timm/models/lowformer.py`), whose weights
`zoo.checkpoints.timm_weights` converts. The E1/E2/E3 variants come from the authors' journal extension ("Beyond
MACs", IJCV 2026): the same network without the attention and/or MLP branches.

Shapes are NHWC: images [B, H, W, C] -> logits [B, num_classes].

Network (paper section 3, figure 2; `widths` = the stem's and the four stages' widths, `depths` their block counts):
- Stem: Conv3x3/s`stem_stride` -> BN -> Hardswish, then depths[0] (Fused)MBConv blocks (expansion
  `stem_expand_ratio`) with identity shortcuts.
- Stages 1-2: depths[i] (Fused)MBConv blocks (FusedMBConv with `fused_conv`, the authors' default, else MBConv);
  the first has stride `stage_strides[i]`, expansion `downsample_expand_ratios[i]` and no shortcut, the others
  stride 1, expansion `expand_ratio` and a shortcut.
- Stages 3-4: a downsampling (Fused)MBConv block as above, then depths[i] LowFormer blocks (section 3.2):
      x = x + Lowtention(GN(x))
      x = x + W_2 GELU(W_1 GN(x))          (1x1 convolutions with bias, width mlp_ratio * C)
      x = x + LocalBlock(x)                FusedMBConv while C < 256, else MBConv (expansion expand_ratio, biases)
  GN = GroupNorm with one group (normalises over H, W and C). Without the MLP branch (E1, E2, E3) the attention
  branch has no GroupNorm either; without attention (E1, E2) the block is the MLP and local branches.
- Head: 1x1 conv (no bias) -> BN -> Hardswish at head_widths[0], global average pooling, Linear (no bias) to
  head_widths[1] -> LayerNorm -> Hardswish -> Dropout -> Linear(num_classes).

FusedMBConv: Conv3x3/s (bias in the LowFormer blocks) -> BN -> Hardswish -> Conv1x1 (no bias) -> BN, width
m = round(C_in * ratio) in between. MBConv: Conv1x1 (bias as above) -> Hardswish -> depthwise Conv3x3/s (bias as
above) -> Hardswish -> Conv1x1 (no bias) -> BN.

Lowtention (paper section 3.2, eq. 1-2; `ConvAttention` in timm), for x [B, H, W, C] and attention stride s (2 in
stage 3, 1 in stage 4: `attention_strides`):
    heads = max(1, floor(C / 2 / 30)),  d = floor(floor(C / heads) / 2)
    y   = BN(DWConv_{k}/s(x))                          k = 5 when s > 1, else 3; [B, H/s, W/s, C]
    qkv = W_qkv y                                      1x1, no bias, heads * 3d channels: per head [q | k | v]
    o   = softmax(q k^T / sqrt(d)) v                   per head over the (H/s)(W/s) tokens; [B, H/s, W/s, heads * d]
    out = Up(o)[:, :H, :W]                             transposed conv with bias, kernel 2s, stride s, padding s/2
                                                       (kernel 3, stride 1, padding 1 when s = 1)
  With `fused_conv` (the authors' default) Up maps heads * d -> C itself (the output projection folded in);
  without it a 1x1 output projection (bias) maps to C and Up is depthwise. The transposed convolution is computed as
  the equivalent convolution over the input dilated by s, padded by kernel - 1 - padding, with the flipped kernel (the
  stored kernel is that equivalent one, HWIO; the converter flips timm's).

Per variant (timm's `lowformer_*` defaults): widths, depths, head_widths, stem_expand_ratio,
downsample_expand_ratios, attention, mlp in VARIANTS; expand_ratio 4, mlp_ratio 4, fused_conv on, BN eps 1e-5
(momentum 0.1, Flax 0.9), GroupNorm/LayerNorm eps 1e-5, GELU exact. Parameters (= timm's count): b0 14,100,472,
b1 17,936,312, b15 33,982,028, b2 44,986,912, b3 57,086,920, e1 18,896,268, e2 22,750,664, e3 41,316,808; the
authors' README gives 14.1M / 17.9M / 33.9M / 57.1M for B0 / B1 / B1.5 / B3. ImageNet-1k top-1 (README): 78.4 / 79.9
/ 81.2 / 83.6.

Differences and choices:
- Every image size >= 1 is taken, as timm's (the upsampled map is cropped to the input's).
- Initialisation [guess/simplification]: convolution kernels PyTorch's default (uniform, variance 1 / (3 fan_in),
  fan_in of the equivalent forward kernel for the transposed convolution), their biases zero (PyTorch draws them
  uniformly); the two head Linear layers truncated normal std 0.02 with zero bias, as timm.
- BatchNorm in training normalises with the biased batch variance and also averages that one (PyTorch averages the
  unbiased variance into running_var).
- `stem_stride`, `stage_strides` and `attention_strides` let tiny custom versions run on 8x8 images (the paper: 2,
  (2, 2, 2, 2) and (2, 1)); the grouped 1x1 expansions of timm (`expand_groups`) are not offered (1 in every variant).
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers import DenseGeneral, count_params, dot_product_attention
from zoo.layers.vision import TORCH_CONV_INIT, drop_path
from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model

_B_HEAD = (1536, 1600)
_WIDE_HEAD = (2304, 2560)
# timm's `lowformer_*` registrations (widths and depths: the stem, then stages 1-4).
VARIANTS = {
  "b0": dict(
    widths=(16, 32, 64, 128, 256),
    depths=(0, 1, 1, 3, 4),
    head_widths=_B_HEAD,
    stem_expand_ratio=2.0,
    downsample_expand_ratios=(4.0, 4.0, 4.0, 4.0),
    attention=True,
    mlp=True,
  ),
  "b1": dict(
    widths=(16, 32, 64, 128, 256),
    depths=(0, 1, 1, 5, 5),
    head_widths=_B_HEAD,
    stem_expand_ratio=2.0,
    downsample_expand_ratios=(6.0, 6.0, 6.0, 6.0),
    attention=True,
    mlp=True,
  ),
  "b15": dict(
    widths=(20, 40, 80, 160, 320),
    depths=(0, 1, 1, 6, 6),
    head_widths=_WIDE_HEAD,
    stem_expand_ratio=2.0,
    downsample_expand_ratios=(6.0, 6.0, 6.0, 6.0),
    attention=True,
    mlp=True,
  ),
  "b2": dict(
    widths=(24, 48, 96, 192, 384),
    depths=(0, 1, 1, 6, 6),
    head_widths=_WIDE_HEAD,
    stem_expand_ratio=2.0,
    downsample_expand_ratios=(6.0, 6.0, 6.0, 6.0),
    attention=True,
    mlp=True,
  ),
  "b3": dict(
    widths=(32, 64, 128, 256, 512),
    depths=(1, 2, 3, 6, 6),
    head_widths=_B_HEAD,
    stem_expand_ratio=4.0,
    downsample_expand_ratios=(6.0, 6.0, 6.0, 6.0),
    attention=True,
    mlp=True,
  ),
  "e1": dict(
    widths=(20, 40, 80, 160, 320),
    depths=(0, 1, 1, 4, 4),
    head_widths=_WIDE_HEAD,
    stem_expand_ratio=2.0,
    downsample_expand_ratios=(6.0, 6.0, 6.0, 6.0),
    attention=False,
    mlp=False,
  ),
  "e2": dict(
    widths=(32, 64, 128, 256, 512),
    depths=(1, 2, 3, 4, 4),
    head_widths=_B_HEAD,
    stem_expand_ratio=4.0,
    downsample_expand_ratios=(6.0, 6.0, 6.0, 6.0),
    attention=False,
    mlp=False,
  ),
  "e3": dict(
    widths=(32, 64, 128, 256, 512),
    depths=(1, 2, 3, 6, 6),
    head_widths=_B_HEAD,
    stem_expand_ratio=4.0,
    downsample_expand_ratios=(6.0, 6.0, 6.0, 6.0),
    attention=True,
    mlp=False,
  ),
}
# What 'custom' takes for the keys it is not given (timm's LowFormer defaults; downsampling = expand_ratio).
CUSTOM_DEFAULTS = dict(head_widths=_B_HEAD, stem_expand_ratio=2.0, attention=True, mlp=True)
VARIANT_KEYS = ("widths", "depths", "head_widths", "stem_expand_ratio", "downsample_expand_ratios", "attention", "mlp")
VARIANT_NAMES = (*VARIANTS, "custom")
NUM_STAGES = 4
ATTENTION_STAGES = (2, 3)  # 0-based: stages 3-4 hold the LowFormer blocks
KERNEL = 3  # every (Fused)MBConv and the stem
FUSED_LOCAL_MAX_WIDTH = 256  # the local branch is a FusedMBConv below this width, else an MBConv (timm's rule)
HEAD_INIT = nn.initializers.truncated_normal(0.02)


def attention_shape(channels):
  """(heads, head_dim) of Lowtention on `channels` channels: heads = max(1, floor(C/2/30)), d = floor(C/heads/2)."""
  heads = max(1, int((channels * 0.5) // 30))
  return heads, int((channels // heads) * 0.5)


class _Layers:
  """The layer factories every LowFormer module shares (inits, logical axes, dtypes, norms)."""

  def __init__(self, module, deterministic):
    self.m, self.deterministic = module, deterministic
    self.dtypes = dict(dtype=jnp.dtype(module.dtype), param_dtype=jnp.dtype(module.param_dtype))

  def dense(self, features, *, use_bias, name, kernel_init=TORCH_CONV_INIT):
    """A 1x1 convolution or Linear layer: kernel [C_in, features]."""
    return DenseGeneral(
      features,
      kernel_axes=("conv_in", "conv_out"),
      use_bias=use_bias,
      kernel_init=kernel_init,
      name=name,
      **self.dtypes,
    )

  def conv(self, features, kernel, stride, *, groups=1, use_bias=False, dilation=1, padding=None, name):
    """A kernel x kernel convolution, PyTorch padding kernel // 2 (or `padding`), input dilation `dilation`."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      input_dilation=(dilation, dilation),
      feature_group_count=groups,
      use_bias=use_bias,
      kernel_init=nn.with_logical_partitioning(
        TORCH_CONV_INIT, (None, None, None if groups > 1 else "conv_in", "conv_out")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
      name=name,
      **self.dtypes,
    )

  def _affine(self):
    return dict(
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )

  def batch_norm(self, name):
    return nn.BatchNorm(
      use_running_average=self.deterministic,
      momentum=self.m.bn_momentum,
      epsilon=self.m.norm_epsilon,
      name=name,
      **self._affine(),
      **self.dtypes,
    )

  def group_norm(self, name):
    """GroupNorm with one group: over H, W and C of each image."""
    return nn.GroupNorm(
      num_groups=1, epsilon=self.m.norm_epsilon, use_fast_variance=False, name=name, **self._affine(), **self.dtypes
    )

  def layer_norm(self, name):
    return nn.LayerNorm(
      epsilon=self.m.norm_epsilon, use_fast_variance=False, name=name, **self._affine(), **self.dtypes
    )

  def residual(self, x, branch, rate):
    """x + DropPath(branch) (rng 'dropout' in training when rate > 0)."""
    if rate > 0 and not self.deterministic:
      branch = drop_path(branch, rate, self.m.make_rng("dropout"))
    return x + branch


class _Common(nn.Module):
  """Fields every LowFormer sub-module takes from the model."""

  bn_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def common(self):
    return dict(
      bn_momentum=self.bn_momentum, norm_epsilon=self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype
    )


class FusedMBConv(_Common):
  """Conv3x3/s (bias?) -> BN -> Hardswish -> Conv1x1 -> BN. x [B, H, W, C_in] -> [B, H/s, W/s, features]."""

  features: int = 0
  expand_ratio: float = 4.0
  stride: int = 1
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    layers = _Layers(self, deterministic)
    mid = round(x.shape[-1] * self.expand_ratio)
    x = layers.conv(mid, KERNEL, self.stride, use_bias=self.use_bias, name="spatial_conv")(x)
    x = jax.nn.hard_swish(layers.batch_norm("spatial_bn")(x))
    return layers.batch_norm("point_bn")(layers.dense(self.features, use_bias=False, name="point_conv")(x))


class MBConv(_Common):
  """Conv1x1 (bias?) -> Hardswish -> DWConv3x3/s (bias?) -> Hardswish -> Conv1x1 -> BN.
  x [B, H, W, C_in] -> [B, H/s, W/s, features]."""

  features: int = 0
  expand_ratio: float = 4.0
  stride: int = 1
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    layers = _Layers(self, deterministic)
    mid = round(x.shape[-1] * self.expand_ratio)
    x = jax.nn.hard_swish(layers.dense(mid, use_bias=self.use_bias, name="inverted_conv")(x))
    x = layers.conv(mid, KERNEL, self.stride, groups=mid, use_bias=self.use_bias, name="depth_conv")(x)
    x = jax.nn.hard_swish(x)
    return layers.batch_norm("point_bn")(layers.dense(self.features, use_bias=False, name="point_conv")(x))


def conv_block(fused, features, expand_ratio, stride, use_bias, common, name):
  """The FusedMBConv (`fused`) or MBConv block."""
  cls = FusedMBConv if fused else MBConv
  return cls(features=features, expand_ratio=expand_ratio, stride=stride, use_bias=use_bias, name=name, **common)


class Lowtention(_Common):
  """Lowtention (module docstring; paper eq. 1-2). x [B, H, W, C] -> [B, H, W, C].

  Attributes:
    stride: the attention stride s (the depthwise downsampling and the transposed-conv upsampling).
    fused: fold the output projection into the upsampling (timm's `fuse_out_proj`, the authors' `fastit`).
  """

  stride: int = 1
  fused: bool = True

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    layers = _Layers(self, deterministic)
    b, height, width, channels = x.shape
    heads, head_dim = attention_shape(channels)
    kernel = 5 if self.stride > 1 else 3
    y = layers.conv(channels, kernel, self.stride, groups=channels, name="conv_proj")(x)
    y = layers.batch_norm("conv_proj_bn")(y)
    qkv = layers.dense(heads * 3 * head_dim, use_bias=False, name="qkv")(y)
    h, w = qkv.shape[1:3]
    qkv = qkv.reshape(b, h * w, heads, 3, head_dim)
    o = dot_product_attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :])  # scale 1 / sqrt(head_dim)
    o = o.reshape(b, h, w, heads * head_dim)
    if not self.fused:
      o = layers.dense(channels, use_bias=True, name="o_proj")(o)
    up_kernel, up_padding = (3, 1) if self.stride == 1 else (2 * self.stride, self.stride // 2)
    o = layers.conv(
      channels,
      up_kernel,
      1,
      groups=1 if self.fused else channels,
      use_bias=True,
      dilation=self.stride,
      padding=up_kernel - 1 - up_padding,
      name="upsample",
    )(o)
    return o[:, :height, :width]


class LowFormerBlock(_Common):
  """x += Lowtention(GN x); x += MLP(GN x); x += LocalBlock(x) (module docstring). x [B, H, W, C] -> same."""

  expand_ratio: float = 4.0
  mlp_ratio: int = 4
  attention_stride: int = 1
  fused_conv: bool = True
  attention: bool = True
  mlp: bool = True
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    layers = _Layers(self, deterministic)
    channels, rate = x.shape[-1], self.drop_path_rate
    if self.attention:
      h = layers.group_norm("attn_norm")(x) if self.mlp else x
      h = Lowtention(stride=self.attention_stride, fused=self.fused_conv, name="attn", **self.common())(
        h, deterministic=deterministic
      )
      x = layers.residual(x, h, rate)
    if self.mlp:
      h = layers.dense(self.mlp_ratio * channels, use_bias=True, name="mlp_fc1")(layers.group_norm("mlp_norm")(x))
      h = layers.dense(channels, use_bias=True, name="mlp_fc2")(nn.gelu(h, approximate=False))
      x = layers.residual(x, h, rate)
    fused = self.fused_conv and channels < FUSED_LOCAL_MAX_WIDTH
    local = conv_block(fused, channels, self.expand_ratio, 1, True, self.common(), "local")
    return layers.residual(x, local(x, deterministic=deterministic), rate)


@register_model("lowformer")
class LowFormer(nn.Module):
  """LowFormer image classifier (module docstring). Config keys are the fields below.

  Attributes:
    variant: 'b0', 'b1', 'b15', 'b2', 'b3', 'e1', 'e2', 'e3' (timm's `lowformer_*`; the keys of VARIANT_KEYS must
      then be None) or 'custom' (give `widths` and `depths`; the other VARIANT_KEYS default to CUSTOM_DEFAULTS and
      `downsample_expand_ratios` to expand_ratio).
    num_classes: classifier outputs.
    in_channels: channels of the input images.
    widths, depths: 5 values each: the stem, then stages 1-4 (custom only).
    head_widths: (1x1 conv width, pre-logits width) of the head.
    stem_expand_ratio: expansion of the stem's FusedMBConv blocks.
    downsample_expand_ratios: 4 expansions of the blocks opening stages 1-4.
    attention, mlp: the Lowtention and MLP branches of the LowFormer blocks.
    expand_ratio: expansion of the other (Fused)MBConv blocks (timm 4).
    mlp_ratio: the MLP branch's hidden width / C (timm 4).
    fused_conv: FusedMBConv blocks (and the output projection folded into the upsampling), as the authors' models.
    stem_stride: 1 or 2 (paper 2).
    stage_strides: 4 strides, 1 or 2, of the blocks opening stages 1-4 (paper 2, 2, 2, 2).
    attention_strides: the Lowtention stride s of stages 3 and 4 (paper 2, 1).
    drop_path_rate: the last block's stochastic depth (linear from 0 over the blocks, as timm).
    dropout_rate: dropout before the classifier (training only).
    bn_momentum: BatchNorm running-average momentum (Flax convention; PyTorch's 0.1 is 0.9).
    norm_epsilon: BatchNorm, GroupNorm and LayerNorm epsilon.
    dtype: compute dtype (name or dtype); logits are returned in float32.
    param_dtype: parameter dtype.

  `exposes` (the `zoo.models` contract): the per-token outputs the model sows into 'intermediates'; none here.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  variant: str = "b0"
  num_classes: int = 1000
  in_channels: int = 3
  widths: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  head_widths: tuple[int, ...] | None = None
  stem_expand_ratio: float | None = None
  downsample_expand_ratios: tuple[float, ...] | None = None
  attention: bool | None = None
  mlp: bool | None = None
  expand_ratio: float = 4.0
  mlp_ratio: int = 4
  fused_conv: bool = True
  stem_stride: int = 2
  stage_strides: tuple[int, ...] = (2, 2, 2, 2)
  attention_strides: tuple[int, ...] = (2, 1)
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  bn_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("num_classes", "in_channels", "mlp_ratio"),
      intervals={
        "expand_ratio": "(0, inf)",
        "drop_path_rate": "[0, 1)",
        "dropout_rate": "[0, 1)",
        "bn_momentum": "[0, 1]",
        "norm_epsilon": "(0, inf)",
      },
      choices={"variant": VARIANT_NAMES, "stem_stride": (1, 2), "fused_conv": (True, False)},
      dtypes=("dtype", "param_dtype"),
    )
    given = [k for k in VARIANT_KEYS if getattr(self, k) is not None]
    if self.variant == "custom":
      if self.widths is None or self.depths is None:
        raise ConfigError("config.model.variant='custom' needs config.model.widths and config.model.depths")
    elif given:
      raise ConfigError(
        f"config.model.variant={self.variant!r} fixes {', '.join(given)}; set variant='custom' to give your own"
      )
    c = self.resolved
    for key, minimum in (("widths", 1), ("depths", 0)):
      values = c[key]
      if len(values) != NUM_STAGES + 1 or any(
        isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values
      ):
        raise ConfigError(f"config.model.{key}={values} must be {NUM_STAGES + 1} integers >= {minimum} (stem, stages)")
    heads = c["head_widths"]
    if len(heads) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in heads):
      raise ConfigError(f"config.model.head_widths={heads} must be 2 positive integers")
    ratios = (c["stem_expand_ratio"], *c["downsample_expand_ratios"])
    if len(ratios) != NUM_STAGES + 1 or any(
      isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in ratios
    ):
      raise ConfigError(
        f"config.model.stem_expand_ratio={c['stem_expand_ratio']} / downsample_expand_ratios="
        f"{c['downsample_expand_ratios']} must be a positive number / {NUM_STAGES} positive numbers"
      )
    for key in ("attention", "mlp"):
      if not isinstance(c[key], bool):
        raise ConfigError(f"config.model.{key}={c[key]!r} must be True or False (or None for the variant's)")
    if len(self.stage_strides) != NUM_STAGES or any(s not in (1, 2) for s in self.stage_strides):
      raise ConfigError(f"config.model.stage_strides={self.stage_strides} must be {NUM_STAGES} values, each 1 or 2")
    if len(self.attention_strides) != 2 or any(
      isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.attention_strides
    ):
      raise ConfigError(f"config.model.attention_strides={self.attention_strides} must be 2 integers >= 1")
    if c["attention"]:
      for i in ATTENTION_STAGES:
        if c["depths"][i + 1] and attention_shape(c["widths"][i + 1])[1] < 1:
          raise ConfigError(
            f"config.model.widths[{i + 1}]={c['widths'][i + 1]}: Lowtention needs at least 2 channels "
            "(head_dim = floor(C / heads / 2))"
          )
    super().__post_init__()

  @property
  def resolved(self):
    """The VARIANT_KEYS with the variant's (or the custom defaults') values where a field is None."""
    if self.variant in VARIANTS:
      base = VARIANTS[self.variant]
    else:
      base = {**CUSTOM_DEFAULTS, "downsample_expand_ratios": (self.expand_ratio,) * NUM_STAGES}
    out = {}
    for key in VARIANT_KEYS:
      value = getattr(self, key)
      value = base.get(key) if value is None else value
      out[key] = tuple(value) if isinstance(value, (tuple, list)) else value
    return out

  def num_params(self):
    """The number of parameters (BatchNorm statistics excluded); independent of the image size."""
    shape = jax.ShapeDtypeStruct((1, 8, 8, self.in_channels), jnp.float32)
    return count_params(jax.eval_shape(self.init, jax.random.key(0), shape)["params"])

  @nn.compact
  def __call__(self, images, *, deterministic=True):
    """Classify images.

    Args:
      images: [batch, height, width, in_channels] float, height and width >= 1 (any size, as timm's).
      deterministic: True uses the BatchNorm running statistics and no dropout/DropPath; False normalises with the
        batch statistics, updates `batch_stats` (apply with `mutable=["batch_stats"]`) and draws DropPath and dropout
        masks from the rng 'dropout' (when their rates are > 0).

    Returns:
      (logits [batch, num_classes] float32, ModelOutput with no aux loss).
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be float [batch, height, width, channels], got {images.dtype} {images.shape}")
    if images.shape[-1] != self.in_channels:
      raise ValueError(
        f"images have {images.shape[-1]} channels but config.model.in_channels={self.in_channels} "
        f"(images {images.shape})"
      )
    if min(images.shape[1:3]) < 1:
      raise ValueError(f"lowformer cannot take images of {images.shape[1]}x{images.shape[2]}: height and width >= 1")
    c = self.resolved
    layers = _Layers(self, deterministic)
    common = dict(
      bn_momentum=self.bn_momentum, norm_epsilon=self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype
    )
    widths, depths = c["widths"], c["depths"]
    rates = [float(r) for r in np.linspace(0.0, self.drop_path_rate, sum(depths))]
    x = images.astype(jnp.dtype(self.dtype))
    x = layers.conv(widths[0], KERNEL, self.stem_stride, name="stem_conv")(x)
    x = jax.nn.hard_swish(layers.batch_norm("stem_bn")(x))
    for i in range(depths[0]):
      block = conv_block(self.fused_conv, widths[0], c["stem_expand_ratio"], 1, False, common, f"stem_block{i}")
      x = layers.residual(x, block(x, deterministic=deterministic), rates[i])
    first = depths[0]
    for s in range(NUM_STAGES):
      width, depth, stride = widths[s + 1], depths[s + 1], self.stage_strides[s]
      stage_rates, first = rates[first : first + depth], first + depth
      down = c["downsample_expand_ratios"][s]
      name = f"stage{s + 1}_block"
      if s in ATTENTION_STAGES:
        x = conv_block(self.fused_conv, width, down, stride, False, common, f"{name}0")(x, deterministic=deterministic)
        for j in range(depth):
          x = LowFormerBlock(
            expand_ratio=self.expand_ratio,
            mlp_ratio=self.mlp_ratio,
            attention_stride=self.attention_strides[s - ATTENTION_STAGES[0]],
            fused_conv=self.fused_conv,
            attention=c["attention"],
            mlp=c["mlp"],
            drop_path_rate=stage_rates[j],
            name=f"{name}{j + 1}",
            **common,
          )(x, deterministic=deterministic)
        continue
      for j in range(depth):
        ratio, step = (down, stride) if j == 0 else (self.expand_ratio, 1)
        y = conv_block(self.fused_conv, width, ratio, step, False, common, f"{name}{j}")(x, deterministic=deterministic)
        x = y if j == 0 else layers.residual(x, y, stage_rates[j])
    x = layers.dense(c["head_widths"][0], use_bias=False, name="head_conv")(x)
    x = jax.nn.hard_swish(layers.batch_norm("head_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = layers.dense(c["head_widths"][1], use_bias=False, name="pre_logits", kernel_init=HEAD_INIT)(x)
    x = jax.nn.hard_swish(layers.layer_norm("pre_logits_norm")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(x)
    logits = layers.dense(self.num_classes, use_bias=True, name="classifier", kernel_init=HEAD_INIT)(x)
    return logits.astype(jnp.float32), ModelOutput()
