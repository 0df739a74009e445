"""Grouped matmul kernels for TPU (Pallas Mosaic).

Method: MegaBlocks' grouped GEMM (Gale et al., 2022, Sec. 5.1) with the TPU tile-visit schedule of `metadata.py`.
gmm runs the grid (n-tiles, visits, k-tiles) with k innermost: an f32 accumulator in VMEM, and at the last k-tile
the rows of the visit's group are written into the output tile (which stays in VMEM while consecutive visits hit the
same m-tile). tgmm runs (k-tiles, n-tiles, visits): consecutive visits of one group accumulate, the group's output
tile is written when the group changes. The gather variant reads `x[row_ids]` rows straight from HBM by one DMA per
row, so the routed copy of the activations is never materialised. Mosaic cannot DMA one row of a 16-bit array (two
rows share each 32-bit word of the TPU layout), so bfloat16 rows are fetched as the 32-bit words of their row pair
and the row's half is picked in VMEM (twice the bytes of the row, still no copy).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from zoo.kernels import metadata as md


def _k_mask(k_i, tk, k, shape, axis):
  """True for entries of the k-tile that lie inside [0, k)."""
  return lax.broadcasted_iota(jnp.int32, shape, axis) + k_i * tk < k


def _gather_rows(x_hbm, row_ids_ref, parity_ref, buf, sem, tile_start, k0, tm, tk):
  """x[row_ids[tile_start + r], k0:k0+tk] for r < tm, fetched by one DMA per row into buf: [tm, tk].

  With `parity_ref` ([tm, 1] int32, row_id & 1) x is bfloat16: each DMA fetches the 32-bit words of the row pair
  (2i, 2i + 1) holding the row (buf is int32), and the row's 16 bits are selected (low half: even row).
  """
  packed = parity_ref is not None
  source = x_hbm.bitcast(jnp.int32) if packed else x_hbm  # packed: [t / 2, k] words of row pairs

  def start(r, carry):
    row = row_ids_ref[tile_start + r]
    if packed:
      row = lax.shift_right_logical(row, 1)  # not `// 2`: Mosaic lowers integer floor division per chip
    pltpu.make_async_copy(source.at[pl.ds(row, 1), pl.ds(k0, tk)], buf.at[pl.ds(r, 1)], sem).start()
    return carry

  def wait(r, carry):
    pltpu.make_async_copy(source.at[pl.ds(0, 1), pl.ds(k0, tk)], buf.at[pl.ds(r, 1)], sem).wait()
    return carry

  lax.fori_loop(0, tm, start, 0)
  lax.fori_loop(0, tm, wait, 0)
  if not packed:
    return buf[...]
  words = buf[...]
  half = jnp.where(parity_ref[...] == 1, lax.shift_right_logical(words, 16), words & 0xFFFF)
  # A bfloat16 is the upper half of the float32 with the same value, so this conversion is exact.
  return lax.bitcast_convert_type(lax.shift_left(half, 16), jnp.float32).astype(jnp.bfloat16)


def _lhs_inputs(lhs, row_ids, lhs_spec, rhs_spec, rhs, padded_rows, acc_shape, tiling):
  """(in_specs, operands, scratch_shapes) of a kernel whose grouped operand is `lhs` tiled by `lhs_spec`, or, with
  `row_ids` (gather fusion), `lhs` left in HBM and read row by row through the SMEM-prefetched ids (padded to
  `padded_rows`) into a VMEM buffer by DMA; bfloat16 adds the ids' parity, tiled like `lhs_spec`'s rows. The first
  scratch is the float32 accumulator of `acc_shape`.

  Operand order: gather (ids, x, rhs[, parity]), otherwise (lhs, rhs).
  """
  tm, tk, _ = tiling
  acc = pltpu.VMEM(acc_shape, jnp.float32)
  if row_ids is None:
    return [lhs_spec, rhs_spec], (lhs, rhs), [acc]
  if lhs.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"the Mosaic gather kernels take float32 or bfloat16 rows, got {lhs.dtype}")
  padded_ids = jnp.pad(row_ids.astype(jnp.int32), (0, padded_rows - row_ids.shape[0]))
  in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM), pl.BlockSpec(memory_space=pl.ANY), rhs_spec]
  if lhs.dtype == jnp.float32:
    return in_specs, (padded_ids, lhs, rhs), [acc, pltpu.VMEM((tm, tk), lhs.dtype), pltpu.SemaphoreType.DMA]
  if lhs.shape[0] % 2:  # row pairs need an even row count
    lhs = jnp.pad(lhs, ((0, 1), (0, 0)))
  parity_spec = pl.BlockSpec((tm, 1), lambda *grid_and_prefetch: (lhs_spec.index_map(*grid_and_prefetch)[0], 0))
  return (
    in_specs + [parity_spec],
    (padded_ids, lhs, rhs, (padded_ids & 1).reshape(-1, 1)),
    [acc, pltpu.VMEM((tm, tk), jnp.int32), pltpu.SemaphoreType.DMA],
  )


def _call(kernel, name, grid, dimension_semantics, specs, out_shape, meta, operands, tiling, interpret):
  """Runs `kernel` over `grid` with the schedule `meta` prefetched to SMEM.

  Args:
    kernel: the kernel body; `name` ("gmm" or "tgmm") names it, with "_gather" added under gather fusion.
    grid, dimension_semantics: the three grid axes and their Mosaic semantics.
    specs: BlockSpecs (lhs, rhs, out); the float32 accumulator is one output tile.
    out_shape: jax.ShapeDtypeStruct of the output.
    meta: md.GroupMetadata.
    operands: (lhs, rhs, row_ids), row_ids None without gather fusion (see `_lhs_inputs`).
    tiling, interpret: as in gmm.
  """
  lhs, rhs, row_ids = operands
  lhs_spec, rhs_spec, out_spec = specs
  tm, tk, _ = tiling
  if row_ids is not None and lhs.shape[1] % tk:
    raise ValueError(f"gather-fused {name} needs k ({lhs.shape[1]}) divisible by tk ({tk})")
  padded_rows = None if row_ids is None else md.cdiv(row_ids.shape[0], tm) * tm
  acc_shape = out_spec.block_shape[-2:]
  in_specs, operands, scratch = _lhs_inputs(lhs, row_ids, lhs_spec, rhs_spec, rhs, padded_rows, acc_shape, tiling)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=4, grid=grid, in_specs=in_specs, out_specs=out_spec, scratch_shapes=scratch
  )
  call = pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid_spec=grid_spec,
    compiler_params=pltpu.CompilerParams(dimension_semantics=dimension_semantics),
    interpret=interpret,
    name=name if row_ids is None else f"{name}_gather",
  )
  return call(*meta, *operands)


class _Refs(NamedTuple):
  """A kernel's refs after the four schedule refs; row_ids, parity, buf and sem are None where absent."""

  row_ids: Any
  lhs: Any
  rhs: Any
  parity: Any
  out: Any
  acc: Any
  buf: Any
  sem: Any


def _unpack_refs(refs):
  """Splits a kernel's refs (in the order of `_lhs_inputs` then output and scratch) into `_Refs`."""
  if len(refs) == 4:  # no gather fusion: lhs, rhs, out, acc
    lhs_ref, rhs_ref, out_ref, acc_ref = refs
    return _Refs(None, lhs_ref, rhs_ref, None, out_ref, acc_ref, None, None)
  if len(refs) == 7:  # float32 gather: ids, x, rhs, out, acc, buf, sem (bfloat16 adds the parity after rhs)
    row_ids_ref, x_hbm, rhs_ref, out_ref, acc_ref, buf, sem = refs
    return _Refs(row_ids_ref, x_hbm, rhs_ref, None, out_ref, acc_ref, buf, sem)
  return _Refs(*refs)


def _lhs_tile(r, row0, k_i, tm, tk):
  """The grouped operand's tile [tm, tk]: its block, or with row_ids the rows of ids [row0, row0 + tm) at k-tile k_i."""
  if r.row_ids is None:
    return r.lhs[...]
  return _gather_rows(r.lhs, r.row_ids, r.parity, r.buf, r.sem, row0, k_i * tk, tm, tk)


def gmm(lhs, rhs, group_sizes, *, tiling, out_dtype, transpose_rhs=False, row_ids=None, interpret=False):
  """out[j] = lhs_row(j) @ rhs[group(j)] with rows in no group zero.

  Args:
    lhs: [m, k], or with row_ids the token matrix [t, k] whose rows are read through row_ids.
    rhs: [g, k, n], or [g, n, k] when transpose_rhs.
    group_sizes: [g] int32.
    tiling: (tm, tk, tn); tk and tn multiples of 128 or the full dimension, tm a multiple of 8.
    out_dtype: output dtype.
    transpose_rhs: contract with rhs[g].T.
    row_ids: optional [m] int32 row index into lhs (gather fusion); needs k % tk == 0 and float32 or bfloat16.
    interpret: run the Pallas interpreter instead of Mosaic.

  Returns:
    [m, n].
  """
  m, k, n, g = md.gmm_dims(lhs, rhs, transpose_rhs=transpose_rhs, row_ids=row_ids)
  tm, tk, tn = tiling
  tiles_k, tiles_n = md.cdiv(k, tk), md.cdiv(n, tn)
  meta, visits = md.visit_schedule(group_sizes, m, tm, visit_empty_groups=False)

  def kernel(offsets_ref, gids_ref, mtiles_ref, ntiles_ref, *refs):
    r = _unpack_refs(refs)
    v, k_i = pl.program_id(1), pl.program_id(2)
    gid = gids_ref[v]
    real = v < ntiles_ref[0]

    @pl.when(k_i == 0)
    def _():
      r.acc[...] = jnp.zeros_like(r.acc)

    @pl.when(real)
    def _():
      a = _lhs_tile(r, mtiles_ref[v] * tm, k_i, tm, tk)
      b = r.rhs[0]
      if k % tk:
        a = jnp.where(_k_mask(k_i, tk, k, a.shape, 1), a, 0)
        b = jnp.where(_k_mask(k_i, tk, k, b.shape, 1 if transpose_rhs else 0), b, 0)
      contract = (1,) if transpose_rhs else (0,)
      r.acc[...] += lax.dot_general(a, b, (((1,), contract), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(k_i == tiles_k - 1)
    def _():
      rows = mtiles_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      in_group = real & (rows >= offsets_ref[gid]) & (rows < offsets_ref[gid + 1])
      past_end = (v >= ntiles_ref[0] - 1) & (rows >= offsets_ref[g])
      r.out[...] = jnp.where(
        in_group, r.acc[...].astype(out_dtype), jnp.where(past_end, jnp.zeros((), out_dtype), r.out[...])
      )

  if transpose_rhs:
    rhs_spec = pl.BlockSpec((1, tn, tk), lambda n_i, v, k_i, off, gids, mt, nt: (gids[v], n_i, k_i))
  else:
    rhs_spec = pl.BlockSpec((1, tk, tn), lambda n_i, v, k_i, off, gids, mt, nt: (gids[v], k_i, n_i))
  lhs_spec = pl.BlockSpec((tm, tk), lambda n_i, v, k_i, off, gids, mt, nt: (mt[v], k_i))
  out_spec = pl.BlockSpec((tm, tn), lambda n_i, v, k_i, off, gids, mt, nt: (mt[v], n_i))
  grid, semantics = (tiles_n, visits, tiles_k), ("parallel", "arbitrary", "arbitrary")
  out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
  specs, operands = (lhs_spec, rhs_spec, out_spec), (lhs, rhs, row_ids)
  return _call(kernel, "gmm", grid, semantics, specs, out_shape, meta, operands, tiling, interpret)


def tgmm(lhs, rhs, group_sizes, *, tiling, out_dtype, row_ids=None, interpret=False):
  """out[i] = lhs[rows of group i].T @ rhs[rows of group i]; empty groups give zeros.

  The grouped operand is taken row-major (`[m, k]`, the layout the backward pass already holds); the public
  `tgmm(lhs[k, m], ...)` passes `lhs.T`.

  Args:
    lhs: [m, k], or with row_ids the token matrix [t, k] read through row_ids.
    rhs: [m, n].
    group_sizes: [g] int32.
    tiling: (tm, tk, tn); tm and tn multiples of 128 or the full dimension, tk a multiple of 128 or full.
    out_dtype: output dtype.
    row_ids: optional [m] int32 row index into lhs (gather fusion); needs k % tk == 0 and float32 or bfloat16.
    interpret: run the Pallas interpreter instead of Mosaic.

  Returns:
    [g, k, n].
  """
  m, k, n, g = md.tgmm_dims(lhs, rhs, group_sizes)
  tm, tk, tn = tiling
  meta, visits = md.visit_schedule(group_sizes, m, tm, visit_empty_groups=True)

  def kernel(offsets_ref, gids_ref, mtiles_ref, ntiles_ref, *refs):
    r = _unpack_refs(refs)
    k_i, v = pl.program_id(0), pl.program_id(2)
    gid = gids_ref[v]
    num_tiles = ntiles_ref[0]
    real = v < num_tiles
    first = (v == 0) | (gids_ref[jnp.maximum(v - 1, 0)] != gid)
    last = (v == num_tiles - 1) | (gids_ref[jnp.minimum(v + 1, visits - 1)] != gid)

    @pl.when(real & first)
    def _():
      r.acc[...] = jnp.zeros_like(r.acc)

    @pl.when(real)
    def _():
      a = _lhs_tile(r, mtiles_ref[v] * tm, k_i, tm, tk)
      b = r.rhs[...]
      rows_a = mtiles_ref[v] * tm + lax.broadcasted_iota(jnp.int32, a.shape, 0)
      rows_b = mtiles_ref[v] * tm + lax.broadcasted_iota(jnp.int32, b.shape, 0)
      start, end = offsets_ref[gid], offsets_ref[gid + 1]
      a_mask = (rows_a >= start) & (rows_a < end)
      if k % tk:
        a_mask &= _k_mask(k_i, tk, k, a.shape, 1)
      a = jnp.where(a_mask, a, 0)
      b = jnp.where((rows_b >= start) & (rows_b < end), b, 0)
      r.acc[...] += lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(real & last)
    def _():
      r.out[0] = r.acc[...].astype(out_dtype)

  lhs_spec = pl.BlockSpec((tm, tk), lambda k_i, n_i, v, off, gids, mt, nt: (mt[v], k_i))
  rhs_spec = pl.BlockSpec((tm, tn), lambda k_i, n_i, v, off, gids, mt, nt: (mt[v], n_i))
  out_spec = pl.BlockSpec((1, tk, tn), lambda k_i, n_i, v, off, gids, mt, nt: (gids[v], k_i, n_i))
  grid, semantics = (md.cdiv(k, tk), md.cdiv(n, tn), visits), ("parallel", "parallel", "arbitrary")
  specs, operands = (lhs_spec, rhs_spec, out_spec), (lhs, rhs, row_ids)
  out_shape = jax.ShapeDtypeStruct((g, k, n), out_dtype)
  return _call(kernel, "tgmm", grid, semantics, specs, out_shape, meta, operands, tiling, interpret)
