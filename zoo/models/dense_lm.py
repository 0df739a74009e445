"""Dense decoder-only language model: the LLaMA/Qwen layout (pre-norm RMSNorm, RoPE, GQA, SwiGLU).

- Decoder-only transformer LM: Vaswani et al. 2017; pre-norm with RMSNorm as in LLaMA (Touvron et al. 2023, section
  2.2).
- RoPE: Su et al. 2021, eq. 34, with optional linear / llama3 / YaRN scaling (`zoo.layers.rope`). GQA: Ainslie et
  al. 2023, section 2.2. SwiGLU: Shazeer 2020, eq. 6.
- Tied input/output embeddings: Press & Wolf 2017.
- qk-norm per head (Qwen3) or over the whole q/k projections (OLMoE) (`zoo.layers.Attention`).
- `attention='mla'`: multi-head latent attention with its compressed cache (DeepSeek-AI 2024, "DeepSeek-V2",
  section 2.1, eqs. 9-19; `zoo.layers.MultiHeadLatentAttention`), as in DeepSeek-V3.

Layers are an explicit Python loop of `DecoderBlock`s (no `nn.scan` over layers); `remat=True` rematerialises each
block in the backward pass. The cache is one `KVCache` (or `MLACache` with MLA) per layer (a tuple); a cache slot
holds one absolute position, so `max_length` must cover prompt + generated tokens.
"""

import functools
from typing import Any, ClassVar

import flax.core
import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import (
  MLP,
  Attention,
  DecoderBlock,
  DenseGeneral,
  Embed,
  KVCache,
  MLACache,
  MultiHeadLatentAttention,
  RMSNorm,
  train_flops_per_token,
)
from zoo.layers.attention import QK_NORM_SCOPES
from zoo.layers.mlp import ACTIVATIONS
from zoo.layers.rope import check_rope_scaling
from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model


def default_positions(tokens, cache):
  """[batch, length] absolute positions: 0..T-1, or continuing from the cache's length (first layer's cache)."""
  b, t = tokens.shape
  start = jnp.zeros((b,), jnp.int32) if cache is None else cache[0].length
  return start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


@register_model("dense_lm")
class DenseLM(nn.Module):
  """Decoder LM. Config keys are the fields below.

  Attributes:
    vocab_size: vocabulary size.
    num_layers: decoder blocks.
    embed_dim: residual width.
    num_heads: query heads.
    num_kv_heads: key/value heads (None = num_heads; GQA when fewer). GQA only.
    head_dim: per-head width (None = embed_dim // num_heads). GQA only.
    mlp_dim: FFN inner width.
    mlp_activation: FFN variant (`zoo.layers.ACTIVATIONS`; default SwiGLU).
    rope_theta: RoPE base.
    rope_scaling: None or a Hugging Face-style RoPE scaling dict, `rope_type` in `zoo.layers.ROPE_TYPES` ('linear',
      'llama3', 'yarn') with its parameters (`zoo.layers.rope.scaled_rope_frequencies`).
    sliding_window: if set, every layer attends to at most this many keys. GQA only.
    qk_norm: RMSNorm on q and k (Qwen3, OLMoE). GQA only.
    qk_norm_scope: 'head' (per head over head_dim, Qwen3) or 'projection' (over the whole q and k projections,
      OLMoE).
    qkv_bias: Qwen2-style biases on q/k/v. GQA only.
    attention: 'gqa' (`zoo.layers.Attention`) or 'mla' (`zoo.layers.MultiHeadLatentAttention`).
    q_lora_rank: MLA query latent width (None = full-rank query projection).
    kv_lora_rank: MLA key/value latent width (required with 'mla').
    qk_nope_head_dim: MLA position-free query/key width per head (required with 'mla').
    qk_rope_head_dim: MLA decoupled RoPE query/key width (required with 'mla', even).
    v_head_dim: MLA value width per head (required with 'mla').
    tie_embeddings: output logits = final hidden . embedding^T (else an `lm_head` [embed, vocab]).
    norm_epsilon: RMSNorm epsilon.
    dropout_rate: residual dropout (training only).
    dtype: compute dtype (name or dtype); logits are returned in float32.
    param_dtype: parameter dtype.
    remat: rematerialise each block in the backward pass (saves activation memory).

  `exposes` (the `zoo.models` contract): the per-token outputs the model sows into 'intermediates'; none here.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  vocab_size: int = 256
  num_layers: int = 2
  embed_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int = 256
  mlp_activation: str = "swiglu"
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  sliding_window: int | None = None
  qk_norm: bool = False
  qk_norm_scope: str = "head"
  qkv_bias: bool = False
  attention: str = "gqa"
  q_lora_rank: int | None = None
  kv_lora_rank: int | None = None
  qk_nope_head_dim: int | None = None
  qk_rope_head_dim: int | None = None
  v_head_dim: int | None = None
  tie_embeddings: bool = True
  norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  remat: bool = False

  def __post_init__(self):
    check_config(
      self,
      positive=("vocab_size", "num_layers", "embed_dim", "num_heads", "mlp_dim"),
      intervals={"dropout_rate": "[0, 1)"},
      dtypes=("dtype", "param_dtype"),
      choices={"attention": ("gqa", "mla"), "qk_norm_scope": QK_NORM_SCOPES, "mlp_activation": sorted(ACTIVATIONS)},
    )
    if self.attention == "mla":
      self._check_mla()
    else:
      self._check_gqa()
    if self.rope_scaling is not None:
      if hasattr(self.rope_scaling, "to_dict"):
        object.__setattr__(self, "rope_scaling", self.rope_scaling.to_dict())
      try:
        check_rope_scaling(self.rope_scaling)
      except ValueError as e:
        raise ConfigError(f"config.model.rope_scaling: {e}") from None
      # Frozen, so that the module stays hashable (Linen hashes modules by their fields).
      object.__setattr__(self, "rope_scaling", flax.core.FrozenDict(self.rope_scaling))
    super().__post_init__()

  def _check_gqa(self):
    mla_only = [
      k
      for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
      if getattr(self, k) is not None
    ]
    if mla_only:
      raise ConfigError(
        f"config.model.{mla_only[0]}={getattr(self, mla_only[0])} is an MLA width; set attention='mla' or leave it None"
      )
    if self.head_dim is None and self.embed_dim % self.num_heads:
      raise ConfigError(
        f"config.model.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
        "set head_dim explicitly"
      )
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for RoPE")
    check_config(self, optional_positive=("sliding_window",))
    if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
      raise ConfigError(f"config.model.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")

  def _check_mla(self):
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      value = getattr(self, key)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.model.{key}={value!r} must be a positive integer with attention='mla'")
    check_config(self, optional_positive=("q_lora_rank",))
    if self.qk_rope_head_dim % 2:
      raise ConfigError(f"config.model.qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
    gqa_only = {"head_dim": None, "num_kv_heads": None, "sliding_window": None, "qk_norm": False, "qkv_bias": False}
    for key, neutral in gqa_only.items():
      if getattr(self, key) != neutral:
        raise ConfigError(
          f"config.model.{key}={getattr(self, key)!r} is a GQA option; attention='mla' needs {key}={neutral}"
        )

  @property
  def resolved_head_dim(self):
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def resolved_kv_heads(self):
    return self.num_kv_heads or self.num_heads

  def attention_factory(self):
    """The attention sublayer of every block (`DecoderBlock` calls it with `name=`)."""
    dtypes = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    if self.attention == "mla":
      return functools.partial(
        MultiHeadLatentAttention,
        num_heads=self.num_heads,
        kv_lora_rank=self.kv_lora_rank,
        qk_nope_head_dim=self.qk_nope_head_dim,
        qk_rope_head_dim=self.qk_rope_head_dim,
        v_head_dim=self.v_head_dim,
        q_lora_rank=self.q_lora_rank,
        rope_theta=self.rope_theta,
        rope_scaling=self.rope_scaling,
        **dtypes,
      )
    return functools.partial(
      Attention,
      num_heads=self.num_heads,
      head_dim=self.resolved_head_dim,
      num_kv_heads=self.num_kv_heads,
      rope_theta=self.rope_theta,
      rope_scaling=self.rope_scaling,
      sliding_window=self.sliding_window,
      qk_norm=self.qk_norm,
      qk_norm_scope=self.qk_norm_scope,
      qkv_bias=self.qkv_bias,
      norm_epsilon=self.norm_epsilon,
      **dtypes,
    )

  def ffn_factory(self):
    return functools.partial(
      MLP,
      hidden_dim=self.mlp_dim,
      activation=self.mlp_activation,
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
    )

  def layer_block(self, i, ffn=None, attention=None, block_cls=DecoderBlock, **block_kwargs):
    """Layer i's block, named `layers_i`: `block_cls` (rematerialised with `remat`) with `ffn` (default
    `ffn_factory()`) and `attention` (default `attention_factory()`); `block_kwargs` go to `block_cls`."""
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(5,))
    return block_cls(
      attention or self.attention_factory(),
      ffn or self.ffn_factory(),
      norm_epsilon=self.norm_epsilon,
      dropout_rate=self.dropout_rate,
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
      name=f"layers_{i}",
      **block_kwargs,
    )

  def init_cache(self, batch_size, max_length):
    """An empty cache: a tuple of `num_layers` KVCache, each k/v [batch_size, max_length, kv_heads, head_dim]; with
    MLA, `num_layers` MLACache (latent [batch_size, max_length, kv_lora_rank], k_rope [.., qk_rope_head_dim])."""
    if self.attention == "mla":
      return tuple(
        MLACache.create(batch_size, max_length, self.kv_lora_rank, self.qk_rope_head_dim, jnp.dtype(self.dtype))
        for _ in range(self.num_layers)
      )
    return tuple(
      KVCache.create(batch_size, max_length, self.resolved_kv_heads, self.resolved_head_dim, jnp.dtype(self.dtype))
      for _ in range(self.num_layers)
    )

  def embed_tokens(self, tokens, positions, cache, deterministic):
    """The input side every decoder LM of the zoo shares; call it from the model's compact `__call__`.

    Checks `tokens` [batch, length] and `cache`, fills default positions and embeds (with dropout).

    Returns:
      (the `Embed` module for a tied output, x [batch, length, embed_dim], positions [batch, length]).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if cache is not None and len(cache) != self.num_layers:
      raise ValueError(f"cache has {len(cache)} layers, the model has num_layers={self.num_layers}")
    if positions is None:
      positions = default_positions(tokens, cache)
    embed = Embed(
      self.vocab_size,
      self.embed_dim,
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
      name="embed",
    )
    x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
    return embed, nn.Dropout(self.dropout_rate)(x, deterministic=deterministic), positions

  def output_logits(self, embed, x):
    """The output side every decoder LM shares: final RMSNorm, tied or untied projection -> float32 logits
    [batch, length, vocab_size]."""
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    x = RMSNorm(self.norm_epsilon, dtype=dtype, param_dtype=param_dtype, name="final_norm")(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = DenseGeneral(
        self.vocab_size, kernel_axes=("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, name="lm_head"
      )(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  @nn.compact
  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True):
    """Next-token logits.

    Args:
      tokens: [batch, length] int32.
      positions: [batch, length] absolute positions (default: 0.., or continuing from the cache).
      cache: the tuple from `init_cache` (prefill a prompt in one call, then one token per call), or None.
      deterministic: disables dropout.

    Returns:
      (logits [batch, length, vocab_size] float32, ModelOutput with the updated cache when `cache` was given).
    """
    embed, x, positions = self.embed_tokens(tokens, positions, cache, deterministic)
    new_cache = []
    for i in range(self.num_layers):
      block = self.layer_block(i)
      x, layer_cache, _ = block(x, positions, None if cache is None else cache[i], None, deterministic)
      new_cache.append(layer_cache)
    logits = self.output_logits(embed, x)
    return logits, ModelOutput(cache=None if cache is None else tuple(new_cache))

  def _attention_norm_params(self):
    """Norm scales inside one attention sublayer (qk-norms, or MLA's two latent norms)."""
    if self.attention == "mla":
      return (self.q_lora_rank or 0) + self.kv_lora_rank
    if not self.qk_norm:
      return 0
    d = self.resolved_head_dim
    return 2 * d if self.qk_norm_scope == "head" else (self.num_heads + self.resolved_kv_heads) * d

  def _attention_params(self):
    """Parameters of one attention sublayer."""
    e, h = self.embed_dim, self.num_heads
    if self.attention == "mla":
      qk = self.qk_nope_head_dim + self.qk_rope_head_dim
      query = e * h * qk if self.q_lora_rank is None else e * self.q_lora_rank + self.q_lora_rank * h * qk
      kv = e * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * h * (
        self.qk_nope_head_dim + self.v_head_dim
      )
      return query + kv + h * self.v_head_dim * e + self._attention_norm_params()
    kv, d = self.resolved_kv_heads, self.resolved_head_dim
    attention = e * h * d + 2 * e * kv * d + h * d * e
    if self.qkv_bias:
      attention += h * d + 2 * kv * d
    return attention + self._attention_norm_params()

  def num_params(self):
    """Analytic parameter count (equals `count_params` of the initialised params)."""
    e = self.embed_dim
    ffn = (3 if ACTIVATIONS[self.mlp_activation][1] else 2) * e * self.mlp_dim
    per_layer = self._attention_params() + ffn + 2 * e
    head = 0 if self.tie_embeddings else e * self.vocab_size
    return self.vocab_size * e + self.num_layers * per_layer + e + head

  def num_active_params(self):
    """Parameters one token uses; all of them in a dense model (routed models override this)."""
    return self.num_params()

  def train_flops_per_token(self, seq_len):
    """Training FLOPs per token (`zoo.layers.train_flops_per_token`): matmul params = the active params
    (`num_active_params`) except the input embedding lookup and the norm scales, plus the output projection. With MLA,
    `q k^T` runs over `heads * (qk_nope_head_dim + qk_rope_head_dim)` and `probs v` over `heads * v_head_dim`, so the
    attention width is their mean."""
    e = self.embed_dim
    matmul = self.num_active_params() - self.vocab_size * e - (2 * self.num_layers + 1) * e
    matmul -= self.num_layers * self._attention_norm_params()
    if self.tie_embeddings:
      matmul += self.vocab_size * e
    if self.attention == "mla":
      attention_dim = self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim) / 2
    else:
      attention_dim = self.num_heads * self.resolved_head_dim
    return train_flops_per_token(
      matmul,
      num_layers=self.num_layers,
      attention_dim=attention_dim,
      seq_len=seq_len,
      sliding_window=self.sliding_window,
    )
