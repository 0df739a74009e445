"""The pre-norm decoder block: `x + Attn(Norm(x))`, then `x + FFN(Norm(x))` (Xiong et al. 2020, "On Layer
Normalization in the Transformer Architecture", pre-LN; the LLaMA/Qwen layout with RMSNorm)."""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.norms import RMSNorm


class DecoderBlock(nn.Module):
  """One decoder layer with a pluggable attention and a pluggable FFN.

  The sublayers are given as factories (e.g. `functools.partial(Attention, num_heads=8, head_dim=64)` and
  `functools.partial(MLP, hidden_dim=256)`), called inside the block as `attention_factory(name="attention")` and
  `ffn_factory(name="ffn")`, so an MoE model swaps the FFN without a new block.

  Sublayer contracts:
    attention: `__call__(x, positions, *, cache, mask) -> (y, cache)` (see `zoo.layers.Attention`).
    ffn: `__call__(x, *, deterministic, **ffn_kwargs) -> y` or `-> (y, aux)`; `aux` is any pytree (e.g. a router's
      loss and metrics) and is returned by the block unchanged (None for a plain FFN).

  Attributes:
    attention_factory: builds the attention sublayer.
    ffn_factory: builds the FFN sublayer.
    norm_epsilon: epsilon of the two pre-norms.
    dropout_rate: residual dropout on both sublayer outputs.
  """

  attention_factory: Callable[..., nn.Module]
  ffn_factory: Callable[..., nn.Module]
  norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, cache=None, mask=None, deterministic=True, ffn_kwargs=None):
    """Run the block.

    Args:
      x: [batch, length, embed].
      positions: [batch, length] int absolute positions.
      cache: the attention's KV cache or None.
      mask: optional extra bool attention mask (see `Attention`).
      deterministic: disables dropout (and is passed to the FFN).
      ffn_kwargs: optional dict of extra keyword arguments for the FFN (e.g. segment ids for a router).

    Returns:
      (x [batch, length, embed], updated cache or None, ffn aux or None).
    """
    norm = dict(epsilon=self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
    h, cache = self.attention_factory(name="attention")(
      RMSNorm(**norm, name="attention_norm")(x), positions, cache=cache, mask=mask
    )
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    out = self.ffn_factory(name="ffn")(
      RMSNorm(**norm, name="ffn_norm")(x), deterministic=deterministic, **(ffn_kwargs or {})
    )
    h, aux = out if isinstance(out, tuple) else (out, None)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache, aux
