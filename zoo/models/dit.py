"""DiT: Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv:2212.09748), as the velocity model of
flow matching (the experts of Decentralized Diffusion Models, papers.md D1; `zoo.tasks.flow_matching`).

The paper's model (section 3.2, Figure 3):
- Patchify: the image [H, W, C] is cut into (H/p)(W/p) patches of p x p pixels, each linearly embedded to `embed_dim`,
  plus the fixed 2-D sine-cosine positional embedding of ViT/MAE.
- Conditioning c = timestep embedding + class embedding. Timestep: the sinusoidal embedding of Vaswani et al. /
  ADM (frequency width 256, max period 10000) -> Linear -> SiLU -> Linear. Class: a table with one extra "null" row
  (index `num_classes`) for classifier-free guidance (Ho & Salimans 2022), the label the task feeds when it drops it.
- adaLN-Zero blocks: from SiLU(c) a linear layer regresses shift, scale and gate for the attention and the MLP
  sublayers; `x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))`, then the same with the MLP, where
  `modulate(h, shift, scale) = h * (1 + scale) + shift` and LN has no learned affine (eps 1e-6). The modulation layer
  is zero-initialised, so every gate is 0 and every block starts as the identity.
- Final layer: adaLN (shift, scale; zero-initialised) on LN(x), then a linear layer to p*p*C per token,
  zero-initialised, and unpatchify; so the initial output is exactly 0.

Differences [guess / deviation]:
- Flow matching predicts only the velocity (`zoo.flow.matching`, data at t = 0), so there is no `learn_sigma`
  (the paper's second output half for the variance of the diffusion posterior).
- t in [0, 1] is multiplied by `time_scale` (1000, DiT's number of diffusion steps) before the sinusoidal embedding,
  so the embedding spans the range it has in the paper [guess].
- The project's layers are reused: `zoo.layers.Attention` (bidirectional, no RoPE, q/k/v biases as in DiT; its output
  projection has no bias, DiT's has one), `zoo.layers.MLP` (GELU with tanh approximation and biases, as in DiT), and
  `zoo.layers.DenseGeneral` with its default LeCun-normal initialisation (DiT: Xavier-uniform; embeddings normal
  0.02 as in DiT).
- The paper's smallest model is DiT-S (384 wide, 12 layers); the defaults here are sized for 8x8x1 digits on a CPU
  [guess]: patch 2 (16 tokens), width 64, 4 layers of 4 heads.

The pieces the DDM router (`zoo.models.flow_router`) shares with DiT live here: the backbone `DiTBackbone` (patch
embedding, conditioning, blocks, final adaLN norm) and its analytic parameter and FLOP counts.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers import MLP, Attention, DenseGeneral, Embed
from zoo.layers.embeddings import sincos_2d
from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model


def patchify(images, patch_size):
  """[batch, H, W, C] -> [batch, (H/p)(W/p), p*p*C], patches in row-major order, pixels (row, column, channel)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, patch_size, height, width, channels):
  """The inverse of `patchify`: [batch, (H/p)(W/p), p*p*C] -> [batch, H, W, C]."""
  b, p = x.shape[0], patch_size
  x = x.reshape(b, height // p, width // p, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, channels)


def timestep_embedding(t, dim, max_period=10000.0):
  """Sinusoidal embedding of (scaled) times (ADM / DiT): t [batch] -> [batch, dim] float32,
  `[cos(t f_i), sin(t f_i)]` with `f_i = max_period^(-i / (dim/2))`, i < dim/2 (dim even)."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
  """adaLN: x [batch, length, embed] * (1 + scale) + shift, with shift/scale [batch, embed]."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(x, epsilon):
  """LayerNorm without learned affine over the last axis (DiT's `elementwise_affine=False`), in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


class Modulation(nn.Module):
  """`SiLU(c) -> Linear(embed, n * embed)`, zero-initialised (adaLN-Zero): c [batch, embed] -> n arrays [batch,
  embed]. Parameters `kernel` [embed, n, embed], `bias` [n, embed]."""

  num_outputs: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c):
    out = DenseGeneral(
      (self.num_outputs, c.shape[-1]),
      kernel_axes=("embed", None, "mlp"),
      use_bias=True,
      kernel_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="linear",
    )(nn.silu(c))
    return tuple(out[:, i] for i in range(self.num_outputs))


class AdaLNZeroBlock(nn.Module):
  """One DiT block with adaLN-Zero conditioning (Peebles & Xie 2023, section 3.2, Figure 3, right).

  Attributes:
    num_heads: attention heads (head width = embed / num_heads).
    mlp_dim: MLP inner width.
    norm_epsilon: LayerNorm epsilon.
  """

  num_heads: int
  mlp_dim: int
  norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, gates=None):
    """x: [batch, tokens, embed], c: [batch, embed] -> [batch, tokens, embed]; x itself at initialisation.

    gates: optional structured-pruning multipliers (APTP, `zoo.models.aptp`): {'heads': [batch, num_heads], 'mlp':
    [batch, mlp_dim], 'block': [batch]}; a 0 removes a head, an MLP unit, or the whole block (x passes through)."""
    gates = gates or {}
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = x.shape[-1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = Modulation(6, name="modulation", **dtypes)(c)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    h, _ = Attention(
      num_heads=self.num_heads,
      head_dim=embed // self.num_heads,
      use_rope=False,
      causal=False,
      qkv_bias=True,
      name="attention",
      **dtypes,
    )(modulate(layer_norm(x, self.norm_epsilon), shift_msa, scale_msa), positions, head_gates=gates.get("heads"))
    block = gates.get("block")
    if block is not None:
      gate_msa, gate_mlp = gate_msa * block[:, None], gate_mlp * block[:, None]
    x = x + gate_msa[:, None, :] * h
    h = MLP(self.mlp_dim, activation="gelu", use_bias=True, name="mlp", **dtypes)(
      modulate(layer_norm(x, self.norm_epsilon), shift_mlp, scale_mlp), hidden_gates=gates.get("mlp")
    )
    x = x + gate_mlp[:, None, :] * h
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DiTBackbone(nn.Module):
  """Patch embedding + positions, timestep conditioning (+ an optional extra conditioning vector), `num_layers`
  adaLN-Zero blocks and the final adaLN-modulated LayerNorm: the DiT trunk without its output projection.

  Attributes:
    patch_size, num_layers, num_heads, mlp_dim, frequency_dim, time_scale, norm_epsilon: see `DiT`.
  """

  patch_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  embed_dim: int
  frequency_dim: int = 256
  time_scale: float = 1000.0
  norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, t, condition=None, gates=None):
    """images [batch, H, W, C], t [batch] in [0, 1], condition: optional [batch, embed] added to the timestep
    embedding, gates: optional per-layer pruning gates (a list of `AdaLNZeroBlock` gate dicts) -> (tokens [batch,
    (H/p)(W/p), embed] after the final modulated norm, c [batch, embed])."""
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, h, w, _ = images.shape
    p, e = self.patch_size, self.embed_dim
    x = DenseGeneral(e, kernel_axes=(None, "embed"), use_bias=True, name="patch_embed", **dtypes)(
      patchify(images.astype(self.dtype), p)
    )
    x = x + jnp.asarray(sincos_2d(h // p, w // p, e), self.dtype)[None]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    embed_init = nn.initializers.normal(stddev=0.02)  # DiT's timestep MLP initialisation
    c = timestep_embedding(t * self.time_scale, self.frequency_dim).astype(self.dtype)
    c = DenseGeneral(e, kernel_axes=(None, "mlp"), use_bias=True, kernel_init=embed_init, name="time_in", **dtypes)(c)
    c = nn.silu(c)
    c = DenseGeneral(e, kernel_axes=("mlp", "embed"), use_bias=True, kernel_init=embed_init, name="time_out", **dtypes)(
      c
    )
    if condition is not None:
      c = c + condition.astype(self.dtype)
    for i in range(self.num_layers):
      block_gates = gates[i] if gates is not None else None
      x = AdaLNZeroBlock(self.num_heads, self.mlp_dim, self.norm_epsilon, name=f"layers_{i}", **dtypes)(
        x, c, block_gates
      )
    shift, scale = Modulation(2, name="final_modulation", **dtypes)(c)
    return modulate(layer_norm(x, self.norm_epsilon), shift, scale), c


def check_backbone(model):
  """Config checks of the fields a `DiTBackbone` is built from (DiT and the flow router)."""
  check_config(
    model,
    positive=("image_size", "channels", "patch_size", "embed_dim", "num_layers", "num_heads", "frequency_dim"),
    intervals={"mlp_ratio": "(0, inf)", "time_scale": "(0, inf)", "norm_epsilon": "(0, inf)"},
    dtypes=("dtype", "param_dtype"),
  )
  if model.image_size % model.patch_size:
    raise ConfigError(
      f"config.model.patch_size={model.patch_size} must divide image_size={model.image_size} (whole patches)"
    )
  if model.embed_dim % model.num_heads:
    raise ConfigError(f"config.model.embed_dim={model.embed_dim} must be divisible by num_heads={model.num_heads}")
  if model.embed_dim % 4:
    raise ConfigError(
      f"config.model.embed_dim={model.embed_dim} must be divisible by 4 (the 2-D sine-cosine positional embedding)"
    )
  if model.frequency_dim % 2:
    raise ConfigError(f"config.model.frequency_dim={model.frequency_dim} must be even (cos and sin halves)")
  if int(model.embed_dim * model.mlp_ratio) < 1:
    raise ConfigError(
      f"config.model.mlp_ratio={model.mlp_ratio} gives an MLP width of 0 at embed_dim={model.embed_dim}"
    )


def backbone_of(model):
  """The `DiTBackbone` of a model with the backbone fields (DiT, the flow router), named 'backbone'."""
  return DiTBackbone(
    patch_size=model.patch_size,
    num_layers=model.num_layers,
    num_heads=model.num_heads,
    mlp_dim=int(model.embed_dim * model.mlp_ratio),
    embed_dim=model.embed_dim,
    frequency_dim=model.frequency_dim,
    time_scale=model.time_scale,
    norm_epsilon=model.norm_epsilon,
    dtype=jnp.dtype(model.dtype),
    param_dtype=jnp.dtype(model.param_dtype),
    name="backbone",
  )


def check_inputs(model, images, t):
  """Checks images [batch, image_size, image_size, channels] float and t [batch] or scalar; returns t as [batch]."""
  expected = (model.image_size, model.image_size, model.channels)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected or not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f"images must be float [batch, {', '.join(map(str, expected))}] (config.model image_size, channels), got "
      f"{images.dtype} {tuple(images.shape)}"
    )
  t = jnp.asarray(t)
  if t.ndim == 0:
    t = jnp.broadcast_to(t, images.shape[:1])
  if t.shape != images.shape[:1]:
    raise ValueError(f"t must be [batch] = [{images.shape[0]}] (or a scalar), got shape {tuple(t.shape)}")
  return t


def backbone_params(model):
  """Parameters of `backbone_of(model)`: patch embedding, timestep MLP, blocks, final modulation."""
  e, m, f = model.embed_dim, int(model.embed_dim * model.mlp_ratio), model.frequency_dim
  pixels = model.patch_size**2 * model.channels
  block = (6 * e * e + 6 * e) + (3 * (e * e + e) + e * e) + (e * m + m + m * e + e)
  return (pixels * e + e) + (f * e + e + e * e + e) + model.num_layers * block + (2 * e * e + 2 * e)


def backbone_flops(model):
  """Forward FLOPs of `backbone_of(model)` on one image: 2 x the multiply-adds of its matmuls,
  `2 * (N P E + F E + E^2 + L (6 E^2 + 4 N E^2 + 2 N^2 E + 2 N E M) + 2 E^2)` with N tokens, P = p*p*C pixels per
  patch, E embed_dim, F frequency_dim, L layers, M the MLP width: patch embedding, timestep MLP, per block the
  modulation (6E outputs), q/k/v/out projections, `q k^T` and `probs v` over all N keys, the MLP; final modulation.
  Biases, norms, activations, softmax and the positional embedding are not counted."""
  e, m, f = model.embed_dim, int(model.embed_dim * model.mlp_ratio), model.frequency_dim
  n = (model.image_size // model.patch_size) ** 2
  pixels = model.patch_size**2 * model.channels
  block = 6 * e * e + 4 * n * e * e + 2 * n * n * e + 2 * n * e * m
  return 2 * (n * pixels * e + f * e + e * e + model.num_layers * block + 2 * e * e)


@register_model("dit")
class DiT(nn.Module):
  """Diffusion Transformer predicting the flow-matching velocity (see the module docstring). Config keys are the
  fields below.

  Attributes:
    image_size: height = width of the images.
    channels: image channels.
    patch_size: p; the model sees (image_size / p)^2 tokens of p*p*channels pixels.
    num_classes: classes of the conditioning labels; the null class (classifier-free guidance) is `num_classes`;
      0 = unconditional (labels ignored, no class embedding).
    embed_dim: transformer width (divisible by num_heads and by 4).
    num_layers: adaLN-Zero blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / embed_dim (DiT: 4).
    frequency_dim: width of the sinusoidal timestep embedding (DiT: 256).
    time_scale: t in [0, 1] is multiplied by this before the sinusoidal embedding [guess: DiT's 1000 steps].
    norm_epsilon: LayerNorm epsilon (DiT: 1e-6).
    dtype: compute dtype (name or dtype); the velocity is returned in float32.
    param_dtype: parameter dtype.

  `exposes` (the `zoo.models` contract): none.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  image_size: int = 8
  channels: int = 1
  patch_size: int = 2
  num_classes: int = 10
  embed_dim: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  frequency_dim: int = 256
  time_scale: float = 1000.0
  norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_backbone(self)
    check_config(self, non_negative=("num_classes",))
    if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool):
      raise ConfigError(f"config.model.num_classes={self.num_classes!r} must be an integer >= 0 (0 = unconditional)")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, t, labels=None, gates=None, deterministic=True):
    """The velocity at (x_t, t).

    Args:
      images: x_t [batch, image_size, image_size, channels] float.
      t: [batch] (or a scalar) float32 in [0, 1]; data at t = 0, noise at t = 1 (`zoo.flow.matching`).
      labels: [batch] int32 in 0..num_classes (num_classes = the null class); None = the null class. Ignored when
        num_classes = 0.
      gates: optional structured-pruning gates, one `AdaLNZeroBlock` gate dict per layer (APTP, `zoo.models.aptp`).
      deterministic: unused (DiT has no dropout); part of the models' call contract.

    Returns:
      (velocity [batch, image_size, image_size, channels] float32, ModelOutput with no aux loss).
    """
    del deterministic
    t = check_inputs(self, images, t)
    condition = None
    if self.num_classes:
      if labels is None:
        labels = jnp.full(images.shape[:1], self.num_classes, jnp.int32)
      labels = jnp.asarray(labels)
      if labels.shape != images.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be int [batch] = [{images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
      condition = Embed(
        self.num_classes + 1,
        self.embed_dim,
        dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype),
        name="class_embed",
      )(labels)
    x, _ = backbone_of(self)(images, t, condition, gates)
    x = DenseGeneral(
      self.patch_size**2 * self.channels,
      kernel_axes=("embed", None),
      use_bias=True,
      kernel_init=nn.initializers.zeros,
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
      name="output",
    )(x)
    velocity = unpatchify(x, self.patch_size, self.image_size, self.image_size, self.channels)
    return velocity.astype(jnp.float32), ModelOutput()

  def num_params(self):
    """Analytic parameter count (equals `count_params` of the initialised params)."""
    e, pixels = self.embed_dim, self.patch_size**2 * self.channels
    classes = (self.num_classes + 1) * e if self.num_classes else 0
    return backbone_params(self) + classes + e * pixels + pixels

  def flops_per_sample(self):
    """Forward FLOPs of one image (2 x multiply-adds of the matmuls, attention included): `backbone_flops` plus the
    output projection `2 N E P`; the class embedding is a lookup."""
    n = (self.image_size // self.patch_size) ** 2
    return backbone_flops(self) + 2 * n * self.embed_dim * self.patch_size**2 * self.channels

  def pruned_flops(self, gates):
    """Forward FLOPs per image [batch] under structured-pruning `gates` (one `AdaLNZeroBlock` gate dict per layer, each
    entry optional), differentiable in soft gates: `flops_per_sample` with each block's attention terms scaled by its
    open heads / num_heads, its MLP term by its open units, and the whole block (modulation included) by its block
    gate. With every gate 1 this is `flops_per_sample()`."""
    e, f, n = self.embed_dim, self.frequency_dim, (self.image_size // self.patch_size) ** 2
    pixels = self.patch_size**2 * self.channels
    m = int(e * self.mlp_ratio)
    total = 2.0 * (n * pixels * e + f * e + e * e + 2 * e * e) + 2.0 * n * e * pixels
    for g in gates:
      heads = jnp.sum(g["heads"], -1) / self.num_heads if "heads" in g else 1.0
      units = jnp.sum(g["mlp"], -1) if "mlp" in g else m
      block = g.get("block", 1.0)
      total = total + 2.0 * block * (6 * e * e + (4 * n * e * e + 2 * n * n * e) * heads + 2 * n * e * units)
    return total
