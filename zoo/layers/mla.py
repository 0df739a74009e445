"""Multi-head latent attention (MLA) with a compressed KV cache.

DeepSeek-AI 2024, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model", section 2.1
(eqs. 9-19), as used unchanged by DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", section 2.1.1):

- keys and values come from one low-rank latent `c_kv = RMSNorm(W_DKV x)` [kv_lora_rank] (eq. 9), expanded per head
  by `W_UKV c_kv` into a position-free key part `k_nope` [heads, qk_nope_head_dim] and the value [heads, v_head_dim]
  (eqs. 10-11);
- a single decoupled RoPE key `k_rope = RoPE(W_KR x)` [qk_rope_head_dim] is shared by all heads (eqs. 14-15);
- queries come from their own low-rank latent `c_q = RMSNorm(W_DQ x)` [q_lora_rank] (eq. 12; or a plain projection
  when `q_lora_rank` is None) and are split into `q_nope` and a RoPE part `q_rope` (eqs. 13, 16);
- `softmax([q_nope; q_rope] . [k_nope; k_rope] * scale) v` per head (eqs. 17-18), then the output projection
  (eq. 19).

The cache (`MLACache`) stores only `c_kv` and the rotated `k_rope` per position (section 2.1.2: the KV cache is
`kv_lora_rank + qk_rope_head_dim` numbers per token); keys and values are re-expanded from it at every step. Slot `s`
holds absolute position `s`, as in `zoo.layers.KVCache`, so the masks of `zoo.layers.attention_mask` apply unchanged.

RoPE layout: the half-split pairing of `zoo.layers.rope` (feature `i` rotates with `i + d/2`). DeepSeek's released
weights pair interleaved features `(2i, 2i+1)`; `zoo.checkpoints` permutes the rows of the RoPE projections when it
converts them, which gives the same attention logits exactly.

RoPE scaling (`rope_scaling`, the Hugging Face `rope_parameters` dict): every type of `zoo.layers.rope`; under YaRN
DeepSeek also multiplies the softmax scale by `mscale(factor, mscale_all_dim)^2` (`mla_softmax_scale`).
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from zoo.layers.attention import attention_mask
from zoo.layers.kv_cache import check_positive_dims, slot_positions, write_slots
from zoo.layers.linear import DenseGeneral
from zoo.layers.norms import RMSNorm
from zoo.layers.rope import apply_rope, rope_type, yarn_mscale


def mla_softmax_scale(qk_head_dim, rope_scaling=None):
  """`qk_head_dim^-1/2`, times `mscale(factor, mscale_all_dim)^2` under YaRN scaling (DeepSeek-V2 code [guess: not
  in the paper's text])."""
  scale = qk_head_dim**-0.5
  if rope_type(rope_scaling) != "default" and rope_scaling.get("mscale_all_dim"):
    scale *= yarn_mscale(float(rope_scaling["factor"]), rope_scaling["mscale_all_dim"]) ** 2
  return scale


@flax.struct.dataclass
class MLACache:
  """The compressed MLA cache: latent: [batch, max_length, kv_lora_rank]; k_rope: [batch, max_length,
  qk_rope_head_dim] (already rotated); length: [batch] int32 (one past the largest position written)."""

  latent: jax.Array
  k_rope: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, batch_size, max_length, kv_lora_rank, qk_rope_head_dim, dtype=jnp.float32):
    """An empty cache (zeros, length 0)."""
    dims = dict(max_length=max_length, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
    check_positive_dims("MLACache", batch_size=batch_size, **dims)
    return cls(
      latent=jnp.zeros((batch_size, max_length, kv_lora_rank), dtype),
      k_rope=jnp.zeros((batch_size, max_length, qk_rope_head_dim), dtype),
      length=jnp.zeros((batch_size,), jnp.int32),
    )

  @property
  def max_length(self):
    return self.latent.shape[1]

  def update(self, latent, k_rope, positions):
    """Write latent [batch, length, kv_lora_rank] and k_rope [batch, length, qk_rope_head_dim] at `positions`
    [batch, length] (each in [0, max_length))."""
    if (
      latent.shape[0] != self.latent.shape[0]
      or latent.shape[2:] != self.latent.shape[2:]
      or (k_rope.shape[2:] != self.k_rope.shape[2:] or k_rope.shape[:2] != latent.shape[:2])
    ):
      raise ValueError(
        f"MLACache.update: latent {latent.shape} / k_rope {k_rope.shape} do not fit a cache of "
        f"shapes {self.latent.shape} / {self.k_rope.shape}"
      )
    buffers, length = write_slots("MLACache", (self.latent, self.k_rope), (latent, k_rope), positions, self.length)
    return MLACache(latent=buffers[0], k_rope=buffers[1], length=length)

  def read(self):
    """Returns (latent, k_rope, key_positions [batch, max_length], key_valid [batch, max_length] bool)."""
    return self.latent, self.k_rope, *slot_positions(self.length, self.max_length)


class MultiHeadLatentAttention(nn.Module):
  """Causal MLA (DeepSeek-V2 section 2.1) with the `zoo.layers.Attention` call contract.

  Parameters: `q_a/kernel` [embed, q_lora_rank], `q_a_norm/scale` [q_lora_rank], `q_b/kernel` [q_lora_rank, heads,
  qk_head_dim] (or `query/kernel` [embed, heads, qk_head_dim] when `q_lora_rank` is None); `kv_a/kernel` [embed,
  kv_lora_rank + qk_rope_head_dim], `kv_a_norm/scale` [kv_lora_rank], `kv_b/kernel` [kv_lora_rank, heads,
  qk_nope_head_dim + v_head_dim]; `out/kernel` [heads, v_head_dim, embed]; `q_a`, `kv_a`, `out` biases when
  `use_bias`. In every query/key head the position-free part comes first, the RoPE part last.

  Attributes:
    num_heads: attention heads.
    kv_lora_rank: width of the KV latent `c_kv`.
    q_lora_rank: width of the query latent, or None for a full-rank query projection.
    qk_nope_head_dim: position-free query/key width per head.
    qk_rope_head_dim: decoupled RoPE query/key width (one shared key head).
    v_head_dim: value width per head.
    rope_theta: RoPE base.
    rope_scaling: None or a Hugging Face `rope_parameters`-style dict (see
      `zoo.layers.rope.scaled_rope_frequencies`).
    use_bias: biases on q_a, kv_a and out (`attention_bias`).
    latent_norm_epsilon: epsilon of the two latent RMSNorms (1e-6 in DeepSeek-V2/V3, independent of the block
      norms' epsilon).
  """

  num_heads: int
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  q_lora_rank: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  use_bias: bool = False
  latent_norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def init_cache(self, batch_size, max_length, dtype=None):
    """An empty MLACache for this layer (call on an unbound module: no parameters needed)."""
    return MLACache.create(batch_size, max_length, self.kv_lora_rank, self.qk_rope_head_dim, dtype or self.dtype)

  @nn.compact
  def __call__(self, x, positions, *, cache: MLACache | None = None, mask=None):
    """Attend over the sequence (and the cache, if given).

    Args:
      x: [batch, length, embed].
      positions: [batch, length] int absolute positions.
      cache: optional MLACache; the new latents are written at `positions` and the queries attend over the whole
        cache.
      mask: optional extra bool mask broadcastable to [batch, 1 or heads, length, k_length], ANDed with the causal
        mask; k_length = length without a cache, cache.max_length with one.

    Returns:
      (y [batch, length, embed], updated cache or None).
    """
    if positions.shape != x.shape[:2]:
      raise ValueError(f"positions shape {positions.shape} must be [batch, length] = {x.shape[:2]}")
    h, nope, rope, vd = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(epsilon=self.latent_norm_epsilon, **dense)
    if self.q_lora_rank is None:
      q = DenseGeneral((h, nope + rope), kernel_axes=("embed", "heads", "head_dim"), name="query", **dense)(x)
    else:
      c_q = DenseGeneral(self.q_lora_rank, kernel_axes=("embed", None), use_bias=self.use_bias, name="q_a", **dense)(x)
      c_q = RMSNorm(**norm, name="q_a_norm")(c_q)
      q = DenseGeneral((h, nope + rope), kernel_axes=(None, "heads", "head_dim"), name="q_b", **dense)(c_q)
    kv_a = DenseGeneral(
      self.kv_lora_rank + rope, kernel_axes=("embed", None), use_bias=self.use_bias, name="kv_a", **dense
    )(x)
    latent = RMSNorm(**norm, name="kv_a_norm")(kv_a[..., : self.kv_lora_rank])
    rotary = dict(theta=self.rope_theta, rope_scaling=self.rope_scaling)
    k_rope = apply_rope(kv_a[..., None, self.kv_lora_rank :], positions, **rotary)[..., 0, :]
    q = jnp.concatenate([q[..., :nope], apply_rope(q[..., nope:], positions, **rotary)], axis=-1)

    if cache is None:
      k_positions, k_valid = positions, None
    else:
      cache = cache.update(latent, k_rope, positions)
      latent, k_rope, k_positions, k_valid = cache.read()
      latent, k_rope = latent.astype(self.dtype), k_rope.astype(self.dtype)
    kv = DenseGeneral((h, nope + vd), kernel_axes=(None, "heads", "head_dim"), name="kv_b", **dense)(latent)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    full_mask = attention_mask(positions, k_positions, k_valid=k_valid)
    if mask is not None:
      full_mask = full_mask & mask
    scale = mla_softmax_scale(nope + rope, self.rope_scaling)
    logits = (
      jnp.einsum("bthd,bshd->bhts", q[..., :nope], k_nope, preferred_element_type=jnp.float32)
      + jnp.einsum("bthd,bsd->bhts", q[..., nope:], k_rope, preferred_element_type=jnp.float32)
    ) * scale
    logits = jnp.where(full_mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)
    y = DenseGeneral(
      x.shape[-1],
      axis=(-2, -1),
      kernel_axes=("heads", "head_dim", "embed"),
      use_bias=self.use_bias,
      name="out",
      **dense,
    )(out)
    return y, cache
