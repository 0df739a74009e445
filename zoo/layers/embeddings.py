"""Token embedding with an optional tied output projection (Press & Wolf 2017, "Using the Output Embedding to
Improve Language Models"), and the fixed sine-cosine positional embeddings of the Transformer / ViT / MAE."""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class Embed(nn.Module):
  """A `[num_embeddings, features]` table (logical axes `vocab`, `embed`).

  Attributes:
    num_embeddings: vocabulary size.
    features: embedding width.
    embedding_init: default normal(0.02) [guess: the GPT-2/LLaMA convention].
  """

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=0.02)

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
      (self.num_embeddings, self.features),
      self.param_dtype,
    )

  def __call__(self, ids):
    """ids: [...] int -> [..., features] in `dtype`."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"Embed expects integer ids, got dtype {ids.dtype}")
    return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

  def attend(self, x):
    """Tied output projection: x: [..., features] -> logits [..., num_embeddings] (`x . embedding^T`)."""
    x, embedding = nn.dtypes.promote_dtype(x, self.embedding, dtype=self.dtype)
    return jnp.einsum("...e,ve->...v", x, embedding)


def sincos_1d(positions, dim):
  """[n] positions -> [n, dim] float32: `[sin(pos * w_i), cos(pos * w_i)]` with `w_i = 10000^(-i / (dim/2))`."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
  angles = np.asarray(positions, np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(grid_height, grid_width, dim):
  """The fixed 2-D positional embedding of ViT/MAE (used by DiT): [grid_height * grid_width, dim] float32, half the
  width encoding the patch row, half its column (dim divisible by 4); row-major patch order as in `patchify`."""
  rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")
  return np.concatenate([sincos_1d(rows.reshape(-1), dim // 2), sincos_1d(cols.reshape(-1), dim // 2)], axis=1)
