"""4-bit NormalFloat (NF4) weight quantisation with double quantisation of the block scales (QLoRA's storage format).

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (papers.md B5):
- Sec. 3, "4-bit NormalFloat": the 16 levels are quantiles of N(0, 1), 8 on the positive side and 7 on the negative
  side plus an exact zero, normalised to [-1, 1] (`NF4_LEVELS`; the construction is written out in
  `tests/test_nf4.py`). A weight block of `block_size` (64) values is scaled by its absolute maximum and every value is
  stored as the 4-bit index of the nearest level; two indices share a byte.
- Sec. 3, "Double Quantization": the fp32 block scales (one per 64 weights: 0.5 bit per parameter) are quantised
  again, 8 bits each, in blocks of `scale_block_size` (256) after subtracting their mean, with one fp32 scale per
  block of scales: 8/64 + 32/(64 * 256) = 0.127 bit per parameter. The paper stores the second level as 8-bit floats;
  here it is symmetric int8 with an absmax scale per block [guess: a simpler 8-bit code of the same size].

Dequantisation is `levels[index] * scale`, done on the fly in the matmul by the caller (QLoRA computes in bf16).
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 64  # weights per absmax scale (QLoRA's default)
SCALE_BLOCK_SIZE = 256  # block scales per second-level scale (double quantisation)
NF4_LEVELS = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)


@flax.struct.dataclass
class NF4Tensor:
  """A weight stored as NF4 with double-quantised block scales.

  packed: [n // 2] uint8, two 4-bit level indices per byte (the even element in the low nibble).
  scale_codes: [n // block_size] int8, the block scales less their mean, quantised per block of scales.
  scale_scales: [ceil(n_blocks / scale_block_size)] float32, the absmax / 127 of each block of scales.
  scale_mean: [] float32, the mean of the block scales.
  """

  packed: jnp.ndarray
  scale_codes: jnp.ndarray
  scale_scales: jnp.ndarray
  scale_mean: jnp.ndarray
  shape: tuple = flax.struct.field(pytree_node=False)
  block_size: int = flax.struct.field(pytree_node=False, default=BLOCK_SIZE)
  scale_block_size: int = flax.struct.field(pytree_node=False, default=SCALE_BLOCK_SIZE)

  def nbytes(self):
    """Bytes of the stored arrays."""
    return sum(int(a.size) * a.dtype.itemsize for a in (self.packed, self.scale_codes, self.scale_scales)) + 4


def _blocks(x, size):
  """x: [n] -> [ceil(n / size), size], zero-padded."""
  pad = -x.shape[0] % size
  return jnp.pad(x, (0, pad)).reshape(-1, size)


def quantize_scales(scales, scale_block_size=SCALE_BLOCK_SIZE):
  """Double quantisation: scales [m] float32 -> (codes [m] int8, per-block scales float32, mean [] float32)."""
  mean = jnp.mean(scales)
  blocks = _blocks(scales - mean, scale_block_size)
  step = jnp.max(jnp.abs(blocks), axis=1) / 127.0
  codes = jnp.round(blocks / jnp.where(step > 0, step, 1.0)[:, None]).astype(jnp.int8)
  return codes.reshape(-1)[: scales.shape[0]], step.astype(jnp.float32), mean.astype(jnp.float32)


def dequantize_scales(codes, steps, mean, scale_block_size=SCALE_BLOCK_SIZE):
  """The block scales [m] float32 from their int8 codes."""
  blocks = _blocks(codes.astype(jnp.float32), scale_block_size) * steps[:, None]
  return blocks.reshape(-1)[: codes.shape[0]] + mean


def quantize(w, block_size=BLOCK_SIZE, scale_block_size=SCALE_BLOCK_SIZE):
  """w: any shape, float, with w.size divisible by block_size (even) -> NF4Tensor."""
  flat = jnp.asarray(w, jnp.float32).reshape(-1)
  if flat.shape[0] % block_size or block_size % 2:
    raise ValueError(
      f"NF4 needs a weight whose size is a multiple of the block size; got {flat.shape[0]} values and "
      f"block_size={block_size} (even)"
    )
  blocks = flat.reshape(-1, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  # The nearest level: the levels are sorted, so count the midpoints below each value.
  midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
  index = jnp.searchsorted(jnp.asarray(midpoints), normed.reshape(-1), side="left").astype(jnp.uint8)
  packed = index[0::2] | (index[1::2] << 4)
  codes, steps, mean = quantize_scales(absmax, scale_block_size)
  return NF4Tensor(packed, codes, steps, mean, tuple(np.shape(w)), block_size, scale_block_size)


def dequantize(q, dtype=jnp.float32):
  """NF4Tensor -> the weight [q.shape] in dtype (levels x double-dequantised block scales)."""
  index = jnp.stack([q.packed & 0xF, q.packed >> 4], axis=-1).reshape(-1)
  values = jnp.asarray(NF4_LEVELS)[index].reshape(-1, q.block_size)
  scales = dequantize_scales(q.scale_codes, q.scale_scales, q.scale_mean, q.scale_block_size)
  return (values * scales[:, None]).reshape(q.shape).astype(dtype)


def dense_shapes(tree):
  """`tree` with every NF4Tensor (arrays or ShapeDtypeStructs) replaced by a float32 ShapeDtypeStruct of the weight it
  stores: the layout a checkpoint or a Hugging Face directory of the unquantised model has."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32) if isinstance(x, NF4Tensor) else x,
    tree,
    is_leaf=lambda x: isinstance(x, NF4Tensor),
  )


def nbytes(tree):
  """Bytes of the arrays of `tree`, NF4Tensors counted as stored (packed indices and double-quantised scales)."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NF4Tensor))
  return sum(x.nbytes() if isinstance(x, NF4Tensor) else int(x.size) * x.dtype.itemsize for x in leaves)
