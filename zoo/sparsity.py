"""Sparse training as optax gradient transformations (papers.md E "SparseByteNN", G "DSL").

`sparse(inner, method, ...)` wraps an optax transformation so that a fixed fraction of selected parameters is zero:

- 'static': magnitude pruning once at `prune_step` (keep the top-(1-s) blocks by L1 norm), then a fixed mask.
- 'set' (Mocanu et al. 2018, "Scalable training of ANNs with adaptive sparse connectivity"): every `update_every`
  steps drop the smallest-magnitude fraction of the active blocks and regrow as many inactive blocks at random.
- 'rigl' (Evci et al. 2020, "Rigging the Lottery", Alg. 1; papers.md G "DSL"): as SET but regrow the inactive blocks of
  largest dense-gradient magnitude. The update fraction is cosine-annealed (RigL Eq. 1):
  `f(t) = alpha / 2 * (1 + cos(pi * t / end_step))` for t < end_step, else 0 (no more mask updates).

Every mask update keeps the exact per-leaf (hence total) number of active blocks (the budget). Regrown weights start
at zero and their optimizer moments (any subtree of the inner state shaped like params, e.g. Adam's mu/nu) are zero.

Masks are kept at block granularity: `block_shape` applies to the trailing dimensions of a leaf, e.g. (1, 16) on a
Dense kernel (in, out) or a conv kernel (kh, kw, in, out) is SparseByteNN's 16 consecutive output channels at one input
channel; (1, 1) is unstructured. Blocks are scored by their L1 norm (SparseByteNN; 1xN pruning).
"""

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

METHODS = ("static", "set", "rigl")
DISTRIBUTIONS = ("uniform", "erk")
_DEFAULT_EXCLUDE = re.compile(r"bias|norm|scale|embed", re.IGNORECASE)


class SparseState(NamedTuple):
  """step: updates applied so far; masks: params-shaped tree of bool block masks (a scalar True for a dense leaf);
  inner_state: the wrapped optimizer's state; key: PRNG key (uint32[2]) for SET regrowth and random initial masks."""

  step: jax.Array
  masks: Any
  inner_state: Any
  key: jax.Array


class _Leaf(NamedTuple):
  """Static plan for one parameter: sparse or not, its block grid and the number of active blocks (the budget)."""

  path: str
  sparse: bool
  grid: tuple = ()
  n_active: int = 0


def _is_box(x):
  return isinstance(x, nn.meta.AxisMetadata)


def path_name(path) -> str:
  """'/'-joined key path, e.g. 'Dense_0/kernel' (the convention of `zoo.engine.partition`)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def default_include(path: str, leaf) -> bool:
  """[guess] 2-D+ kernels are sparsified; biases, norms' scales and embeddings are not (RigL keeps them dense)."""
  return np.ndim(leaf) >= 2 and not _DEFAULT_EXCLUDE.search(path)


def update_fraction(step, alpha: float = 0.3, end_step: int = 1):
  """RigL Eq. 1: `alpha / 2 * (1 + cos(pi * step / end_step))` for step < end_step, else 0."""
  step = jnp.asarray(step, jnp.float32)
  f = 0.5 * alpha * (1.0 + jnp.cos(jnp.pi * step / float(end_step)))
  return jnp.where(step < end_step, f, 0.0)


def _check_sparsity(value, what):
  if not (isinstance(value, int | float) and 0.0 <= float(value) < 1.0):
    raise ValueError(f"sparsity: {what} is {value!r}; allowed: a number in [0, 1) (the fraction of zeros)")


def _erk_densities(sizes, raws, density):
  """Erdos-Renyi-Kernel (RigL Sec. 3; Evci et al. 2020): density_l = eps * sum(shape_l) / prod(shape_l), eps chosen so
  the total number of non-zeros is density * total; leaves that would exceed 1 are made dense and eps re-solved."""
  dense = set()
  while True:
    budget = density * sum(sizes) - sum(sizes[i] for i in dense)
    denom = sum(raws[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
    eps = budget / denom if denom > 0 else 0.0
    more = {i for i in range(len(sizes)) if i not in dense and eps * raws[i] > 1.0}
    if not more:
      return [1.0 if i in dense else eps * raws[i] for i in range(len(sizes))]
    dense |= more


def _plan(params, include, sparsity, distribution, block_shape):
  """Static per-leaf plan from the shapes of `params` (a list aligned with its flattened leaves)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  if include is None:
    include = default_include
  elif isinstance(include, str):
    pattern = re.compile(include)
    include = lambda path, leaf: bool(pattern.search(path))
  leaves = []
  for path, leaf in flat:
    name = path_name(path)
    if not include(name, leaf):
      leaves.append(_Leaf(name, False))
      continue
    shape = tuple(np.shape(leaf))
    k = len(block_shape)
    if k > len(shape) or any(b <= 0 or d % b for d, b in zip(shape[len(shape) - k :], block_shape)):
      raise ValueError(
        f"sparsity: block_shape {tuple(block_shape)} does not divide leaf '{name}' of shape {shape}; allowed: positive "
        f"block sizes dividing the last {k} dimensions (exclude the leaf via `include` otherwise)"
      )
    grid = shape[: len(shape) - k] + tuple(d // b for d, b in zip(shape[len(shape) - k :], block_shape))
    leaves.append(_Leaf(name, True, grid, 0))
  sparse_ids = [i for i, l in enumerate(leaves) if l.sparse]
  if distribution == "erk":
    shapes = [tuple(np.shape(flat[i][1])) for i in sparse_ids]
    densities = _erk_densities([math.prod(s) for s in shapes], [sum(s) / math.prod(s) for s in shapes], 1 - sparsity)
  else:
    densities = [1.0 - sparsity] * len(sparse_ids)
  for i, d in zip(sparse_ids, densities):
    n = math.prod(leaves[i].grid)
    leaves[i] = leaves[i]._replace(n_active=int(min(max(round(d * n), 1), n)))
  return leaves


def block_scores(x, grid):
  """L1 norm of each block of `x` (SparseByteNN's block score): shape `grid` (leading dims, then the block grid)."""
  shape = []
  for d, g in zip(x.shape, grid):
    shape += [g, d // g]
  y = jnp.abs(x.astype(jnp.float32)).reshape(shape)
  return y.sum(axis=tuple(range(1, 2 * x.ndim, 2)))


def expand_mask(mask, shape):
  """Element mask of `shape` from a block mask (each block entry repeated over its block); a scalar stays a scalar."""
  if mask.ndim == 0:
    return mask
  for axis, (d, g) in enumerate(zip(shape, mask.shape)):
    if d != g:
      mask = jnp.repeat(mask, d // g, axis=axis)
  return mask


def _rank(scores):
  """Ascending rank of each entry of a flat array, ties broken by index (exact counts for `rank < n`)."""
  order = jnp.argsort(scores, stable=True)
  return jnp.zeros(scores.shape, jnp.int32).at[order].set(jnp.arange(scores.size, dtype=jnp.int32))


def _top(scores, n):
  """Flat bool mask of the `n` largest scores (n static or traced)."""
  return _rank(-scores.reshape(-1)) < n


def _drop_grow(mask, w_score, g_score, n):
  """Drop the `n` active blocks of smallest |w| and grow the `n` blocks, inactive before this update, of largest
  grow score (RigL Alg. 1, lines 6-9). [guess] a block dropped in this update cannot be regrown in the same update."""
  m = mask.reshape(-1)
  drop = m & (_rank(jnp.where(m, w_score.reshape(-1), jnp.inf)) < n)
  grow = ~m & (_rank(-jnp.where(m, -jnp.inf, g_score.reshape(-1))) < n)
  return ((m & ~drop) | grow).reshape(mask.shape)


def _reset_moments(inner_state, params, keep):
  """Zeroes, where `keep` (element masks) is False, every subtree of the inner state structured like params (Adam's
  mu and nu, momentum traces); other state (counts, empty states) is left alone."""
  treedef = jax.tree.structure(params)
  shapes = [np.shape(p) for p in jax.tree.leaves(params)]

  def like_params(x):
    if jax.tree.structure(x) != treedef:
      return False
    return [np.shape(v) for v in jax.tree.leaves(x)] == shapes

  def reset(x):
    if not like_params(x):
      return x
    return jax.tree.map(lambda v, k: v if k.ndim == 0 else jnp.where(k, v, jnp.zeros_like(v)), x, keep)

  return jax.tree.map(reset, inner_state, is_leaf=like_params)


def sparse(
  inner: optax.GradientTransformation,
  method: str = "rigl",
  sparsity: float = 0.9,
  *,
  distribution: str = "uniform",
  block_shape: tuple = (1, 1),
  include: str | Callable | None = None,
  update_every: int = 100,
  alpha: float = 0.3,
  end_step: int | None = None,
  prune_step: int = 0,
  init_masks: str = "random",
  seed: int = 0,
) -> optax.GradientTransformation:
  """Wraps `inner` for sparse training (see the module docstring).

  Args:
    inner: the dense optimizer (e.g. `optax.adamw(...)`); it sees masked gradients.
    method: 'static' (magnitude pruning at `prune_step`), 'set' or 'rigl'.
    sparsity: fraction of zero blocks in [0, 1), per leaf ('uniform') or overall ('erk', RigL's Erdos-Renyi-Kernel).
    block_shape: block over the trailing dims; (1, 16) = SparseByteNN's 16 output channels at one input channel.
    include: which leaves are sparse: a regex searched in the '/'-joined path, or `f(path, leaf) -> bool`;
      default `default_include` (2-D+ kernels, not biases/norms/embeddings) [guess].
    update_every: dT, steps between mask updates (RigL/DSL default 100).
    alpha: initial update fraction (RigL/DSL default 0.3).
    end_step: no mask updates from this step on (RigL: 75% of training); required for 'set' and 'rigl'.
    prune_step: 'static': the step at which the dense weights are pruned by magnitude.
    init_masks: 'set'/'rigl' initial masks: 'random' (RigL's default) or 'magnitude' (top |w| blocks at init).
    seed: PRNG seed for random masks and SET regrowth.

  `update(grads, state, params)` requires params. Gradients of inactive weights are zeroed, the inner update is masked
  and inactive weights get the update `-params`, so after `optax.apply_updates` they are exactly zero even if the
  initial params were dense (or call `apply_masks(params, state)` after init). At a mask-update step the new masks come
  from the dense `grads` (RigL); dropped and regrown weights get no inner update at that step, their moments are reset,
  so regrown weights start at exactly zero with zero moments. jit-compatible: mask updates run under `jax.lax.cond`.

  Raises:
    ValueError: an unknown method/distribution/init, a sparsity outside [0, 1), a bad schedule, or (at init) a
      block shape that does not divide a sparsified leaf.
  """
  if method not in METHODS:
    raise ValueError(f"sparsity: method {method!r} is not known; allowed: {list(METHODS)}")
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"sparsity: distribution {distribution!r} is not known; allowed: {list(DISTRIBUTIONS)}")
  if init_masks not in ("random", "magnitude"):
    raise ValueError(f"sparsity: init_masks {init_masks!r} is not known; allowed: ['random', 'magnitude']")
  _check_sparsity(sparsity, "the requested sparsity")
  block_shape = tuple(int(b) for b in block_shape)
  if method in ("set", "rigl"):
    if end_step is None or int(end_step) <= 0:
      raise ValueError(
        f"sparsity: end_step is {end_step!r} for method {method!r}; allowed: an int > 0 (RigL: 75% of training)"
      )
    if int(update_every) <= 0:
      raise ValueError(f"sparsity: update_every is {update_every!r}; allowed: an int > 0")
    if not 0.0 <= float(alpha) <= 1.0:
      raise ValueError(f"sparsity: alpha is {alpha!r}; allowed: a number in [0, 1]")

  def plan(params):
    return _plan(params, include, float(sparsity), distribution, block_shape)

  def magnitude_masks(leaves, flat_params):
    return [
      _top(block_scores(p, l.grid), l.n_active).reshape(l.grid) if l.sparse else jnp.ones((), bool)
      for l, p in zip(leaves, flat_params)
    ]

  def init_fn(boxed_params):
    # Masks are planned on the plain arrays: a model's logically partitioned parameters (flax boxes) keep their
    # boxes only in the inner state, whose moments are sharded like the parameters; the masks are replicated.
    params = nn.unbox(boxed_params)
    leaves = plan(params)
    flat, treedef = jax.tree.flatten(params)
    key = jax.random.PRNGKey(seed)
    if method == "static":
      masks = [jnp.ones(l.grid if l.sparse else (), bool) for l in leaves]
    elif init_masks == "magnitude":
      masks = magnitude_masks(leaves, flat)
    else:
      masks = [
        _top(jax.random.uniform(jax.random.fold_in(key, i), l.grid), l.n_active).reshape(l.grid)
        if l.sparse
        else jnp.ones((), bool)
        for i, l in enumerate(leaves)
      ]
    masks = jax.tree.unflatten(treedef, masks)
    boxed = any(isinstance(x, nn.meta.AxisMetadata) for x in jax.tree.leaves(boxed_params, is_leaf=_is_box))
    if not boxed:
      inner_state = inner.init(jax.tree.map(lambda p, m: jnp.where(expand_mask(m, p.shape), p, 0), params, masks))
    else:  # [guess] the inner state's init does not depend on the values (true of optax's adam, sgd, clipping)
      inner_state = inner.init(boxed_params)
    return SparseState(jnp.zeros((), jnp.int32), masks, inner_state, key)

  def new_masks(leaves, flat_masks, flat_params, flat_grads, step, key):
    if method == "static":
      return magnitude_masks(leaves, flat_params)
    frac = update_fraction(step, alpha, int(end_step))
    out = []
    for i, (l, m, p, g) in enumerate(zip(leaves, flat_masks, flat_params, flat_grads)):
      if not l.sparse:
        out.append(m)
        continue
      total = math.prod(l.grid)
      n = jnp.minimum(jnp.floor(frac * l.n_active).astype(jnp.int32), total - l.n_active)
      w_score = block_scores(jnp.where(expand_mask(m, p.shape), p, 0), l.grid)
      if method == "rigl":
        g_score = block_scores(g, l.grid)
      else:
        g_score = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, step), i), l.grid)
      out.append(_drop_grow(m, w_score, g_score, n))
    return out

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("sparsity: update(grads, state, params) needs params (magnitudes and the pruning update)")
    leaves = plan(params)
    flat_params, treedef = jax.tree.flatten(params)
    flat_grads = treedef.flatten_up_to(grads)
    flat_masks = treedef.flatten_up_to(state.masks)
    step = state.step
    if method == "static":
      is_update = step == prune_step
    else:
      is_update = (step > 0) & (step % int(update_every) == 0) & (step < int(end_step))
    masks = jax.lax.cond(
      is_update,
      lambda: new_masks(leaves, flat_masks, flat_params, flat_grads, step, state.key),
      lambda: list(flat_masks),
    )
    keep = [
      expand_mask(a & b, p.shape) if l.sparse else a for l, a, b, p in zip(leaves, flat_masks, masks, flat_params)
    ]
    keep_tree = jax.tree.unflatten(treedef, keep)
    inner_state = _reset_moments(state.inner_state, params, keep_tree)
    masked_grads = jax.tree.map(lambda g, k: g if k.ndim == 0 else jnp.where(k, g, jnp.zeros_like(g)), grads, keep_tree)
    updates, inner_state = inner.update(masked_grads, inner_state, params)
    updates = jax.tree.map(
      lambda u, p, k: u if k.ndim == 0 else jnp.where(k, u, -p).astype(u.dtype), updates, params, keep_tree
    )
    new_state = SparseState(step + 1, jax.tree.unflatten(treedef, masks), inner_state, state.key)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def apply_masks(params, state: SparseState):
  """params with the inactive weights of `state.masks` set to zero."""
  return jax.tree.map(lambda p, m: jnp.where(expand_mask(m, p.shape), p, jnp.zeros_like(p)), params, state.masks)


def budget(params, state: SparseState):
  """{path: active elements} for each sparsified leaf (the number every mask update preserves)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  masks = jax.tree.structure(params).flatten_up_to(state.masks)
  return {path_name(path): int(jnp.sum(expand_mask(m, p.shape))) for (path, p), m in zip(flat, masks) if np.ndim(m) > 0}


def sparsity_report(params, state: SparseState | None = None):
  """Achieved sparsity (fraction of exact zeros in params): {path: fraction} per sparsified leaf (every leaf when no
  state is given), plus 'total' over those leaves and 'total_all' over every leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  masks = jax.tree.structure(params).flatten_up_to(state.masks) if state is not None else [None] * len(flat)
  out, zeros, size, zeros_all, size_all = {}, 0, 0, 0, 0
  for (path, p), m in zip(flat, masks):
    z, n = int(jnp.sum(p == 0)), int(np.size(p))
    zeros_all, size_all = zeros_all + z, size_all + n
    if m is None or np.ndim(m) > 0:
      out[path_name(path)] = z / max(n, 1)
      zeros, size = zeros + z, size + n
  out["total"] = zeros / max(size, 1)
  out["total_all"] = zeros_all / max(size_all, 1)
  return out


def channel_permutation(kernel, descending: bool = True):
  """SparseByteNN channel reordering [papers.md E; guess at the criterion]: the permutation of output channels (last
  axis) sorting them by L1 norm, so consecutive channels grouped into (1, N) blocks have similar norms and block L1
  pruning removes whole low-norm groups. Returns (perm, inverse): `x[..., perm][..., inverse] == x`."""
  norms = jnp.sum(jnp.abs(kernel).reshape(-1, kernel.shape[-1]), axis=0)
  perm = jnp.argsort(-norms if descending else norms, stable=True)
  return perm, inverse_permutation(perm)


def inverse_permutation(perm):
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.size, dtype=perm.dtype))


def permute_layer_pair(kernel, bias, next_kernel, perm):
  """Permutes a layer's output channels (kernel last axis, bias) and the next layer's input channels (its kernel's
  axis -2: Dense (in, out), conv (kh, kw, in, out)) by the same `perm`; with an elementwise activation in between the
  pair computes the same function (the permuted activations meet the matching permuted rows)."""
  new_bias = None if bias is None else bias[perm]
  return kernel[..., perm], new_bias, jnp.take(next_kernel, perm, axis=-2)


# `config.sparsity` (the engine wraps its optimizer with `sparse` when method != 'none'; `zoo.engine.optim`).
# end_fraction / prune_fraction are fractions of config.train.steps; include '' = `default_include`.
CONFIG_DEFAULTS = {
  "method": "none",
  "sparsity": 0.9,
  "distribution": "uniform",
  "block_shape": (1, 1),
  "include": "",
  "update_every": 100,
  "alpha": 0.3,
  "end_fraction": 0.75,
  "prune_fraction": 0.0,
  "init_masks": "random",
  "seed": 0,
}


def from_config(inner, sparsity_config, total_steps):
  """`inner` wrapped by `sparse` as `config.sparsity` says (`inner` itself for method 'none').

  Raises:
    ValueError: a value `sparse` refuses, or an unknown method.
  """
  c = {**CONFIG_DEFAULTS, **dict(sparsity_config or {})}
  if c["method"] == "none":
    return inner
  if c["method"] not in METHODS:
    raise ValueError(f"sparsity: method {c['method']!r} is not known; allowed: {['none', *METHODS]}")
  return sparse(
    inner,
    c["method"],
    c["sparsity"],
    distribution=c["distribution"],
    block_shape=tuple(c["block_shape"]),
    include=c["include"] or None,
    update_every=int(c["update_every"]),
    alpha=float(c["alpha"]),
    end_step=max(int(float(c["end_fraction"]) * total_steps), 1),
    prune_step=int(float(c["prune_fraction"]) * total_steps),
    init_masks=c["init_masks"],
    seed=int(c["seed"]),
  )
