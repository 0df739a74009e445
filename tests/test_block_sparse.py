"""zoo.block_sparse: block-CSR packing skips zero blocks; matmul, jit and grads agree with the masked dense kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import block_sparse as bs, sparsity as sp

K, N = 64, 128


def masked(kernel, mask):
  return np.asarray(kernel) * np.asarray(sp.expand_mask(jnp.asarray(mask), kernel.shape))


def random_case(block_shape, sparsity, seed=0):
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal((K, N)).astype(np.float32)
  grid = (K // block_shape[0], N // block_shape[1])
  mask = rng.random(grid) >= sparsity
  return kernel, mask


@pytest.mark.parametrize("block_shape", [(1, 16), (16, 16), (32, 32), (8, 32)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_matmul_matches_masked_dense(block_shape, sparsity):
  kernel, mask = random_case(block_shape, sparsity)
  packed = bs.pack(kernel, mask, block_shape)
  x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
  y = bs.matmul(jnp.asarray(x), packed)
  assert y.shape == (2, 3, N)
  np.testing.assert_allclose(np.asarray(y), x @ masked(kernel, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", bs.LAYOUTS)
def test_every_layout(layout):
  kernel, mask = random_case((16, 16), 0.5)
  packed = bs.pack(kernel, mask, (16, 16))
  x = np.random.default_rng(1).standard_normal((7, K)).astype(np.float32)
  y = bs.matmul(jnp.asarray(x), packed, layout=layout)
  np.testing.assert_allclose(np.asarray(y), x @ masked(kernel, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_shape", [(1, 16), (16, 16), (32, 32)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_packs_only_nonzero_blocks(block_shape, sparsity):
  kernel, mask = random_case(block_shape, sparsity)
  packed = bs.pack(kernel, mask, block_shape)
  assert packed.nnz == mask.sum()
  stored = sum(int(np.any(np.asarray(b) != 0, axis=(2, 3)).sum()) for b in packed.blocks)
  assert stored == mask.sum()  # every nonzero block once, nothing from masked-out blocks; the rest is zero padding
  slots = sum(r.size for r in packed.rows)
  assert slots >= mask.sum()
  counts = mask.sum(0)
  assert slots <= counts.size * counts.max()  # padding never exceeds pad-everything-to-the-max
  if sparsity == 1.0:
    assert packed.blocks == ()
  np.testing.assert_allclose(np.asarray(packed.to_dense()), masked(kernel, mask))


def test_pack_without_mask_drops_zero_blocks():
  kernel, mask = random_case((16, 16), 0.7)
  dense = masked(kernel, mask)
  packed = bs.pack(dense, block_shape=(16, 16))
  assert packed.nnz == mask.sum()
  x = np.ones((4, K), np.float32)
  np.testing.assert_allclose(np.asarray(bs.matmul(jnp.asarray(x), packed)), x @ dense, rtol=1e-4, atol=1e-4)


def test_jit_and_grads_agree_with_dense():
  block_shape = (16, 16)
  kernel, mask = random_case(block_shape, 0.5)
  packed = bs.pack(kernel, mask, block_shape)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((5, K)).astype(np.float32))
  cot = jnp.asarray(np.random.default_rng(3).standard_normal((5, N)).astype(np.float32))
  y = jax.jit(bs.matmul)(x, packed)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ masked(kernel, mask), rtol=1e-4, atol=1e-4)

  def sparse_loss(x, blocks):
    p = bs.BlockSparse(packed.rows, blocks, packed.order, packed.shape, packed.block_shape, packed.nnz)
    return jnp.sum(bs.matmul(x, p) * cot)

  gx, gblocks = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)))(x, packed.blocks)
  w = jnp.asarray(masked(kernel, mask))
  dense_gx, dense_gw = jax.grad(lambda x, w: jnp.sum((x @ w) * cot), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(dense_gx), rtol=1e-4, atol=1e-4)
  # Each stored (real) block's gradient is the dense gradient's block there; padding slots are never a weight.
  dense_tiles = np.asarray(dense_gw).reshape(K // 16, 16, N // 16, 16).transpose(0, 2, 1, 3)
  order, start = np.asarray(packed.order), 0
  for rows, g in zip(packed.rows, gblocks):
    for i in range(rows.shape[0]):
      col = int(np.flatnonzero(order == start + i)[0])
      for r, row in enumerate(np.flatnonzero(mask[:, col])):
        assert int(rows[i, r]) == row
        np.testing.assert_allclose(np.asarray(g[i, r]), dense_tiles[row, col], rtol=1e-4, atol=1e-4)
    start += rows.shape[0]


@pytest.mark.parametrize("block_shape", [(3, 16), (16, 24), (0, 16), (16,)])
def test_bad_block_shape(block_shape):
  with pytest.raises(ValueError, match="does not divide"):
    bs.pack(np.zeros((K, N), np.float32), block_shape=block_shape)
