"""Block-sparse matmul that skips zero blocks (papers.md E "SparseByteNN": real speed from block sparsity).

`pack(kernel, mask, block_shape=(bk, bn))` compresses a dense kernel W [K, N] with a block mask [K/bk, N/bn] (as kept by
`zoo.sparsity`, blocks over the kernel's trailing dims) into block-CSR over output block columns; `matmul(x, packed)`
computes `x @ (W * expand_mask(mask))` for x [..., K] touching only the nonzero blocks.

Format (block-CSR, grouped by count): output block column j holds the list of its nonzero input block rows. Columns are
sorted by that count and cut into buckets; inside a bucket every column is padded to the bucket's largest count with
a zero block (row 0), so each bucket is one gather + one batched einsum with static shapes. Empty columns are not
stored at all; a final gather puts the bucket outputs back in column order (empty columns read a zero column).

Layouts tried on XLA:CPU (2 cores; bench/block_sparse.py, bench/RESULTS.md): gathering x [M, Kb, bk] on its block axis
then `einsum('mjrk,jrkn->mjn')` ("gather_m"); gathering x^T [Kb, bk, M] (contiguous rows) then
`einsum('jrkm,jrkn->mjn')` ("gather_t"); the latter under `lax.map` over chunks of 8 columns ("map"); and a
`lax.map` loop over single columns, each one 2-D GEMM blocks^T [bn, R*bk] @ gathered x^T [R*bk, M] ("loop"). At
512 tokens, 90% sparsity, the speed-ups over dense were 0.5-1.1x (gather_m, gather_t), 0.9-2.2x (map) and 1.3-1.9x
(loop); batched einsums over many small blocks are slow on XLA:CPU and materialize the whole gathered x, the loop
keeps one column's slab in cache. Also tried: the loop with [M, bn] outputs (slower for bn <= 32) and two
independent loops to use both cores (no change). `LAYOUT` ("loop") is the fastest; the others stay selectable.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("gather_m", "gather_t", "map", "loop")
LAYOUT = "loop"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparse:
  """Packed block-sparse kernel. Per bucket b: rows[b] int32 [nj, R] (input block rows, padding -> row 0),
  blocks[b] [nj, R, bk, bn] (padding blocks are zero); order int32 [N/bn]: for each output block column its index in
  the concatenated bucket outputs (empty columns -> the trailing zero column). Static: shape (K, N), block_shape,
  nnz (number of nonzero blocks stored, padding excluded)."""

  rows: tuple
  blocks: tuple
  order: jax.Array
  shape: tuple = dataclasses.field(metadata={"static": True})
  block_shape: tuple = dataclasses.field(metadata={"static": True})
  nnz: int = dataclasses.field(metadata={"static": True})

  def to_dense(self):
    """W * expanded mask [K, N] rebuilt from the packed blocks (a reference; not used by `matmul`)."""
    (k, n), (bk, bn) = self.shape, self.block_shape
    dense = jnp.zeros((k // bk, n // bn, bk, bn), self.blocks[0].dtype if self.blocks else jnp.float32)
    order = np.asarray(self.order)
    inverse = {int(p): j for j, p in enumerate(order)}
    start = 0
    for rows, blocks in zip(self.rows, self.blocks):
      nj, r = rows.shape
      cols = np.array([inverse[start + i] for i in range(nj)], np.int64)
      start += nj
      dense = dense.at[rows, np.repeat(cols[:, None], r, 1)].add(blocks)
    return dense.transpose(0, 2, 1, 3).reshape(k, n)


def _check(shape, block_shape):
  if len(shape) != 2 or len(block_shape) != 2 or any(b <= 0 or d % b for d, b in zip(shape, block_shape)):
    raise ValueError(
      f"block_sparse: block_shape {tuple(block_shape)} does not divide kernel shape {tuple(shape)}; allowed: two "
      "positive block sizes (bk, bn) dividing a 2-D kernel [K, N]"
    )


def _buckets(counts, n_buckets):
  """Split columns sorted by count into at most `n_buckets` runs, each padded to its max; greedy on padding waste."""
  order = np.argsort(counts, kind="stable")
  order = order[counts[order] > 0]
  if order.size == 0:
    return []
  sorted_counts = counts[order]
  distinct = np.unique(sorted_counts)
  if distinct.size > n_buckets:  # cap values: quantiles of the distinct counts, always including the max
    distinct = np.unique(np.concatenate([distinct[np.linspace(0, distinct.size - 1, n_buckets).round().astype(int)]]))
  groups, lo = [], 0
  for cap in distinct:
    hi = int(np.searchsorted(sorted_counts, cap, side="right"))
    if hi > lo:
      groups.append((order[lo:hi], int(cap)))
    lo = hi
  return groups


def pack(kernel, mask=None, block_shape=(16, 16), n_buckets: int = 8) -> BlockSparse:
  """Block-CSR of kernel [K, N] (concrete, outside jit) under block mask [K/bk, N/bn] (None: the all-zero blocks of
  the kernel are dropped). Blocks where mask is False are never stored, whatever their values."""
  kernel = np.asarray(kernel)
  block_shape = tuple(int(b) for b in block_shape)
  _check(kernel.shape, block_shape)
  (k, n), (bk, bn) = kernel.shape, block_shape
  kb, nb = k // bk, n // bn
  tiles = kernel.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)  # [Kb, Nb, bk, bn]
  if mask is None:
    mask = np.any(tiles != 0, axis=(2, 3))
  mask = np.asarray(mask).astype(bool)
  if mask.shape != (kb, nb):
    raise ValueError(f"block_sparse: mask shape {mask.shape} does not match the block grid {(kb, nb)} of {(k, n)}")
  counts = mask.sum(0)
  order = np.full(nb, 0, np.int32)
  rows_out, blocks_out, start = [], [], 0
  for cols, cap in _buckets(counts, n_buckets):
    rows = np.zeros((cols.size, cap), np.int32)
    blocks = np.zeros((cols.size, cap, bk, bn), kernel.dtype)
    for i, j in enumerate(cols):
      nz = np.flatnonzero(mask[:, j])
      rows[i, : nz.size] = nz
      blocks[i, : nz.size] = tiles[nz, j]
    order[cols] = start + np.arange(cols.size)
    start += cols.size
    rows_out.append(jnp.asarray(rows))
    blocks_out.append(jnp.asarray(blocks))
  order[counts == 0] = start  # the zero column appended after the buckets
  return BlockSparse(tuple(rows_out), tuple(blocks_out), jnp.asarray(order), (k, n), block_shape, int(mask.sum()))


def _bucket(xb, xt, rows, blocks, layout, chunk):
  """One bucket: [M, nj, bn] from x blocks xb [M, Kb, bk] or x^T blocks xt [Kb, bk, M]."""
  if layout == "gather_m":
    return jnp.einsum("mjrk,jrkn->mjn", xb[:, rows], blocks)
  if layout == "gather_t":
    return jnp.einsum("jrkm,jrkn->mjn", xt[rows], blocks)
  nj, r = rows.shape
  if layout == "loop":
    bk, bn, m = blocks.shape[2], blocks.shape[3], xt.shape[2]
    step = lambda rb: jnp.dot(rb[1].reshape(r * bk, bn).T, xt[rb[0]].reshape(r * bk, m))
    return jax.lax.map(step, (rows, blocks)).transpose(2, 0, 1)  # [nj, bn, M] -> [M, nj, bn]
  size = max(1, min(nj, chunk))
  y = jax.lax.map(lambda rb: jnp.einsum("rkm,rkn->mn", xt[rb[0]], rb[1]), (rows, blocks), batch_size=size)
  return y.transpose(1, 0, 2)


def matmul(x, packed: BlockSparse, layout: str = LAYOUT, chunk: int = 8):
  """x [..., K] @ (W * mask) -> [..., N], skipping zero blocks (gathers + batched einsum per count bucket)."""
  if layout not in LAYOUTS:
    raise ValueError(f"block_sparse: layout {layout!r}; allowed: {LAYOUTS}")
  (k, n), (bk, bn) = packed.shape, packed.block_shape
  if x.shape[-1] != k:
    raise ValueError(f"block_sparse: x has {x.shape[-1]} features, the kernel expects {k}")
  batch = x.shape[:-1]
  m = math.prod(batch)
  dtype = jnp.result_type(x.dtype, *(b.dtype for b in packed.blocks)) if packed.blocks else x.dtype
  x2 = x.reshape(m, k // bk, bk)
  xt = x2.transpose(1, 2, 0) if layout != "gather_m" else None
  outs = [_bucket(x2, xt, r, b, layout, chunk).astype(dtype) for r, b in zip(packed.rows, packed.blocks)]
  outs.append(jnp.zeros((m, 1, bn), dtype))
  y = jnp.concatenate(outs, axis=1)[:, packed.order]  # [M, Nb, bn] in column order
  return y.reshape(*batch, n)
