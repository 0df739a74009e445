"""Bidirectional LSTM sequence classifier: the student of LSF-IDM (papers.md F, CAN-bus intrusion detection by
distilling a BERT teacher over windows of CAN IDs into a BiLSTM) [paper; details guess].

- Token embedding (`zoo.layers.Embed`) of the CAN ID vocabulary indices.
- `num_layers` bidirectional LSTM layers (Hochreiter & Schmidhuber 1997; bidirectional as Schuster & Paliwal 1997):
  a forward `nn.RNN(nn.OptimizedLSTMCell)` over the real tokens in order and a backward one over the real tokens
  reversed (`seq_lengths` from `mask`, so padding after the real tokens is never read), their outputs concatenated
  [batch, length, 2 hidden_dim] and fed to the next layer (dropout between layers, as PyTorch's `nn.LSTM`).
- Pooling [guess]: 'final' = the forward direction's state after the last real token concatenated with the backward
  direction's state after the first token (the usual BiLSTM sentence vector, PyTorch's `h_n` of both directions);
  'mean' = the mean of the concatenated outputs over the real tokens.
- Dropout, then a linear head (with bias) to `num_classes` logits.

Guessed sizes (the paper gives none we use): embed_dim 64, hidden_dim 64, one layer.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import DenseGeneral, Embed
from zoo.models.output import ModelOutput
from zoo.models.registry import check_config, register_model

POOLINGS = ("final", "mean")


@register_model("bilstm")
class BiLSTM(nn.Module):
  """BiLSTM over tokens [batch, length] -> logits [batch, num_classes] (see the module docstring). Config keys are
  the fields below.

  Attributes:
    vocab_size: token vocabulary (CAN ID indices).
    embed_dim: token embedding width [guess 64].
    hidden_dim: LSTM width per direction [guess 64]; the pooled vector has 2 hidden_dim features.
    num_layers: stacked bidirectional layers.
    pooling: 'final' (last forward state, first backward state) | 'mean' (over the real tokens).
    num_classes: logits per example (LSF-IDM: 5, normal and four attacks).
    dropout_rate: dropout between layers and before the head (training only).
    dtype: compute dtype (name or dtype); logits are returned in float32.
    param_dtype: parameter dtype.

  `exposes` (the `zoo.models` contract): none.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  vocab_size: int = 259
  embed_dim: int = 64
  hidden_dim: int = 64
  num_layers: int = 1
  pooling: str = "final"
  num_classes: int = 5
  dropout_rate: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("vocab_size", "embed_dim", "hidden_dim", "num_layers", "num_classes"),
      intervals={"dropout_rate": "[0, 1)"},
      dtypes=("dtype", "param_dtype"),
      choices={"pooling": POOLINGS},
    )
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, *, mask=None, deterministic=True):
    """Class logits of token sequences.

    Args:
      tokens: [batch, length] int32.
      mask: [batch, length] (1 = real token, default all); the real tokens come first, padding after them.
      deterministic: no dropout when True.

    Returns:
      (logits [batch, num_classes] float32, ModelOutput with no aux loss).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    dtypes = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    real = jnp.ones(tokens.shape, bool) if mask is None else mask > 0
    lengths = jnp.sum(real, axis=1).astype(jnp.int32)  # [batch]
    x = Embed(self.vocab_size, self.embed_dim, name="embed", **dtypes)(tokens)
    for i in range(self.num_layers):
      if i:
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
      # parent=None: each cell is adopted by its RNN, so its gates live under 'forward_i/cell' / 'backward_i/cell'.
      forward = nn.RNN(nn.OptimizedLSTMCell(self.hidden_dim, parent=None, **dtypes), name=f"forward_{i}")
      backward = nn.RNN(nn.OptimizedLSTMCell(self.hidden_dim, parent=None, **dtypes), name=f"backward_{i}")
      # keep_order: the backward outputs come back in input order, so position t holds the state after reading the
      # real tokens t..length-1 from the end.
      x = jnp.concatenate(
        [forward(x, seq_lengths=lengths), backward(x, seq_lengths=lengths, reverse=True, keep_order=True)], axis=-1
      )
    x = x.astype(jnp.float32)  # [batch, length, 2 hidden]
    if self.pooling == "final":
      last = jnp.maximum(lengths - 1, 0)
      forward_last = jnp.take_along_axis(x[..., : self.hidden_dim], last[:, None, None], axis=1)[:, 0]
      pooled = jnp.concatenate([forward_last, x[:, 0, self.hidden_dim :]], axis=-1)
    else:
      weights = real.astype(jnp.float32)[..., None]
      pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
    logits = DenseGeneral(self.num_classes, kernel_axes=("embed", "vocab"), use_bias=True, name="head", **dtypes)(
      pooled.astype(dtypes["dtype"])
    )
    return logits.astype(jnp.float32), ModelOutput()

  def num_params(self):
    """Analytic parameter count: embedding `V E`; per layer and direction the four LSTM gates, each an input kernel
    (no bias), a hidden kernel and its bias, `4 (n_in H + H H + H)` with n_in = E in the first layer, 2H after; head
    `2H C + C`."""
    h = self.hidden_dim
    lstm = sum(2 * 4 * ((self.embed_dim if i == 0 else 2 * h) * h + h * h + h) for i in range(self.num_layers))
    return self.vocab_size * self.embed_dim + lstm + 2 * h * self.num_classes + self.num_classes
