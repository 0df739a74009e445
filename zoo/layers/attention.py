"""Multi-head / grouped-query attention with RoPE or NoPE, causal and sliding-window masks and a KV cache.

- Scaled dot-product attention: Vaswani et al. 2017, "Attention Is All You Need", eq. 1.
- Grouped-query attention (GQA): Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
  Multi-Head Checkpoints", section 2.2: query head `h` reads key/value head `h // (num_heads // num_kv_heads)`.
- RoPE: Su et al. 2021 (`zoo.layers.rope`), optionally with linear / llama3 / YaRN frequency scaling
  (`rope_scaling`); NoPE (no positional encoding) when `use_rope=False`.
- Sliding window (Beltagy et al. 2020, "Longformer"; Mistral 7B): a query at position `p` sees keys at positions
  `p - window < k <= p`.
- qk-norm, before RoPE: per head (Qwen3; `qk_norm_scope='head'`, RMSNorm over `head_dim`) or over the whole
  projection (OLMoE, Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models", its QK-Norm
  ablation; `qk_norm_scope='projection'`, RMSNorm over `heads * head_dim` of q and `kv_heads * head_dim` of k).

Masks are boolean `[batch, 1 or heads, q_length, k_length]`, True = may attend. Causality is defined on the absolute
`positions`, so the same rule serves full forwards and cached decoding (where key slot s holds position s).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers.kv_cache import KVCache
from zoo.layers.linear import DenseGeneral
from zoo.layers.norms import RMSNorm
from zoo.layers.rope import apply_rope, check_rope_scaling

QK_NORM_SCOPES = ("head", "projection")


def attention_mask(q_positions, k_positions, *, causal=True, sliding_window=None, k_valid=None):
  """Boolean mask [batch, 1, q_length, k_length] from absolute positions.

  Args:
    q_positions: [batch, q_length] int.
    k_positions: [batch, k_length] int.
    causal: keys at positions > the query's are masked.
    sliding_window: if set, keys at positions <= query - sliding_window are masked too.
    k_valid: optional [batch, k_length] bool, False for keys that do not exist (empty cache slots).
  """
  q = q_positions[:, :, None]
  k = k_positions[:, None, :]
  mask = jnp.ones(q.shape[:2] + k.shape[2:], bool)
  if causal:
    mask &= k <= q
  if sliding_window is not None:
    mask &= q - k < sliding_window
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask[:, None]


def segment_mask(q_segment_ids, k_segment_ids):
  """[batch, 1, q_length, k_length] bool: True where query and key carry the same segment id (packed documents)."""
  return (q_segment_ids[:, :, None] == k_segment_ids[:, None, :])[:, None]


def dot_product_attention(q, k, v, mask=None):
  """Softmax attention with grouped key/value heads; logits and softmax in float32.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, k_length, kv_heads, head_dim]; heads must be a multiple of kv_heads.
    mask: bool, broadcastable to [batch, heads, q_length, k_length]; dim 1 is 1 or heads. A query whose keys are
      all masked gets the uniform average over all keys [guess: finite fill instead of NaN]; callers that mask whole
      rows should discard those outputs.

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  if h % kv:
    raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={kv}")
  g = h // kv
  q = q.reshape(b, t, kv, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  if mask is not None:
    if mask.ndim != 4 or mask.shape[1] not in (1, h):
      raise ValueError(f"attention mask shape {mask.shape} must be [batch, 1 or {h}, q_length, k_length]")
    mask = (
      mask.reshape(mask.shape[0], 1, 1, *mask.shape[2:])
      if mask.shape[1] == 1
      else mask.reshape(mask.shape[0], kv, g, *mask.shape[2:])
    )
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
  return out.reshape(b, t, h, d)


class Attention(nn.Module):
  """Self-attention (causal by default): q/k/v projections, optional qk-norm and RoPE, GQA, optional sliding window
  and KV cache.

  Parameters: `query/kernel` [embed, heads, head_dim], `key/kernel` and `value/kernel` [embed, kv_heads, head_dim],
  `out/kernel` [heads, head_dim, embed]; `*/bias` when `qkv_bias` (Qwen2); `query_norm/scale`, `key_norm/scale`
  when `qk_norm`: [head_dim] each with scope 'head' (Qwen3), [heads * head_dim] and [kv_heads * head_dim] with scope
  'projection' (OLMoE).

  Attributes:
    num_heads: query heads.
    head_dim: width of each head.
    num_kv_heads: key/value heads (None = num_heads, i.e. multi-head; 1 = multi-query).
    use_rope: RoPE on q and k (False = NoPE).
    rope_theta: RoPE base.
    rope_scaling: None or a Hugging Face-style RoPE scaling dict (`zoo.layers.rope.scaled_rope_frequencies`).
    sliding_window: if set, each query sees at most this many keys (itself included).
    causal: mask the keys after each query (False: full attention, for encoders; with `mask` for padding).
    qk_norm: RMSNorm on q and k.
    qk_norm_scope: 'head' (one norm over head_dim, shared by the heads) or 'projection' (one norm over the whole
      q projection and one over the whole k projection).
    qkv_bias: biases on the q/k/v projections.
    norm_epsilon: epsilon of the qk-norms.
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  use_rope: bool = True
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  sliding_window: int | None = None
  causal: bool = True
  qk_norm: bool = False
  qk_norm_scope: str = "head"
  qkv_bias: bool = False
  norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, *, cache: KVCache | None = None, mask=None, head_gates=None):
    """Attend over the sequence (and the cache, if given).

    Args:
      x: [batch, length, embed].
      positions: [batch, length] int absolute positions.
      cache: optional KVCache; the new keys/values are written at `positions`, and the queries attend over the whole
        cache. Any object with `update(k, v, positions) -> cache` and `read() -> (k, v, k_positions, k_valid)`
        serves (k, v: [batch, keys, kv_heads, head_dim]; k_positions: [batch, keys]; k_valid: [batch, keys] bool or
        None); one whose `read_only` is True supplies keys/values computed elsewhere (e.g. by an earlier recursion:
        MoR's recursive KV sharing): it is only read, and no key/value projection runs.
      mask: optional extra bool mask, broadcastable to [batch, 1 or heads, length, k_length], ANDed with the
        causal/window mask; k_length = length without a cache, cache.max_length with one.
      head_gates: optional [batch, heads] multipliers of each head's output before the output projection (structured
        pruning: a 0 removes the head; APTP, `zoo.models.aptp`).

    Returns:
      (y [batch, length, embed], updated cache or None).
    """
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={kv_heads}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window={self.sliding_window} must be a positive integer or None")
    if positions.shape != x.shape[:2]:
      raise ValueError(f"positions shape {positions.shape} must be [batch, length] = {x.shape[:2]}")
    if self.qk_norm_scope not in QK_NORM_SCOPES:
      raise ValueError(f"qk_norm_scope={self.qk_norm_scope!r} is invalid; choose one of {QK_NORM_SCOPES}")
    check_rope_scaling(self.rope_scaling)

    def proj(name, heads, axes):
      return DenseGeneral(
        (heads, self.head_dim),
        kernel_axes=("embed", axes, "head_dim"),
        use_bias=self.qkv_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )(x)

    def position(y):
      return apply_rope(y, positions, theta=self.rope_theta, rope_scaling=self.rope_scaling) if self.use_rope else y

    q = proj("query", self.num_heads, "heads")
    q = position(self._qk_norm(q, "query_norm") if self.qk_norm else q)
    if getattr(cache, "read_only", False):
      k, v, k_positions, k_valid = cache.read()  # keys/values supplied by the caller: no key/value projections
    else:
      k = proj("key", kv_heads, "kv_heads")
      v = proj("value", kv_heads, "kv_heads")
      k = position(self._qk_norm(k, "key_norm") if self.qk_norm else k)
      if cache is None:
        k_positions, k_valid = positions, None
      else:
        cache = cache.update(k, v, positions)
        k, v, k_positions, k_valid = cache.read()
    full_mask = attention_mask(
      positions, k_positions, causal=self.causal, sliding_window=self.sliding_window, k_valid=k_valid
    )
    if mask is not None:
      full_mask = full_mask & mask
    out = dot_product_attention(q, k.astype(self.dtype), v.astype(self.dtype), full_mask)
    if head_gates is not None:
      out = out * head_gates.astype(out.dtype)[:, None, :, None]
    y = DenseGeneral(
      x.shape[-1],
      axis=(-2, -1),
      kernel_axes=("heads", "head_dim", "embed"),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="out",
    )(out)
    return y, cache

  def _qk_norm(self, x, name):
    """RMSNorm of x [batch, length, heads, head_dim] per head or over the flattened projection."""
    if self.qk_norm_scope == "head":
      return RMSNorm(
        self.norm_epsilon, axis_name="head_dim", dtype=self.dtype, param_dtype=self.param_dtype, name=name
      )(x)
    flat = x.reshape(*x.shape[:2], -1)
    return RMSNorm(self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(flat).reshape(x.shape)
