"""Grouped matrix multiplication (placeholder entry point: XLA ragged_dot only; Pallas kernels to follow)."""
import jax
import jax.numpy as jnp


def gmm(lhs, rhs, group_sizes, *, implementation=None, tiling=None, preferred_element_type=None):
  """out[i] = lhs[i] @ rhs[group(i)].  lhs [m, k], rhs [g, k, n], group_sizes [g] int32 -> [m, n]."""
  del implementation, tiling
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                            preferred_element_type=preferred_element_type)


def tgmm(lhs, rhs, group_sizes, *, implementation=None, tiling=None, preferred_element_type=None):
  """out[g] = lhs[:, rows of g] @ rhs[rows of g].  lhs [k, m], rhs [m, n] -> [g, k, n]."""
  del implementation, tiling
  m = rhs.shape[0]
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  rows = jnp.arange(m)
  mask = (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])  # [g, m]
  return jnp.einsum("km,gm,mn->gkn", lhs, mask.astype(lhs.dtype), rhs,
                    preferred_element_type=preferred_element_type)
