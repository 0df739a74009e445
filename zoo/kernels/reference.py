"""Pure-jnp references for the grouped matmuls (the definitions the Pallas kernels are tested against).

Grouped matmul as in MegaBlocks (Gale et al., 2022, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts",
Sec. 5.1, block-sparse / grouped GEMM for dropless MoE): rows of `lhs` are sorted by group, group `i` owning rows
`[offsets[i], offsets[i+1])` with `offsets = cumsum(group_sizes)` clamped to `m`. Rows past `sum(group_sizes)` belong
to no group and are zero in the output.
"""

import jax.numpy as jnp


def group_row_mask(group_sizes, m):
  """Which rows each group owns.

  Args:
    group_sizes: [g] int32, rows per group (sum may be smaller than m).
    m: number of rows.

  Returns:
    [g, m] bool, True where row j belongs to group i.
  """
  ends = jnp.minimum(jnp.cumsum(group_sizes), m)
  starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
  rows = jnp.arange(m)
  return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])


def gmm_reference(lhs, rhs, group_sizes, *, preferred_element_type=None):
  """out[j] = lhs[j] @ rhs[group(j)]; rows in no group are zero.

  Args:
    lhs: [m, k].
    rhs: [g, k, n].
    group_sizes: [g] int32.
    preferred_element_type: output dtype (default: the promoted input dtype).

  Returns:
    [m, n].
  """
  mask = group_row_mask(group_sizes, lhs.shape[0]).astype(lhs.dtype)
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  return jnp.einsum("mk,gm,gkn->mn", lhs, mask, rhs, preferred_element_type=jnp.float32).astype(out_dtype)


def tgmm_reference(lhs, rhs, group_sizes, *, preferred_element_type=None):
  """out[i] = lhs[:, rows of group i] @ rhs[rows of group i]; empty groups give zeros.

  Args:
    lhs: [k, m].
    rhs: [m, n].
    group_sizes: [g] int32.
    preferred_element_type: output dtype (default: the promoted input dtype).

  Returns:
    [g, k, n].
  """
  mask = group_row_mask(group_sizes, rhs.shape[0]).astype(lhs.dtype)
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  return jnp.einsum("km,gm,mn->gkn", lhs, mask, rhs, preferred_element_type=jnp.float32).astype(out_dtype)


def gmm_gather_reference(x, row_ids, rhs, group_sizes, *, preferred_element_type=None):
  """gmm over gathered rows: out[j] = x[row_ids[j]] @ rhs[group(j)].

  Args:
    x: [t, k] token activations in their original order.
    row_ids: [m] int32, the token each sorted row reads (the routing order).
    rhs: [g, k, n].
    group_sizes: [g] int32.
    preferred_element_type: output dtype.

  Returns:
    [m, n].
  """
  return gmm_reference(x[row_ids], rhs, group_sizes, preferred_element_type=preferred_element_type)


def scatter_combine_reference(y, row_ids, weights, num_tokens):
  """out[t] = sum over rows j with row_ids[j] == t of weights[j] * y[j].

  Args:
    y: [m, n] expert outputs in sorted order.
    row_ids: [m] int32 token of each row.
    weights: [m] combine weight of each row (0 for padding rows).
    num_tokens: t.

  Returns:
    [t, n] in y's dtype, accumulated in float32.
  """
  contrib = y.astype(jnp.float32) * weights.astype(jnp.float32)[:, None]
  return jnp.zeros((num_tokens, y.shape[1]), jnp.float32).at[row_ids].add(contrib).astype(y.dtype)
