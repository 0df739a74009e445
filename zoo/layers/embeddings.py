"""Token embedding with an optional tied output projection (Press & Wolf 2017, "Using the Output Embedding to
Improve Language Models")."""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp


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
