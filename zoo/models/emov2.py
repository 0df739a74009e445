"""EMOv2: Zhang et al. 2024, "EMOv2: Pushing 5M Vision Model Frontier" (arXiv:2412.06674; code zhangzjn/EMOv2,
`model/lib_emo/emo2.py`), the image classifier built from improved inverted residual mobile blocks (i2RMB).

Shapes are NHWC: images [B, H, W, C] -> logits [B, num_classes].

Network (read from the authors' code, `EMO2` and `EMO2_{1,2,5}M_k5_hybrid`):
- Stem (stride `stem_stride`, 2 in the paper), width c0 = widths[0] // 2:
  Conv3x3/s2 (bias) -> BN -> SiLU; depthwise Conv3x3 -> BN -> SiLU; Conv1x1 (no bias, no norm, no activation).
- Four stages of `depths[i]` i2RMBs at width `widths[i]`. The first block of each stage is the downsampling block:
  stride `stage_strides[i]` (2 in the paper) in its depthwise convolution, expansion 2 * exp_ratios[i], the 1x1
  expansion as its operator in every stage (also in stages 3-4), and no shortcut; its LayerScale still applies, so
  at init it outputs 1e-6 times its branch and all later activations are tiny (logits ~1e-9) until the gammas grow:
  the authors' wiring (`x = ... else self.ls(x)`), kept. The other blocks have stride 1, expansion exp_ratios[i] and
  both residuals.
- Head: LayerNorm -> global average pooling -> Linear(num_classes). No pre-head expansion.

i2RMB (`iiRMB`), for an input x [B, H, W, C_in], m = int(C_in * expansion):
    h  = Norm(x)                          BN in stages 1-2, LN in stages 3-4 (eps 1e-6)
    u  = F(h)                             [B, H, W, m], the efficient operator:
           stages 1-2 (and every downsampling block): u = act(W_e h + b_e), a 1x1 expansion
           stages 3-4: u = A_close(h) + A_remote(h), the hybrid windowed attention below
    u' = SiLU(BN(DWConv5x5_s(u)))         depthwise, stride s; [B, H/s, W/s, m]
    u  = u + u' if shortcut else u'       the inner residual
    y  = gamma * (W_p u)                  1x1 projection to C_out (no bias); gamma = LayerScale, init 1e-6
    out = x + DropPath(y) if shortcut else y
  act = SiLU in stages 1-2, GELU (exact erf) in stages 3-4.

Hybrid windowed attention (`EW_MHSA_Hybrid`), heads n = C_in / head_dim, window w x w (w = `window_size`; 0 = the
whole map):
    [q, k] = W_qk h + b_qk   (2 C_in channels: q the first C_in, k the next; heads outer, head_dim inner)
    v      = act(W_v h + b_v) (m channels, heads outer: each head's value is m / n wide)
    A_mode(h) = merge_mode(softmax(q_j k_j^T / sqrt(head_dim)) v_j for every window j of partition_mode)
  with the same q, k, v and two partitions of the [H, W] grid into (H/w)(W/w) windows of w x w tokens:
  - close: contiguous w x w blocks (row = block * w + offset);
  - remote: strided windows, row = offset * (H/w) + block, i.e. the window holds every (H/w)-th row and (W/w)-th
    column, so it spans the whole map ("dilated" windows, stride H/w).
  The two outputs are added; there is no output projection (the block's W_p follows). When the window is the whole
  map both partitions are one global window, so the operator is 2 x global attention (stage 4 at 224: 7x7 map, w=7).

Per variant (the authors' code): depths, widths, exp_ratios, head_dims, drop_path_rate below; window 7 at 224
(their _256/_512 variants use 8); qkv and expansion biases on; attention dropout and projection dropout 0.
Parameters counted by the authors' training logs (fvcore, 224 px, 1000 classes): 1M 1.461M, 2M 2.384M, 5M 5.126M
(README: 1.4M / 2.3M / 5.1M, the same counts cut to one decimal). `num_params()` here: 1,460,844 / 2,384,312 /
5,126,440. ImageNet-1k top-1 (paper): 72.3 / 75.8 / 79.4.

Differences and choices:
- Feature maps must divide into whole windows (`window_size` divides each attention stage's map) and the image into
  the total stride; the authors' code instead zero-pads to whole windows (the padded tokens then take part as keys).
  An image that does not fit raises a one-line ValueError.
- Initialisation: the authors keep PyTorch's default for convolutions (kaiming-uniform, a = sqrt(5), i.e. uniform
  with variance 1 / (3 fan_in)), used here for the kernels; their convolution biases are PyTorch's uniform, here zero
  [guess/simplification]. The head is truncated normal std 0.02 with zero bias, as theirs.
- BatchNorm: eps 1e-6 (theirs), momentum 0.1 (PyTorch default; Flax momentum 0.9).
- `stem_stride` and `stage_strides` let tiny custom versions run on 8x8 images (the paper: 2 and (2, 2, 2, 2)).
- DropPath lives in this file (the zoo has no shared one yet).
"""

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers import DenseGeneral
from zoo.layers.vision import TORCH_CONV_INIT, drop_path
from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model

# The authors' `EMO2_{1,2,5}M_k5_hybrid` (224 px). head_dims of stages 1-2 are unused (their operator is a 1x1 conv).
VARIANTS = {
  "1m": dict(
    depths=(2, 2, 8, 3),
    widths=(32, 48, 80, 180),
    exp_ratios=(2.0, 2.5, 3.0, 3.5),
    head_dims=(16, 16, 20, 20),
    drop_path_rate=0.04036,
  ),
  "2m": dict(
    depths=(3, 3, 9, 3),
    widths=(32, 48, 120, 200),
    exp_ratios=(2.0, 2.5, 3.0, 3.5),
    head_dims=(16, 16, 20, 20),
    drop_path_rate=0.05,
  ),
  "5m": dict(
    depths=(3, 3, 9, 3),
    widths=(48, 72, 160, 288),
    exp_ratios=(2.0, 3.0, 4.0, 4.0),
    head_dims=(16, 24, 32, 32),
    drop_path_rate=0.05,
  ),
}
# What 'custom' takes when exp_ratios / head_dims / drop_path_rate are not given [guess: the 1M's ratios and heads].
CUSTOM_DEFAULTS = dict(exp_ratios=(2.0, 2.5, 3.0, 3.5), head_dims=(16, 16, 20, 20), drop_path_rate=0.0)
VARIANT_NAMES = (*VARIANTS, "custom")
NUM_STAGES = 4
ATTENTION_STAGES = (2, 3)  # 0-based: stages 3-4 mix tokens with the hybrid windowed attention
STAGE_NORMS = ("batch", "batch", "layer", "layer")
STAGE_ACTIVATIONS = ("silu", "silu", "gelu", "gelu")
DW_KERNEL = 5  # the i2RMB depthwise kernel ("k5")
STEM_KERNEL = 3

ACTIVATIONS = {"silu": nn.silu, "gelu": lambda x: nn.gelu(x, approximate=False)}


def _window(window_size, height, width):
  """(wh, ww): `window_size` squared, or the whole [height, width] map when it is 0."""
  return (height, width) if window_size == 0 else (window_size, window_size)


def window_partition(x, window, mode):
  """Cuts [B, H, W, C] into windows: [B * (H/wh) * (W/ww), wh * ww, C], windows in (block row, block column) order,
  tokens in row-major order inside a window.

  Args:
    x: [B, H, W, C]; H, W multiples of the window.
    window: (wh, ww).
    mode: 'close' (contiguous wh x ww blocks: row = block * wh + offset) or 'remote' (strided windows:
      row = offset * (H / wh) + block, every (H/wh)-th row and (W/ww)-th column of the map).
  """
  b, h, w, c = x.shape
  (wh, ww), nh, nw = window, h // window[0], w // window[1]
  if mode == "close":
    x = x.reshape(b, nh, wh, nw, ww, c).transpose(0, 1, 3, 2, 4, 5)
  elif mode == "remote":
    x = x.reshape(b, wh, nh, ww, nw, c).transpose(0, 2, 4, 1, 3, 5)
  else:
    raise ValueError(f"window mode {mode!r} must be 'close' or 'remote'")
  return x.reshape(b * nh * nw, wh * ww, c)


def window_merge(x, window, mode, height, width):
  """The inverse of `window_partition`: [B * (H/wh) * (W/ww), wh * ww, C] -> [B, H, W, C]."""
  (wh, ww), nh, nw = window, height // window[0], width // window[1]
  c = x.shape[-1]
  x = x.reshape(-1, nh, nw, wh, ww, c)
  if mode == "close":
    x = x.transpose(0, 1, 3, 2, 4, 5)
  elif mode == "remote":
    x = x.transpose(0, 3, 1, 4, 2, 5)
  else:
    raise ValueError(f"window mode {mode!r} must be 'close' or 'remote'")
  return x.reshape(-1, height, width, c)


def window_attention(q, k, v, *, num_heads, window, mode):
  """Multi-head softmax attention inside the windows of one partition (`window_partition`).

  Args:
    q, k: [B, H, W, heads * dk] (heads outer).
    v: [B, H, W, heads * dv]; dv may differ from dk.
    num_heads: heads.
    window: (wh, ww), dividing H and W.
    mode: 'close' or 'remote'.

  Returns:
    [B, H, W, heads * dv]: each token's attention output over the tokens of its window; logits and softmax in float32,
    scaled by 1 / sqrt(dk).
  """
  _, h, w, _ = q.shape

  def heads(t):
    t = window_partition(t, window, mode)
    return t.reshape(*t.shape[:2], num_heads, t.shape[-1] // num_heads)

  qw, kw, vw = heads(q), heads(k), heads(v)
  logits = jnp.einsum("nqhd,nkhd->nhqk", qw, kw, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * (qw.shape[-1] ** -0.5), axis=-1)
  out = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(vw.dtype), vw)
  return window_merge(out.reshape(*out.shape[:2], -1), window, mode, h, w)


def hybrid_window_attention(q, k, v, *, num_heads, window):
  """EMOv2's hybrid operator: close-window attention + remote-window attention with the same q, k, v (shapes as
  `window_attention`)."""
  close = window_attention(q, k, v, num_heads=num_heads, window=window, mode="close")
  remote = window_attention(q, k, v, num_heads=num_heads, window=window, mode="remote")
  return close + remote


class _Parts:
  """The layer factories the stem, the blocks and the head share (logical axes, inits, dtypes)."""

  def __init__(self, module, deterministic):
    self.m, self.deterministic = module, deterministic
    self.dtypes = dict(dtype=jnp.dtype(module.dtype), param_dtype=jnp.dtype(module.param_dtype))

  def dense(self, features, *, use_bias, name):
    return DenseGeneral(
      features,
      kernel_axes=("conv_in", "conv_out"),
      use_bias=use_bias,
      kernel_init=TORCH_CONV_INIT,
      name=name,
      **self.dtypes,
    )

  def conv(self, features, kernel, stride, *, groups=1, use_bias=False, name):
    pad = math.ceil((kernel - stride) / 2)  # the authors' ConvNormAct padding
    return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=groups,
      use_bias=use_bias,
      kernel_init=nn.with_logical_partitioning(
        TORCH_CONV_INIT, (None, None, None if groups > 1 else "conv_in", "conv_out")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
      name=name,
      **self.dtypes,
    )

  def norm(self, kind, *, name):
    ones = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
    if kind == "batch":
      return nn.BatchNorm(
        use_running_average=self.deterministic,
        momentum=self.m.bn_momentum,
        epsilon=self.m.norm_epsilon,
        scale_init=ones,
        bias_init=zeros,
        name=name,
        **self.dtypes,
      )
    return nn.LayerNorm(epsilon=self.m.norm_epsilon, scale_init=ones, bias_init=zeros, name=name, **self.dtypes)


class I2RMB(nn.Module):
  """One improved inverted residual mobile block (module docstring). x [B, H, W, C_in] -> [B, H/stride, W/stride,
  features].

  Attributes:
    features: output channels.
    exp_ratio: the expansion m = int(C_in * exp_ratio).
    operator: 'conv' (1x1 expansion) or 'attention' (hybrid close + remote windowed attention).
    norm: 'batch' or 'layer', the norm of the block input.
    activation: 'silu' or 'gelu', of the expansion / value projection.
    stride: of the depthwise convolution.
    shortcut: the block's residuals (taken only when stride is 1 and C_in == features, as in the authors' code).
    head_dim: q/k width per head (attention: heads = C_in / head_dim).
    window_size: the attention window (0 = the whole map).
    drop_path_rate: stochastic depth of the block branch (training only; rng 'dropout').
    layer_scale_init: LayerScale's initial gamma.
    bn_momentum, norm_epsilon, dtype, param_dtype: as the model's.
  """

  features: int
  exp_ratio: float
  operator: str = "conv"
  norm: str = "batch"
  activation: str = "silu"
  stride: int = 1
  shortcut: bool = True
  head_dim: int = 32
  window_size: int = 7
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  bn_momentum: float = 0.9
  norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    parts = _Parts(self, deterministic)
    c_in = x.shape[-1]
    mid = int(c_in * self.exp_ratio)
    skip = self.shortcut and self.stride == 1 and c_in == self.features
    act = ACTIVATIONS[self.activation]
    shortcut = x
    h = parts.norm(self.norm, name="norm")(x)
    if self.operator == "conv":
      u = act(parts.dense(mid, use_bias=True, name="expand")(h))
    else:
      num_heads = c_in // self.head_dim
      qk = parts.dense(2 * c_in, use_bias=True, name="qk")(h)
      v = act(parts.dense(mid, use_bias=True, name="v")(h))
      window = _window(self.window_size, *x.shape[1:3])
      u = hybrid_window_attention(qk[..., :c_in], qk[..., c_in:], v, num_heads=num_heads, window=window)
    local = parts.conv(mid, DW_KERNEL, self.stride, groups=mid, name="dwconv")(u)
    local = nn.silu(parts.norm("batch", name="dwconv_bn")(local))
    u = u + local if skip else local
    y = parts.dense(self.features, use_bias=False, name="proj")(u)
    gamma = self.param(
      "layer_scale",
      nn.with_logical_partitioning(nn.initializers.constant(self.layer_scale_init), ("norm",)),
      (self.features,),
      jnp.dtype(self.param_dtype),
    )
    y = y * jnp.asarray(gamma, y.dtype)
    if not skip:
      return y
    if not deterministic and self.drop_path_rate > 0:
      y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
    return shortcut + y


@register_model("emov2")
class EMOv2(nn.Module):
  """EMOv2 image classifier (module docstring). Config keys are the fields below.

  Attributes:
    variant: '1m', '2m', '5m' (the authors' configurations; `depths`/`widths` must then be None) or 'custom' (give
      `depths` and `widths`).
    num_classes: classifier outputs.
    image_size: the square input size the config is checked for (every image size that divides into the total
      stride and the windows is accepted at call time).
    in_channels: channels of the input images.
    depths, widths: 4 blocks-per-stage and 4 widths (custom only).
    exp_ratios: 4 expansion ratios; None = the variant's.
    head_dims: 4 attention head widths (stages 3-4 use theirs); None = the variant's.
    window_size: the attention window of stages 3-4 (0 = the whole feature map).
    stem_stride: 1 or 2 (paper 2).
    stage_strides: 4 strides, 1 or 2, of the downsampling block opening each stage (paper 2, 2, 2, 2).
    drop_path_rate: the last block's stochastic depth (linear from 0 over the blocks); None = the variant's.
    layer_scale_init: LayerScale's initial gamma (paper 1e-6).
    bn_momentum: BatchNorm running-average momentum (Flax convention).
    norm_epsilon: BatchNorm and LayerNorm epsilon.
    dtype: compute dtype (name or dtype); logits are returned in float32.
    param_dtype: parameter dtype.

  `exposes` (the `zoo.models` contract): the per-token outputs the model sows into 'intermediates'; none here.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  variant: str = "5m"
  num_classes: int = 1000
  image_size: int = 224
  in_channels: int = 3
  depths: tuple[int, ...] | None = None
  widths: tuple[int, ...] | None = None
  exp_ratios: tuple[float, ...] | None = None
  head_dims: tuple[int, ...] | None = None
  window_size: int = 7
  stem_stride: int = 2
  stage_strides: tuple[int, ...] = (2, 2, 2, 2)
  drop_path_rate: float | None = None
  layer_scale_init: float = 1e-6
  bn_momentum: float = 0.9
  norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("num_classes", "image_size", "in_channels"),
      intervals={"layer_scale_init": "[0, inf)", "bn_momentum": "[0, 1]", "norm_epsilon": "(0, inf)"},
      choices={"variant": VARIANT_NAMES, "stem_stride": (1, 2)},
      dtypes=("dtype", "param_dtype"),
    )
    if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 0:
      raise ConfigError(f"config.model.window_size={self.window_size!r} must be an integer >= 0 (0 = the whole map)")
    if self.variant == "custom":
      if self.depths is None or self.widths is None:
        raise ConfigError("config.model.variant='custom' needs config.model.depths and config.model.widths")
    elif self.depths is not None or self.widths is not None:
      raise ConfigError(
        f"config.model.variant={self.variant!r} fixes depths and widths; set variant='custom' to give your own"
      )
    c = self.resolved
    for key, minimum in (("depths", 1), ("widths", 2), ("head_dims", 1)):
      values = c[key]
      if len(values) != NUM_STAGES or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ConfigError(f"config.model.{key}={values} must be {NUM_STAGES} integers >= {minimum}")
    if len(c["exp_ratios"]) != NUM_STAGES or any(not isinstance(r, (int, float)) or r <= 0 for r in c["exp_ratios"]):
      raise ConfigError(f"config.model.exp_ratios={c['exp_ratios']} must be {NUM_STAGES} positive numbers")
    if len(self.stage_strides) != NUM_STAGES or any(s not in (1, 2) for s in self.stage_strides):
      raise ConfigError(f"config.model.stage_strides={self.stage_strides} must be {NUM_STAGES} values, each 1 or 2")
    rate = c["drop_path_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
      raise ConfigError(f"config.model.drop_path_rate={rate!r} must be in [0, 1) (or None for the variant's)")
    for i in ATTENTION_STAGES:
      if c["depths"][i] < 2:
        continue  # only the downsampling block: no attention in this stage
      width, head_dim = c["widths"][i], c["head_dims"][i]
      if width % head_dim:
        raise ConfigError(
          f"config.model.head_dims[{i}]={head_dim} must divide widths[{i}]={width} (heads = width / head_dim)"
        )
      heads, mid = width // head_dim, int(width * c["exp_ratios"][i])
      if mid % heads:
        raise ConfigError(
          f"stage {i + 1}: the expanded width int({width} * exp_ratios[{i}]) = {mid} must be a multiple of its "
          f"{heads} heads (config.model.exp_ratios / head_dims)"
        )
    problem = self._size_problem(self.image_size, self.image_size)
    if problem:
      raise ConfigError(f"config.model.image_size={self.image_size}: {problem}")
    super().__post_init__()

  @property
  def resolved(self):
    """{depths, widths, exp_ratios, head_dims, drop_path_rate}: the variant's values with the given fields applied."""
    base = VARIANTS.get(self.variant, CUSTOM_DEFAULTS)
    out = {}
    for key in ("depths", "widths", "exp_ratios", "head_dims", "drop_path_rate"):
      value = getattr(self, key)
      value = base[key] if value is None else value
      out[key] = tuple(value) if isinstance(value, (tuple, list)) else value
    return out

  @property
  def total_stride(self):
    return self.stem_stride * int(np.prod(self.stage_strides))

  def _size_problem(self, height, width):
    """Why a [height, width] image cannot be taken ('' when it can)."""
    total = self.total_stride
    if height % total or width % total:
      return (
        f"an image of {height}x{width} must have height and width multiples of the total stride {total} "
        f"(stem {self.stem_stride} x stages {'x'.join(map(str, self.stage_strides))})"
      )
    if self.window_size == 0:
      return ""
    depths, stride = self.resolved["depths"], self.stem_stride
    for i in range(NUM_STAGES):
      stride *= self.stage_strides[i]
      h, w = height // stride, width // stride
      if i in ATTENTION_STAGES and depths[i] > 1 and (h % self.window_size or w % self.window_size):
        return (
          f"an image of {height}x{width} gives stage {i + 1} a {h}x{w} feature map that does not divide into "
          f"{self.window_size}x{self.window_size} windows (config.model.window_size; 0 = the whole map)"
        )
    return ""

  def num_params(self):
    """Analytic parameter count (equals `count_params` of the initialised params; BatchNorm statistics excluded).

    Stem (c0 = widths[0] / 2): 3x3 conv with bias 9 C c0 + c0, BN 2 c0, depthwise 3x3 9 c0, BN 2 c0, 1x1 c0^2.
    i2RMB from C_in to C_out, m = int(C_in r): norm 2 C_in; operator C_in m + m (1x1 expansion) or
    2 C_in^2 + 2 C_in + C_in m + m (qk and v); depthwise 25 m + BN 2 m; projection m C_out; LayerScale C_out.
    Head: LayerNorm 2 C + Linear C K + K.
    """
    c = self.resolved
    c0 = c["widths"][0] // 2
    total = STEM_KERNEL**2 * self.in_channels * c0 + c0 + 2 * c0 + STEM_KERNEL**2 * c0 + 2 * c0 + c0 * c0
    c_in = c0
    for i in range(NUM_STAGES):
      for j in range(c["depths"][i]):
        ratio = c["exp_ratios"][i] * (2 if j == 0 else 1)
        mid = int(c_in * ratio)
        operator = c_in * mid + mid
        if j > 0 and i in ATTENTION_STAGES:
          operator += 2 * c_in * c_in + 2 * c_in
        total += 2 * c_in + operator + DW_KERNEL**2 * mid + 2 * mid + mid * c["widths"][i] + c["widths"][i]
        c_in = c["widths"][i]
    return total + 2 * c_in + c_in * self.num_classes + self.num_classes

  @nn.compact
  def __call__(self, images, *, deterministic=True):
    """Classify images.

    Args:
      images: [batch, height, width, in_channels] float; height and width multiples of the total stride whose
        attention-stage feature maps divide into windows.
      deterministic: True uses the BatchNorm running statistics and no DropPath; False normalises with the batch
        statistics, updates `batch_stats` (apply with `mutable=["batch_stats"]`) and draws DropPath masks from the
        rng 'dropout' (when drop_path_rate > 0).

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
    problem = self._size_problem(*images.shape[1:3])
    if problem:
      raise ValueError(f"emov2 cannot take these images: {problem}")
    c = self.resolved
    parts = _Parts(self, deterministic)
    dtype = jnp.dtype(self.dtype)
    c0 = c["widths"][0] // 2
    x = images.astype(dtype)
    x = parts.conv(c0, STEM_KERNEL, self.stem_stride, use_bias=True, name="stem_conv")(x)
    x = nn.silu(parts.norm("batch", name="stem_bn")(x))
    x = parts.conv(c0, STEM_KERNEL, 1, groups=c0, name="stem_dwconv")(x)
    x = nn.silu(parts.norm("batch", name="stem_dwconv_bn")(x))
    x = parts.dense(c0, use_bias=False, name="stem_proj")(x)
    rates = np.linspace(0.0, c["drop_path_rate"], sum(c["depths"]))
    block = 0
    for i in range(NUM_STAGES):
      for j in range(c["depths"][i]):
        first = j == 0
        x = I2RMB(
          features=c["widths"][i],
          exp_ratio=c["exp_ratios"][i] * (2 if first else 1),
          operator="attention" if i in ATTENTION_STAGES and not first else "conv",
          norm=STAGE_NORMS[i],
          activation=STAGE_ACTIVATIONS[i],
          stride=self.stage_strides[i] if first else 1,
          shortcut=not first,
          head_dim=c["head_dims"][i],
          window_size=self.window_size,
          drop_path_rate=float(rates[block]),
          layer_scale_init=self.layer_scale_init,
          bn_momentum=self.bn_momentum,
          norm_epsilon=self.norm_epsilon,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"stage{i + 1}_block{j}",
        )(x, deterministic=deterministic)
        block += 1
    x = parts.norm(STAGE_NORMS[-1], name="norm")(x)
    x = jnp.mean(x, axis=(1, 2))
    logits = DenseGeneral(
      self.num_classes,
      kernel_axes=("conv_in", None),
      use_bias=True,
      kernel_init=nn.initializers.truncated_normal(0.02),
      name="head",
      **parts.dtypes,
    )(x)
    return logits.astype(jnp.float32), ModelOutput()
