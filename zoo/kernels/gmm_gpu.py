"""Grouped matmul kernels for GPU (Pallas Triton).

Method: MegaBlocks' grouped GEMM (Gale et al., 2022, Sec. 5.1). gmm launches one program per (visit, n-tile) of the
tile-visit schedule in `metadata.py`: the program loops over k with masked loads, and stores only the rows of its
group (tiles straddling a group boundary are visited once per group, with disjoint row masks, so no two programs
write the same element). tgmm launches one program per (group, k-tile, n-tile) and loops over the group's rows, so
an empty group runs zero iterations and stores exact zeros. With `row_ids` the lhs rows are loaded through the index
vector (a pointer gather), so the routed copy of the activations is never materialised.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from zoo.kernels import metadata as md


def _dot(a, b, contract_a, contract_b):
  """a . b accumulated in float32. Triton's dot takes one element type, so mixed operands (a bfloat16 lhs with a
  float32 cotangent in the backward) are promoted to the wider dtype (float32 for bfloat16 with float16), never
  demoted."""
  dtype = jnp.promote_types(a.dtype, b.dtype)
  a, b = a.astype(dtype), b.astype(dtype)
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return lax.dot_general(
    a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def _load_lhs(lhs_ref, ids_ref, row0, row_ok, k0, tk, k):
  """lhs rows [row0, row0 + tm) (or x[row_ids[...]]) at columns [k0, k0 + tk), zero where masked: [tm, tk]."""
  tm = row_ok.shape[0]
  cols = k0 + jnp.arange(tk)
  mask = row_ok[:, None] & (cols < k)[None, :]
  if ids_ref is None:
    return pltr.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)], mask=mask, other=0)
  token = pltr.load(ids_ref.at[pl.ds(row0, tm)], mask=row_ok, other=0)
  return pltr.load(lhs_ref.at[token[:, None], cols[None, :]], mask=mask, other=0)


def _split_refs(refs, gather):
  """(row_ids or None, (lhs, rhs, out)) of a kernel's refs after the schedule refs."""
  return (refs[0], refs[1:]) if gather else (None, refs)


def _call(kernel, schedule, lhs, rhs, row_ids, *, name, out_shape, grid, tiling, interpret):
  """Runs `kernel` over `grid` on (*schedule, [row_ids,] lhs, rhs), every operand and the output left in place.

  `name` ("gmm" or "tgmm") names the kernel ("_gather_triton" added with row_ids, else "_triton"); `out_shape` is a
  jax.ShapeDtypeStruct.
  """
  gather = row_ids is not None
  operands = (*schedule, *((row_ids.astype(jnp.int32),) if gather else ()), lhs, rhs)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=grid,
    in_specs=[any_spec] * len(operands),
    out_specs=any_spec,
    compiler_params=compiler_params(tiling),
    interpret=interpret,
    name=f"{name}_gather_triton" if gather else f"{name}_triton",
  )(*operands)


def compiler_params(tiling):
  """Triton launch parameters for a (tm, tk, tn) tiling: 8 warps (two warpgroups) from 128x128 output tiles.

  [guess, from compile facts only] Compiled for sm_90 by tools/compile_kernels.py, 128x64x128 tiles with 4 warps
  spill registers (255 used) in gmm; with 8 warps nothing spills, every kernel uses wgmma and 3 stages need at most
  144 KiB of shared memory (tgmm). Speed is unmeasured.
  """
  tm, _, tn = tiling
  return pltr.CompilerParams(num_warps=8 if tm * tn >= 128 * 128 else 4, num_stages=3)


def gmm(lhs, rhs, group_sizes, *, tiling, out_dtype, transpose_rhs=False, row_ids=None, interpret=False):
  """out[j] = lhs_row(j) @ rhs[group(j)] with rows in no group zero.

  Args:
    lhs: [m, k], or with row_ids the token matrix [t, k] whose rows are read through row_ids.
    rhs: [g, k, n], or [g, n, k] when transpose_rhs.
    group_sizes: [g] int32.
    tiling: (tm, tk, tn), powers of two >= 16.
    out_dtype: output dtype.
    transpose_rhs: contract with rhs[g].T.
    row_ids: optional [m] int32 row index into lhs (gather fusion).
    interpret: run the Pallas interpreter instead of Triton.

  Returns:
    [m, n].
  """
  m, k, n, g = md.gmm_dims(lhs, rhs, transpose_rhs=transpose_rhs, row_ids=row_ids)
  tm, tk, tn = tiling
  tiles_k = md.cdiv(k, tk)
  meta, visits = md.visit_schedule(group_sizes, m, tm, visit_empty_groups=False)

  def kernel(offsets_ref, gids_ref, mtiles_ref, ntiles_ref, *refs):
    ids_ref, (lhs_ref, rhs_ref, out_ref) = _split_refs(refs, row_ids is not None)
    v, n_i = pl.program_id(0), pl.program_id(1)
    gid = gids_ref[v]
    num_tiles = ntiles_ref[0]
    real = v < num_tiles
    rows = mtiles_ref[v] * tm + jnp.arange(tm)
    cols = n_i * tn + jnp.arange(tn)
    row_ok, col_ok = rows < m, cols < n

    def body(k_i, acc):
      k0 = k_i * tk
      a = _load_lhs(lhs_ref, ids_ref, mtiles_ref[v] * tm, row_ok, k0, tk, k)
      ks = k0 + jnp.arange(tk)
      if transpose_rhs:
        b = pltr.load(
          rhs_ref.at[gid, pl.ds(n_i * tn, tn), pl.ds(k0, tk)], mask=col_ok[:, None] & (ks < k)[None, :], other=0
        )
        return acc + _dot(a, b, 1, 1)
      b = pltr.load(
        rhs_ref.at[gid, pl.ds(k0, tk), pl.ds(n_i * tn, tn)], mask=(ks < k)[:, None] & col_ok[None, :], other=0
      )
      return acc + _dot(a, b, 1, 0)

    # Not jnp.where(real, tiles_k, 0): Pallas-Triton lowers its literals as i1 and the loop fails to verify.
    acc = lax.fori_loop(0, real.astype(jnp.int32) * tiles_k, body, jnp.zeros((tm, tn), jnp.float32))
    in_group = real & (rows >= offsets_ref[gid]) & (rows < offsets_ref[gid + 1])
    past_end = (v >= num_tiles - 1) & (rows >= offsets_ref[g])
    value = jnp.where(in_group[:, None], acc, 0).astype(out_dtype)
    mask = ((in_group | past_end) & row_ok)[:, None] & col_ok[None, :]
    pltr.store(out_ref.at[pl.ds(mtiles_ref[v] * tm, tm), pl.ds(n_i * tn, tn)], value, mask=mask)

  return _call(
    kernel,
    meta,
    lhs,
    rhs,
    row_ids,
    name="gmm",
    out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
    grid=(visits, md.cdiv(n, tn)),
    tiling=tiling,
    interpret=interpret,
  )


def tgmm(lhs, rhs, group_sizes, *, tiling, out_dtype, row_ids=None, interpret=False):
  """out[i] = lhs[rows of group i].T @ rhs[rows of group i]; empty groups give zeros.

  Args:
    lhs: [m, k] (row-major grouped operand), or with row_ids the token matrix [t, k] read through row_ids.
    rhs: [m, n].
    group_sizes: [g] int32.
    tiling: (tm, tk, tn), powers of two >= 16.
    out_dtype: output dtype.
    row_ids: optional [m] int32 row index into lhs (gather fusion).
    interpret: run the Pallas interpreter instead of Triton.

  Returns:
    [g, k, n].
  """
  m, k, n, g = md.tgmm_dims(lhs, rhs, group_sizes)
  tm, tk, tn = tiling
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)])

  def kernel(offsets_ref, *refs):
    ids_ref, (lhs_ref, rhs_ref, out_ref) = _split_refs(refs, row_ids is not None)
    gid, k_i, n_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets_ref[gid], offsets_ref[gid + 1]
    cols = n_i * tn + jnp.arange(tn)
    ks = k_i * tk + jnp.arange(tk)

    def body(i, acc):
      rows = start + i * tm + jnp.arange(tm)
      row_ok = rows < end
      a = _load_lhs(lhs_ref, ids_ref, start + i * tm, row_ok, k_i * tk, tk, k)
      b = pltr.load(
        rhs_ref.at[pl.ds(start + i * tm, tm), pl.ds(n_i * tn, tn)], mask=row_ok[:, None] & (cols < n)[None, :], other=0
      )
      return acc + _dot(a, b, 0, 0)

    acc = lax.fori_loop(0, (end - start + tm - 1) // tm, body, jnp.zeros((tk, tn), jnp.float32))
    pltr.store(
      out_ref.at[gid, pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)],
      acc.astype(out_dtype),
      mask=(ks < k)[:, None] & (cols < n)[None, :],
    )

  return _call(
    kernel,
    (offsets,),
    lhs,
    rhs,
    row_ids,
    name="tgmm",
    out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
    grid=(g, md.cdiv(k, tk), md.cdiv(n, tn)),
    tiling=tiling,
    interpret=interpret,
  )
