"""Parameter counts and analytic training FLOPs."""

import flax.linen as nn
import jax
import numpy as np


def count_params(params):
  """Number of scalars in a parameter pytree (Partitioned boxes are unboxed)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params))))


def mean_attended_keys(seq_len, *, causal=True, sliding_window=None):
  """Average number of keys a query attends to in a sequence of `seq_len` tokens."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be positive")
  pos = np.arange(seq_len)
  keys = pos + 1 if causal else np.full(seq_len, seq_len)
  if sliding_window is not None:
    keys = np.minimum(keys, sliding_window)
  return float(keys.mean())


def train_flops_per_token(matmul_params, *, num_layers, attention_dim, seq_len, causal=True, sliding_window=None):
  """Training FLOPs per token: `6 N + 3 * (4 * num_layers * attention_dim * keys)`.

  Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", table 1) and Chowdhery et al. 2022 (PaLM,
  appendix B): a forward pass costs 2 FLOPs per matmul parameter plus, per layer, `2 * attention_dim * keys` for
  `q k^T` and as much for `probs v`; backward costs twice the forward. PaLM's `6N + 12 L H Q T` is
  `causal=False`; `causal=True` counts the keys a causal query really sees (on average (T+1)/2).

  Args:
    matmul_params: parameters used in matmuls per token (exclude the input embedding table, which is a lookup;
      include the output projection, tied or not).
    num_layers: attention layers.
    attention_dim: num_heads * head_dim.
    seq_len: training sequence length.
    causal: count only the keys a causal query attends to.
    sliding_window: cap on the keys per query.
  """
  keys = mean_attended_keys(seq_len, causal=causal, sliding_window=sliding_window)
  return 6.0 * matmul_params + 12.0 * num_layers * attention_dim * keys
