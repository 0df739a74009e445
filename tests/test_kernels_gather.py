"""Gather-fused grouped matmul == gather + gmm, and the scatter combine, with their gradients (interpret mode)."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from zoo import kernels
from zoo.kernels import reference

TILING = {"interpret": (8, 16, 16), "interpret_gpu": (16, 16, 16), "xla": None}


@st.composite
def routed(draw):
  """Tokens t, routing order row_ids [m] (top-k style repeats), group sizes with empties and a short sum."""
  t = draw(st.integers(1, 12))
  m = draw(st.integers(1, 30))
  g = draw(st.integers(1, 4))
  total = draw(st.integers(0, m))
  cuts = sorted(draw(st.lists(st.integers(0, total), min_size=g - 1, max_size=g - 1)))
  sizes = np.diff([0, *cuts, total]).astype(np.int32)
  row_ids = np.asarray(draw(st.lists(st.integers(0, t - 1), min_size=m, max_size=m)), np.int32)
  return t, m, draw(st.integers(1, 40)), draw(st.integers(1, 24)), sizes, row_ids


@pytest.mark.parametrize("implementation", ["interpret", "interpret_gpu", "xla"])
@settings(max_examples=3, deadline=None)
@given(problem=routed(), seed=st.integers(0, 2**16))
def test_gmm_gather_equals_gather_then_gmm(implementation, problem, seed):
  t, m, k, n, sizes, row_ids = problem
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(t, k)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  sizes, row_ids = jnp.asarray(sizes), jnp.asarray(row_ids)

  def fused(x, rhs):
    return jnp.sum(
      kernels.gmm_gather(x, row_ids, rhs, sizes, implementation=implementation, tiling=TILING[implementation]) * cot
    )

  def unfused(x, rhs):
    return jnp.sum(reference.gmm_reference(x[row_ids], rhs, sizes) * cot)

  @jax.jit
  def run(x, rhs):
    out = kernels.gmm_gather(x, row_ids, rhs, sizes, implementation=implementation, tiling=TILING[implementation])
    return out, jax.grad(fused, (0, 1))(x, rhs)

  out, grads = run(x, rhs)
  np.testing.assert_allclose(out, kernels.gmm(x[row_ids], rhs, sizes, implementation="xla"), rtol=1e-4, atol=1e-4)
  for got, want in zip(grads, jax.grad(unfused, (0, 1))(x, rhs)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=5, deadline=None)
@given(problem=routed(), seed=st.integers(0, 2**16))
def test_scatter_combine_matches_loop_and_autodiff(problem, seed):
  t, m, _, n, _, row_ids = problem
  rng = np.random.default_rng(seed)
  y = rng.normal(size=(m, n)).astype(np.float32)
  w = rng.uniform(size=m).astype(np.float32)
  expected = np.zeros((t, n))
  for j in range(m):
    expected[row_ids[j]] += w[j] * y[j].astype(np.float64)
  out = kernels.scatter_combine(jnp.asarray(y), jnp.asarray(row_ids), jnp.asarray(w), t)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.normal(size=(t, n)), jnp.float32)
  custom = jax.grad(lambda y, w: jnp.sum(kernels.scatter_combine(y, jnp.asarray(row_ids), w, t) * cot), (0, 1))
  plain = jax.grad(
    lambda y, w: jnp.sum(reference.scatter_combine_reference(y, jnp.asarray(row_ids), w, t) * cot), (0, 1)
  )
  for got, want in zip(custom(jnp.asarray(y), jnp.asarray(w)), plain(jnp.asarray(y), jnp.asarray(w))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gather_rejects_float_row_ids():
  with pytest.raises(ValueError, match="row_ids must be an integer vector"):
    kernels.gmm_gather(jnp.ones((4, 8)), jnp.zeros((6,)), jnp.ones((2, 8, 3)), jnp.array([3, 3]))


@pytest.mark.parametrize("implementation", ["interpret", "interpret_gpu"])
@pytest.mark.parametrize("t", [7, 12])  # odd t: the Mosaic kernel pads a row so bfloat16 rows pair up
def test_gmm_gather_bfloat16(implementation, t):
  """bfloat16 rows: the Mosaic kernel fetches 32-bit row pairs and selects the row's half; values must be exact."""
  rng = np.random.default_rng(t)
  x = jnp.asarray(rng.normal(size=(t, 32)), jnp.bfloat16)
  row_ids = jnp.asarray(rng.integers(0, t, size=21), jnp.int32)
  rhs = jnp.asarray(rng.normal(size=(3, 32, 16)), jnp.bfloat16)
  sizes = jnp.array([5, 0, 13], jnp.int32)
  tiling = TILING[implementation]
  out = kernels.gmm_gather(x, row_ids, rhs, sizes, implementation=implementation, tiling=tiling)
  unfused = kernels.gmm(x[row_ids], rhs, sizes, implementation=implementation, tiling=tiling)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(unfused, np.float32))

  def loss(x, rhs):
    return jnp.sum(
      kernels.gmm_gather(x, row_ids, rhs, sizes, implementation=implementation, tiling=tiling).astype(jnp.float32) ** 2
    )

  def reference_loss(x, rhs):
    return jnp.sum(reference.gmm_reference(x[row_ids], rhs, sizes) ** 2)

  grads = jax.grad(loss, (0, 1))(x, rhs)
  wanted = jax.grad(reference_loss, (0, 1))(x.astype(jnp.float32), rhs.astype(jnp.float32))
  for got, want in zip(grads, wanted):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))
