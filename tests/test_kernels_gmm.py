"""Grouped matmul kernels (interpret mode on CPU) against a float64 numpy reference and jax.lax.ragged_dot."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from zoo import kernels

TILING = {"interpret": (8, 16, 16), "interpret_gpu": (16, 16, 16), "xla": None}


def np_gmm(lhs, rhs, sizes):
  """float64 reference: out[j] = lhs[j] @ rhs[group(j)], rows past sum(sizes) zero."""
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for i, size in enumerate(sizes):
    out[start : start + size] = lhs[start : start + size] @ rhs[i]
    start += size
  return out


def np_tgmm(lhs_t, rhs, sizes):
  """float64 reference: out[i] = lhs_t[:, rows of i] @ rhs[rows of i]."""
  out = np.zeros((len(sizes), lhs_t.shape[0], rhs.shape[1]))
  start = 0
  for i, size in enumerate(sizes):
    out[i] = lhs_t[:, start : start + size] @ rhs[start : start + size]
    start += size
  return out


@st.composite
def problems(draw):
  """(m, k, n, group sizes): sums below m, empty groups, and skewed splits all occur."""
  g = draw(st.integers(1, 4))
  m = draw(st.integers(1, 40))
  total = draw(st.integers(0, m))
  cuts = sorted(draw(st.lists(st.integers(0, total), min_size=g - 1, max_size=g - 1)))
  sizes = np.diff([0, *cuts, total]).astype(np.int32)
  return m, draw(st.integers(1, 40)), draw(st.integers(1, 40)), sizes


def _inputs(seed, m, k, n, g, dtype):
  rng = np.random.default_rng(seed)
  cast = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)
  lhs, rhs, cot = (cast(rng.normal(size=s)) for s in ((m, k), (g, k, n), (m, n)))
  return lhs, rhs, cot


def _close(actual, expected, dtype):
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("implementation", ["interpret", "interpret_gpu", "xla"])
@settings(max_examples=3, deadline=None)
@given(problem=problems(), seed=st.integers(0, 2**16))
def test_gmm_forward_and_gradients(implementation, dtype, problem, seed):
  m, k, n, sizes = problem
  lhs, rhs, cot = _inputs(seed, m, k, n, len(sizes), dtype)

  @jax.jit
  def run(lhs, rhs, group_sizes, cot):
    def loss(lhs, rhs):
      out = kernels.gmm(lhs, rhs, group_sizes, implementation=implementation, tiling=TILING[implementation])
      return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(lhs, rhs)
    return out, *grads

  args = (jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype), jnp.asarray(sizes), jnp.asarray(cot, jnp.float32))
  out, dlhs, drhs = run(*args)
  assert out.dtype == dtype and dlhs.dtype == dtype and drhs.dtype == dtype
  expected = np_gmm(lhs, rhs, sizes)
  _close(out, expected, dtype)
  _close(out, jax.lax.ragged_dot(*args[:3]), dtype)
  total = int(sizes.sum())
  assert np.all(np.asarray(out[total:]) == 0), "rows past sum(group_sizes) must be zero"
  cot_rows = np.where(np.arange(m)[:, None] < total, cot, 0)
  expected_dlhs = np_gmm(cot_rows, rhs.transpose(0, 2, 1), sizes)
  _close(dlhs, expected_dlhs, dtype)
  _close(drhs, np_tgmm(lhs.T, cot, sizes), dtype)
  assert np.all(np.asarray(drhs[sizes == 0]) == 0), "empty groups must get exactly zero drhs"


@pytest.mark.parametrize("implementation", ["interpret", "interpret_gpu", "xla"])
@settings(max_examples=3, deadline=None)
@given(problem=problems(), seed=st.integers(0, 2**16))
def test_tgmm(implementation, problem, seed):
  m, k, n, sizes = problem
  lhs, _, rhs = _inputs(seed, m, k, n, len(sizes), jnp.float32)
  out = kernels.tgmm(
    jnp.asarray(lhs.T, jnp.float32),
    jnp.asarray(rhs, jnp.float32),
    jnp.asarray(sizes),
    implementation=implementation,
    tiling=TILING[implementation],
  )
  assert out.shape == (len(sizes), k, n)
  _close(out, np_tgmm(lhs.T, rhs, sizes), jnp.float32)
  assert np.all(np.asarray(out[sizes == 0]) == 0)


def test_preferred_element_type_accumulates_bf16_into_f32():
  lhs = jnp.ones((24, 40), jnp.bfloat16)
  rhs = jnp.full((2, 40, 16), 1 + 2**-7, jnp.bfloat16)
  sizes = jnp.array([10, 8], jnp.int32)
  out = kernels.gmm(lhs, rhs, sizes, implementation="interpret", tiling=(8, 16, 16), preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out[:18]), 40 * (1 + 2**-7), rtol=1e-6)
  assert np.all(np.asarray(out[18:]) == 0)


def test_bad_inputs_raise_clear_errors():
  lhs, rhs, sizes = jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.array([4, 4], jnp.int32)
  with pytest.raises(ValueError, match="implementation='cuda' is not one of"):
    kernels.gmm(lhs, rhs, sizes, implementation="cuda")
  with pytest.raises(ValueError, match="contracting dims differ"):
    kernels.gmm(lhs, jnp.ones((2, 5, 3)), sizes)
  with pytest.raises(ValueError, match=r"group_sizes must be an integer vector \[g=2\]"):
    kernels.gmm(lhs, rhs, jnp.array([4.0, 4.0]))
  with pytest.raises(ValueError, match="powers of two"):
    kernels.gmm(lhs, rhs, sizes, implementation="interpret_gpu", tiling=(24, 16, 16))
  with pytest.raises(ValueError, match="multiples of 128"):
    kernels.gmm(jnp.ones((256, 300)), jnp.ones((2, 300, 8)), sizes, implementation="pallas_tpu", tiling=(128, 200, 128))


def test_automatic_choice_falls_back_to_xla_and_logs_once(monkeypatch, caplog):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert kernels.choose_implementation(None, jnp.bfloat16) == "pallas_tpu"
  with caplog.at_level("WARNING", logger="zoo.kernels.gmm"):
    assert kernels.choose_implementation(None, jnp.int8, jnp.int8) == "xla"
    assert kernels.choose_implementation(None, jnp.int8, jnp.int8) == "xla"
  assert [r.getMessage() for r in caplog.records].count(
    "zoo.kernels.gmm: using implementation='xla' because dtype int8 is not supported by the Pallas kernels "
    "(allowed: float32, bfloat16, float16)"
  ) == 1
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert kernels.choose_implementation(None, jnp.float32) == "pallas_gpu"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert kernels.choose_implementation(None, jnp.float32) == "xla"


def test_default_implementation_replaces_the_backend_choice(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  with kernels.default_implementation("pallas_tpu"):
    assert kernels.choose_implementation(None, jnp.bfloat16) == "pallas_tpu"
    assert kernels.choose_implementation("xla", jnp.bfloat16) == "xla"  # an explicit choice still wins
  assert kernels.choose_implementation(None, jnp.bfloat16) == "xla"
  with pytest.raises(ValueError, match="is not one of"):
    with kernels.default_implementation("mosaic"):
      pass


def test_float16_gather_on_mosaic_gathers_first(caplog):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 16)), jnp.float16)
  rhs = jnp.ones((2, 16, 16), jnp.float16)
  row_ids, sizes = jnp.array([5, 0, 3, 3], jnp.int32), jnp.array([1, 3], jnp.int32)
  with caplog.at_level("WARNING", logger="zoo.kernels.gmm"):
    out = kernels.gmm_gather(x, row_ids, rhs, sizes, implementation="interpret", tiling=(8, 16, 16))
  assert any("gathering float16 rows" in r.getMessage() for r in caplog.records)
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(kernels.gmm(x[row_ids], rhs, sizes, implementation="xla"), np.float32)
  )


def _relative_error(actual, expected):
  """max |actual - expected| / max |expected|, in float64."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("implementation", ["interpret", "interpret_gpu", "xla"])
def test_float32_cotangent_keeps_its_precision_with_bfloat16_lhs(implementation, gather):
  """bfloat16 lhs, float32 rhs and output: the backward must not round the float32 cotangent to bfloat16 (which put
  ~1e-3 relative error into the float32 drhs); drhs matches a float64 reference to float32 accuracy."""
  rng = np.random.default_rng(0)
  m, k, n, t = 40, 48, 24, 12
  sizes = np.array([9, 0, 22], np.int32)  # an empty group and rows past the sum
  x = jnp.asarray(rng.normal(size=(t if gather else m, k)), jnp.bfloat16)
  rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  assert np.any(np.asarray(cot) != np.asarray(cot.astype(jnp.bfloat16).astype(jnp.float32))), "cot must not be bf16"
  row_ids = rng.integers(0, t, size=m).astype(np.int32) if gather else np.arange(m, dtype=np.int32)

  def f(x, rhs):
    kwargs = dict(implementation=implementation, tiling=TILING[implementation], preferred_element_type=jnp.float32)
    if gather:
      return kernels.gmm_gather(x, jnp.asarray(row_ids), rhs, jnp.asarray(sizes), **kwargs)
    return kernels.gmm(x, rhs, jnp.asarray(sizes), **kwargs)

  out, vjp = jax.vjp(f, x, rhs)
  dx, drhs = jax.jit(vjp)(cot)
  assert out.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and drhs.dtype == jnp.float32
  lhs64, rhs64, cot64 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, rhs, cot))
  lhs64 = lhs64[row_ids]
  want_drhs = np_tgmm(lhs64.T, cot64, sizes)
  cot_rows = np.where(np.arange(m)[:, None] < sizes.sum(), cot64, 0)
  drows = np_gmm(cot_rows, rhs64.transpose(0, 2, 1), sizes)
  want_dx, spread = np.zeros((x.shape[0], k)), np.zeros((x.shape[0], k))
  np.add.at(want_dx, row_ids, drows)
  np.add.at(spread, row_ids, np.abs(drows))
  assert _relative_error(drhs, want_drhs) <= 1e-5
  assert np.all(np.asarray(drhs[1]) == 0), "the empty group gets exactly zero drhs"
  # dx is bfloat16: the float64 value rounded once (gmm), or its rows rounded, summed (xla: in bfloat16) and rounded
  # (gather); a rounded cotangent breaks these bounds by a factor of ~8 (gather) to ~200 (gmm).
  bound = 2**-8 * np.abs(want_dx) if not gather else 2**-7 * (np.abs(want_dx) + spread)
  np.testing.assert_array_less(np.abs(np.asarray(dx, np.float64) - want_dx), bound + 1e-5 * np.abs(want_dx).max())
