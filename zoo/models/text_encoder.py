"""Bidirectional transformer encoder that pools a token sequence into one vector: a classifier (`num_classes` > 0)
or an embedding model (`num_classes` = 0, L2-normalised), e.g. for the 'sequence_classification' task.

- Pre-norm transformer blocks (`zoo.layers.DecoderBlock`: RMSNorm, RoPE, GQA, SwiGLU) with full (non-causal)
  self-attention over the real tokens: the encoder side of Vaswani et al. 2017, in the LLaMA layout.
- Pooling of the final hidden states: 'mean' over the real tokens (Sentence-BERT, Reimers & Gurevych 2019, sec. 3),
  'first' (the BOS position, BERT's [CLS], Devlin et al. 2019) or 'last' (the last real token, as decoder-based
  embedders do, e.g. E5-Mistral).
"""

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import MLP, Attention, DecoderBlock, DenseGeneral, Embed, RMSNorm
from zoo.layers.mlp import ACTIVATIONS
from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model

POOLINGS = ("mean", "first", "last")


@register_model("text_encoder")
class TextEncoder(nn.Module):
  """Encoder over tokens [batch, length] -> logits [batch, num_classes] or an embedding [batch, embed_dim].

  Attributes:
    vocab_size, num_layers, embed_dim, num_heads, num_kv_heads, mlp_dim, mlp_activation, rope_theta, norm_epsilon,
      dropout_rate, dtype, param_dtype: as in `dense_lm`.
    pooling: 'mean' | 'first' | 'last' (see the module docstring).
    num_classes: > 0: a linear head to that many logits; 0: the pooled vector, L2-normalised.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  vocab_size: int = 259
  num_layers: int = 2
  embed_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_dim: int = 256
  mlp_activation: str = "swiglu"
  rope_theta: float = 10000.0
  pooling: str = "mean"
  num_classes: int = 0
  norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("vocab_size", "num_layers", "embed_dim", "num_heads", "mlp_dim"),
      intervals={"dropout_rate": "[0, 1)"},
      dtypes=("dtype", "param_dtype"),
      choices={"pooling": POOLINGS, "mlp_activation": sorted(ACTIVATIONS)},
    )
    if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
      raise ConfigError(
        f"config.model.embed_dim={self.embed_dim} must split into num_heads={self.num_heads} heads of even width (RoPE)"
      )
    if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
      raise ConfigError(f"config.model.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    if not isinstance(self.num_classes, int) or self.num_classes < 0:
      raise ConfigError(f"config.model.num_classes={self.num_classes!r} must be an integer >= 0 (0 = embeddings)")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, *, mask=None, deterministic=True):
    """tokens: [batch, length] int32; mask: [batch, length] (1 = real token; default all) -> (logits [batch,
    num_classes] or embedding [batch, embed_dim], ModelOutput)."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    dtypes = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    real = jnp.ones(tokens.shape, bool) if mask is None else mask > 0
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = Embed(self.vocab_size, self.embed_dim, name="embed", **dtypes)(tokens)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    attention = functools.partial(
      Attention,
      num_heads=self.num_heads,
      head_dim=self.embed_dim // self.num_heads,
      num_kv_heads=self.num_kv_heads,
      rope_theta=self.rope_theta,
      causal=False,
      norm_epsilon=self.norm_epsilon,
      **dtypes,
    )
    ffn = functools.partial(MLP, hidden_dim=self.mlp_dim, activation=self.mlp_activation, **dtypes)
    keys = real[:, None, None, :]  # [batch, 1, 1, length]: no query attends to padding
    for i in range(self.num_layers):
      x, _, _ = DecoderBlock(
        attention, ffn, norm_epsilon=self.norm_epsilon, dropout_rate=self.dropout_rate, name=f"layers_{i}", **dtypes
      )(x, positions, mask=keys, deterministic=deterministic)
    x = RMSNorm(self.norm_epsilon, name="final_norm", **dtypes)(x).astype(jnp.float32)
    pooled = self._pool(x, real)
    if self.num_classes:
      out = DenseGeneral(self.num_classes, kernel_axes=("embed", "vocab"), name="head", **dtypes)(pooled)
      return out.astype(jnp.float32), ModelOutput()
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-6), ModelOutput()

  def _pool(self, x, real):
    """x: [batch, length, embed] float32, real: [batch, length] bool -> [batch, embed]."""
    if self.pooling == "first":
      return x[:, 0]
    if self.pooling == "last":
      last = jnp.maximum(jnp.sum(real, axis=1) - 1, 0)
      return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    weights = real.astype(jnp.float32)[..., None]
    return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
