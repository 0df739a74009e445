"""NF4 with double quantisation (zoo/layers/nf4.py; QLoRA, Dettmers et al. 2023, Sec. 3)."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from zoo.layers import nf4


def test_levels_are_the_papers_normal_quantiles():
  # Sec. 3: 2^(k-1) quantiles on the positive side, 2^(k-1) - 1 on the negative side and an exact zero, normalised to
  # [-1, 1]. The outermost quantile is taken at the mean of 1 - 1/(2*15) and 1 - 1/(2*16) (the two sides' sizes), so
  # that the extreme levels are finite.
  offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
  positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([positive, [0.0], negative]))
  np.testing.assert_allclose(nf4.NF4_LEVELS, levels / levels.max(), atol=2e-6)


def test_round_trip_within_the_nf4_step_and_scales_within_their_8bit_step():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((256, 96)) * rng.uniform(0.01, 0.1, (256, 1))).astype(np.float32)
  q = nf4.quantize(w)
  blocks = w.reshape(-1, 64)
  absmax = np.abs(blocks).max(axis=1)
  # Double-quantised scales: within half an 8-bit step of each block of 256 scales.
  scales = np.asarray(nf4.dequantize_scales(q.scale_codes, q.scale_scales, q.scale_mean))
  step = np.repeat(np.asarray(q.scale_scales), 256)[: absmax.size]
  assert np.all(np.abs(scales - absmax) <= step / 2 + 1e-7)
  assert np.abs(scales - absmax).max() > 0  # the second quantisation is lossy: the bound is not vacuous
  # Weights: within half the widest NF4 gap of the block's scale, plus the scale's own error.
  half_gap = np.diff(nf4.NF4_LEVELS).max() / 2
  err = np.abs(np.asarray(nf4.dequantize(q)) - w).reshape(-1, 64)
  bound = half_gap * absmax + np.abs(scales - absmax) + 1e-6
  assert np.all(err <= bound[:, None])
  # Each value takes the nearest level of its block (checked with the exact scales).
  index = np.stack([np.asarray(q.packed) & 0xF, np.asarray(q.packed) >> 4], -1).reshape(-1, 64)
  nearest = np.abs(blocks[..., None] / absmax[:, None, None] - nf4.NF4_LEVELS).argmin(-1)
  assert np.mean(index == nearest) > 0.999  # ties at float32 midpoints aside


def test_storage_is_4_127_bits_per_parameter():
  w = jnp.ones((64 * 256, 8), jnp.float32)
  q = nf4.quantize(w)
  bits = 8 * q.nbytes() / w.size
  # 4-bit indices, an int8 code per 64 weights, an fp32 step per 256 codes, one fp32 mean.
  assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.size, abs=1e-9)
  np.testing.assert_allclose(np.asarray(nf4.dequantize(q)), np.ones((64 * 256, 8)), atol=1e-6)


def test_a_size_that_is_not_a_multiple_of_the_block_is_refused():
  with pytest.raises(ValueError, match="multiple of the block size; got 100 values"):
    nf4.quantize(jnp.ones((10, 10)))
