"""Gather-fused grouped matmul == gather + gmm, and the scatter combine, with their gradients (interpret mode)."""
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import kernels
from kernels import reference

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
    return jnp.sum(kernels.gmm_gather(x, row_ids, rhs, sizes, implementation=implementation,
                                      tiling=TILING[implementation]) * cot)

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
  plain = jax.grad(lambda y, w: jnp.sum(reference.scatter_combine_reference(y, jnp.asarray(row_ids), w, t) * cot),
                   (0, 1))
  for got, want in zip(custom(jnp.asarray(y), jnp.asarray(w)), plain(jnp.asarray(y), jnp.asarray(w))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gather_rejects_float_row_ids():
  with pytest.raises(ValueError, match="row_ids must be an integer vector"):
    kernels.gmm_gather(jnp.ones((4, 8)), jnp.zeros((6,)), jnp.ones((2, 8, 3)), jnp.array([3, 3]))
