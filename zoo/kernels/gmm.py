"""Grouped matrix multiplication: public entry points, implementation choice and custom VJPs.

Method: the grouped GEMM of MegaBlocks (Gale et al., 2022, "MegaBlocks: Efficient Sparse Training with
Mixture-of-Experts", Sec. 5.1): tokens sorted by expert form contiguous row groups, and group i is multiplied by
expert matrix i, with no capacity padding (dropless MoE). The backward pass is again grouped: dlhs = gmm(dout, rhs^T)
and drhs = tgmm(lhs^T, dout). The gather-fused variant reads token rows through the routing order so dispatch never
writes a permuted copy of the activations, and `scatter_combine` is the matching weighted un-permutation.

Implementations (`implementation=`):
  "pallas_tpu"     Pallas Mosaic kernels (`kernels/gmm_tpu.py`), TPU.
  "pallas_gpu"     Pallas Triton kernels (`kernels/gmm_gpu.py`), GPU.
  "interpret"      the Mosaic kernels run by the Pallas interpreter (any backend; for tests).
  "interpret_gpu"  the Triton kernels run by the Pallas interpreter (any backend; for tests).
  "xla"            `jax.lax.ragged_dot` / `ragged_dot_general` (any backend).
None picks per backend: TPU -> pallas_tpu, GPU -> pallas_gpu, CPU -> xla; a Pallas choice that cannot take the
inputs (dtype) falls back to xla and logs why once. `with default_implementation(name):` replaces the per-backend
choice inside the block (e.g. to compile the Mosaic path for a TPU from a CPU host, or to run xla on a GPU).
"""

import contextlib
import contextvars
import functools
import logging

import jax
import jax.numpy as jnp

from zoo.kernels import gmm_gpu, gmm_tpu, metadata, reference

IMPLEMENTATIONS = ("pallas_tpu", "pallas_gpu", "interpret", "interpret_gpu", "xla")
PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Default (tm, tk, tn) per kernel family. [guess] TPU: MXU-sized tiles whose double-buffered blocks fit VMEM;
# GPU: the usual Hopper Triton bf16 tile, checked to compile for sm_90 without spills (gmm_gpu.compiler_params);
# interpreter: few grid steps.
DEFAULT_TILING = {
  "pallas_tpu": (128, 512, 512),
  "pallas_gpu": (128, 64, 128),
  "interpret": (128, 128, 128),
  "interpret_gpu": (64, 64, 64),
}

_log = logging.getLogger(__name__)
_logged_reasons = set()
_default_implementation = contextvars.ContextVar("kernels_default_implementation", default=None)


@contextlib.contextmanager
def default_implementation(implementation):
  """Inside the block, calls with implementation=None use `implementation` (one of IMPLEMENTATIONS)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
  token = _default_implementation.set(implementation)
  try:
    yield
  finally:
    _default_implementation.reset(token)


def _log_once(message):
  if message not in _logged_reasons:
    _logged_reasons.add(message)
    _log.warning(message)


def _fall_back(reason):
  _log_once(f"zoo.kernels.gmm: using implementation='xla' because {reason}")
  return "xla"


def choose_implementation(implementation, *dtypes):
  """Resolves `implementation` (None = per backend) to one of IMPLEMENTATIONS.

  Args:
    implementation: None or a name in IMPLEMENTATIONS.
    *dtypes: the operand dtypes (the Pallas kernels take float32, bfloat16 and float16).

  Returns:
    The implementation name.
  """
  if implementation is None:
    implementation = _default_implementation.get()
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS} (or None for automatic)")
    return implementation
  backend = jax.default_backend()
  chosen = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(backend)
  if chosen is None:
    if backend != "cpu":
      return _fall_back(f"backend {backend!r} has no Pallas grouped-matmul kernel")
    return "xla"
  bad = [str(jnp.dtype(d)) for d in dtypes if jnp.dtype(d) not in PALLAS_DTYPES]
  if bad:
    return _fall_back(f"dtype {bad[0]} is not supported by the Pallas kernels (allowed: float32, bfloat16, float16)")
  return chosen


def _pow2_at_least(x):
  return max(16, 1 << (max(x, 1) - 1).bit_length())


def _tiling(implementation, tiling, m, k, n, *, divide_k=False):
  """Tile sizes (tm, tk, tn) for problem dims (m, k, n): the requested ones clipped to the problem, validated."""
  if tiling is None:
    tiling = DEFAULT_TILING[implementation]
  if len(tiling) != 3 or not all(isinstance(t, int) and t > 0 for t in tiling):
    raise ValueError(f"tiling must be three positive ints (tm, tk, tn), got {tiling!r}")
  tm, tk, tn = tiling
  if implementation in ("pallas_gpu", "interpret_gpu"):
    if any(t & (t - 1) or t < 16 for t in tiling):
      raise ValueError(f"Triton tiling must be powers of two >= 16, got {tiling!r}")
    return min(tm, _pow2_at_least(m)), min(tk, _pow2_at_least(k)), min(tn, _pow2_at_least(n))
  tm = min(tm, -(-m // 8) * 8)
  tk = k if k <= tk or (divide_k and k % tk) else tk
  tn = n if n <= tn else tn
  if implementation == "pallas_tpu" and (tm % 8 or (tk != k and tk % 128) or (tn != n and tn % 128)):
    raise ValueError(f"Mosaic tiling needs tm % 8 == 0 and tk, tn multiples of 128 (or the full dim), got {tiling!r}")
  return tm, tk, tn


def _kernel_module(impl):
  """The module (gmm_tpu or gmm_gpu) whose kernels run implementation `impl`."""
  return gmm_gpu if impl in ("pallas_gpu", "interpret_gpu") else gmm_tpu


def _kernel_options(impl, tiling, dims, row_ids):
  """Keyword arguments tiling, row_ids and interpret of a kernel call of `impl` on problem dims (m, k, n, g)."""
  m, k, n, _ = dims
  tiles = _tiling(impl, tiling, m, k, n, divide_k=row_ids is not None)
  return dict(tiling=tiles, row_ids=row_ids, interpret=impl.startswith("interpret"))


def _kernel_gmm(impl, tiling, lhs, rhs, group_sizes, out_dtype, *, transpose_rhs=False, row_ids=None):
  dims = metadata.gmm_dims(lhs, rhs, transpose_rhs=transpose_rhs, row_ids=row_ids)
  options = _kernel_options(impl, tiling, dims, row_ids)
  return _kernel_module(impl).gmm(lhs, rhs, group_sizes, out_dtype=out_dtype, transpose_rhs=transpose_rhs, **options)


def _kernel_tgmm(impl, tiling, lhs_rows, rhs, group_sizes, out_dtype, *, row_ids=None):
  options = _kernel_options(impl, tiling, metadata.tgmm_dims(lhs_rows, rhs, group_sizes), row_ids)
  return _kernel_module(impl).tgmm(lhs_rows, rhs, group_sizes, out_dtype=out_dtype, **options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _pallas_gmm(lhs, rhs, group_sizes, row_ids, impl, tiling, out_dtype):
  return _kernel_gmm(impl, tiling, lhs, rhs, group_sizes, out_dtype, row_ids=row_ids)


def _pallas_gmm_fwd(lhs, rhs, group_sizes, row_ids, impl, tiling, out_dtype):
  out = _kernel_gmm(impl, tiling, lhs, rhs, group_sizes, out_dtype, row_ids=row_ids)
  return out, (lhs, rhs, group_sizes, row_ids)


def _pallas_gmm_bwd(impl, tiling, out_dtype, residuals, dout):
  del out_dtype
  lhs, rhs, group_sizes, row_ids = residuals
  # dout keeps its dtype: rounding a float32 cotangent to a bfloat16 lhs cost the float32 drhs ~1e-3 relative error.
  # The kernels take mixed operand dtypes (Mosaic's matmul as is, as in megablox; Triton's after promoting the
  # narrower one, see gmm_gpu._dot) and accumulate in float32; only the results are cast, to the primal dtypes.
  if row_ids is None:
    dlhs = _kernel_gmm(impl, tiling, dout, rhs, group_sizes, lhs.dtype, transpose_rhs=True)
  else:
    drows = _kernel_gmm(impl, tiling, dout, rhs, group_sizes, lhs.dtype, transpose_rhs=True)
    dlhs = jnp.zeros(lhs.shape, jnp.float32).at[row_ids].add(drows.astype(jnp.float32)).astype(lhs.dtype)
  drhs = _kernel_tgmm(impl, tiling, lhs, dout, group_sizes, rhs.dtype, row_ids=row_ids)
  return dlhs, drhs, None, None


_pallas_gmm.defvjp(_pallas_gmm_fwd, _pallas_gmm_bwd)


def _check(lhs, rhs, group_sizes, row_ids=None):
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"expected lhs [m, k] and rhs [g, k, n], got shapes {lhs.shape} and {rhs.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"contracting dims differ: lhs {lhs.shape} vs rhs {rhs.shape}")
  if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(
      f"group_sizes must be an integer vector [g={rhs.shape[0]}], got {group_sizes.dtype}{list(group_sizes.shape)}"
    )
  if row_ids is not None and (row_ids.ndim != 1 or not jnp.issubdtype(row_ids.dtype, jnp.integer)):
    raise ValueError(f"row_ids must be an integer vector [m], got {row_ids.dtype}{list(row_ids.shape)}")


def gmm(lhs, rhs, group_sizes, *, implementation=None, tiling=None, preferred_element_type=None):
  """Grouped matmul: out[j] = lhs[j] @ rhs[group(j)] (MegaBlocks, Gale et al. 2022, Sec. 5.1).

  Group i owns rows [sum(group_sizes[:i]), sum(group_sizes[:i+1])); rows past sum(group_sizes) are zero. Differentiable
  in lhs and rhs (custom VJP: dlhs = gmm(dout, rhs^T), drhs = tgmm(lhs^T, dout); empty groups get zero drhs).

  Args:
    lhs: [m, k].
    rhs: [g, k, n].
    group_sizes: [g] integer, sum <= m.
    implementation: one of IMPLEMENTATIONS or None (per backend, see module docstring).
    tiling: (tm, tk, tn) or None for the implementation's default; clipped to the problem size.
    preferred_element_type: output dtype (default: promoted input dtype); accumulation is float32.

  Returns:
    [m, n].
  """
  _check(lhs, rhs, group_sizes)
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  impl = choose_implementation(implementation, lhs.dtype, rhs.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  if impl == "xla":
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
  return _pallas_gmm(lhs, rhs, group_sizes, None, impl, tiling, out_dtype)


def tgmm(lhs, rhs, group_sizes, *, implementation=None, tiling=None, preferred_element_type=None):
  """Transposed grouped matmul: out[i] = lhs[:, rows of group i] @ rhs[rows of group i] (the drhs of gmm).

  Args:
    lhs: [k, m].
    rhs: [m, n].
    group_sizes: [g] integer, sum <= m; empty groups give exact zeros.
    implementation: one of IMPLEMENTATIONS or None.
    tiling: (tm, tk, tn) or None.
    preferred_element_type: output dtype (default: promoted input dtype).

  Returns:
    [g, k, n].
  """
  if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[1] != rhs.shape[0]:
    raise ValueError(f"expected lhs [k, m] and rhs [m, n], got shapes {lhs.shape} and {rhs.shape}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be an integer vector [g], got {group_sizes.dtype}{list(group_sizes.shape)}")
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  impl = choose_implementation(implementation, lhs.dtype, rhs.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  if impl == "xla":
    dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [0]), ([], [])), lhs_ragged_dimensions=[1], rhs_group_dimensions=[]
    )
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=out_dtype)
  return _kernel_tgmm(impl, tiling, lhs.T, rhs, group_sizes, out_dtype)


def gmm_gather(x, row_ids, rhs, group_sizes, *, implementation=None, tiling=None, preferred_element_type=None):
  """Gather-fused grouped matmul: out[j] = x[row_ids[j]] @ rhs[group(j)], without materialising x[row_ids].

  Equal to gmm(x[row_ids], rhs, group_sizes); rows past sum(group_sizes) are zero (their row_ids are read but
  unused, so they must still be valid indices into x). Gradients: dx is the scatter-add of gmm(dout, rhs^T) over
  row_ids; drhs is tgmm over the gathered rows (fused in the Pallas kernels).

  Args:
    x: [t, k] token activations in their original order.
    row_ids: [m] integer in [0, t), the token of each row in group-sorted (routing) order.
    rhs: [g, k, n].
    group_sizes: [g] integer, sum <= m.
    implementation: one of IMPLEMENTATIONS or None; "xla" gathers then calls ragged_dot.
    tiling: (tm, tk, tn) or None (Mosaic: tk is widened to k when it does not divide k).
    preferred_element_type: output dtype.

  Returns:
    [m, n].
  """
  _check(x, rhs, group_sizes, row_ids)
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x, rhs))
  impl = choose_implementation(implementation, x.dtype, rhs.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  row_ids = row_ids.astype(jnp.int32)
  if impl == "xla":
    return jax.lax.ragged_dot(x[row_ids], rhs, group_sizes, preferred_element_type=out_dtype)
  if impl in ("pallas_tpu", "interpret") and x.dtype == jnp.float16:
    _log_once(
      f"kernels.gmm_gather: gathering float16 rows before the Mosaic gmm ({impl}), whose row DMAs take "
      "float32 and bfloat16 only"
    )
    return _pallas_gmm(x[row_ids], rhs, group_sizes, None, impl, tiling, out_dtype)
  return _pallas_gmm(x, rhs, group_sizes, row_ids, impl, tiling, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def scatter_combine(y, row_ids, weights, num_tokens):
  """Weighted un-permutation (the MoE combine): out[t] = sum over rows j with row_ids[j] == t of weights[j] * y[j].

  Accumulates in float32; the VJP is a gather (dy[j] = weights[j] * dout[row_ids[j]],
  dweights[j] = <dout[row_ids[j]], y[j]>), never a scatter.

  Args:
    y: [m, n] expert outputs in group-sorted order.
    row_ids: [m] integer in [0, num_tokens), the token of each row.
    weights: [m] combine weights (0 for rows that carry no token).
    num_tokens: t (static).

  Returns:
    [t, n] in y's dtype.
  """
  return reference.scatter_combine_reference(y, row_ids, weights, num_tokens)


def _scatter_combine_fwd(y, row_ids, weights, num_tokens):
  return scatter_combine(y, row_ids, weights, num_tokens), (y, row_ids, weights)


def _scatter_combine_bwd(num_tokens, residuals, dout):
  del num_tokens
  y, row_ids, weights = residuals
  g = dout.astype(jnp.float32)[row_ids]
  dy = (g * weights.astype(jnp.float32)[:, None]).astype(y.dtype)
  dweights = jnp.sum(g * y.astype(jnp.float32), axis=-1).astype(weights.dtype)
  return dy, None, dweights


scatter_combine.defvjp(_scatter_combine_fwd, _scatter_combine_bwd)
