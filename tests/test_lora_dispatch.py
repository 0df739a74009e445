"""Sparse LoRA-expert dispatch (grouped matmuls) == the dense masked reference, values and gradients, with the xla
path and the Mosaic ("interpret") and Triton ("interpret_gpu") kernels in interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.layers import lora_dispatch
from zoo.routing import lora_routers

TOKENS, D_IN, RANK, D_OUT, EXPERTS = 12, 16, 4, 8, 4
SCALE = 0.5


def routing_case(kind, rng):
  """(expert_ids [T, k] int32, weights [T, E] float32 nonzero exactly on the selected experts) of one routing kind.

  'top1': experts drawn from {0, 1, 3}, so expert 2 gets no token (an empty group);
  'top2': two distinct experts per token;
  'variable': DynMoLE-style, 1..E experts per token then -1 slots, and one token with every slot empty.
  """
  if kind == "top1":
    ids = rng.choice([0, 1, 3], size=(TOKENS, 1))
  elif kind == "top2":
    ids = np.stack([rng.permutation(EXPERTS)[:2] for _ in range(TOKENS)])
  else:
    ids = np.full((TOKENS, EXPERTS), -1)
    for t in range(TOKENS - 1):
      n = rng.integers(1, EXPERTS + 1)
      ids[t, :n] = rng.permutation(EXPERTS)[:n]
    rng.shuffle(ids)  # the all-empty token somewhere in the middle
  weights = np.zeros((TOKENS, EXPERTS))
  for t, row in enumerate(ids):
    for e in row[row >= 0]:
      weights[t, e] = rng.uniform(0.1, 1.0)
  return jnp.asarray(ids, jnp.int32), jnp.asarray(weights, jnp.float32)


def adapters(rng):
  x = jnp.asarray(rng.normal(size=(TOKENS, D_IN)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(EXPERTS, D_IN, RANK)) / 4, jnp.float32)
  b = jnp.asarray(rng.normal(size=(EXPERTS, RANK, D_OUT)) / 2, jnp.float32)
  return x, a, b


def test_dense_equals_a_per_token_loop():
  # The reference itself against y_t = scale * sum over t's selected experts of w_te x_t A_e B_e, in float64.
  rng = np.random.default_rng(0)
  x, a, b = adapters(rng)
  ids, w = routing_case("variable", rng)
  want = np.zeros((TOKENS, D_OUT))
  xn, an, bn, wn = (np.asarray(v, np.float64) for v in (x, a, b, w))
  for t in range(TOKENS):
    for e in np.asarray(ids[t]):
      if e >= 0:
        want[t] += SCALE * wn[t, e] * (xn[t] @ an[e] @ bn[e])
  assert np.abs(want).max() > 0.1  # the case is not trivially zero
  np.testing.assert_allclose(lora_dispatch.dense_lora_experts(x, a, b, w, SCALE), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "interpret", "interpret_gpu"])
@pytest.mark.parametrize("kind", ["top1", "top2", "variable"])
def test_sparse_equals_dense(kind, implementation):
  rng = np.random.default_rng({"top1": 1, "top2": 2, "variable": 3}[kind])
  x, a, b = adapters(rng)
  ids, w = routing_case(kind, rng)
  cot = jnp.asarray(rng.normal(size=(TOKENS, D_OUT)), jnp.float32)

  def sparse(x, a, b, w):
    return lora_dispatch.sparse_lora_experts(x, a, b, ids, w, SCALE, implementation=implementation)

  def dense(x, a, b, w):
    return lora_dispatch.dense_lora_experts(x, a, b, w, SCALE)

  @jax.jit
  def run(x, a, b, w):
    outs, grads = [], []
    for f in (sparse, dense):
      outs.append(f(x, a, b, w))
      grads.append(jax.grad(lambda *args, f=f: jnp.sum(f(*args) * cot), (0, 1, 2, 3))(x, a, b, w))
    return outs, grads

  (y_sparse, y_dense), (g_sparse, g_dense) = run(x, a, b, w)
  assert np.abs(np.asarray(y_dense)).max() > 0.1
  np.testing.assert_allclose(y_sparse, y_dense, rtol=1e-5, atol=1e-5)
  for name, got, want in zip(("x", "lora_a", "lora_b"), g_sparse[:3], g_dense[:3]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
  # The weights: equal on the selected experts; sparse reads no other entry, so its gradient there is 0.
  selected = np.asarray(w) != 0
  np.testing.assert_allclose(
    np.where(selected, g_sparse[3], 0), np.where(selected, g_dense[3], 0), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_array_equal(np.asarray(g_sparse[3])[~selected], 0)
  if kind == "top1":  # expert 2 has no token: no gradient in either
    assert not np.any(np.asarray(g_sparse[1][2])) and not np.any(np.asarray(g_sparse[2][2]))
  if kind == "variable":  # the token with every slot empty gets nothing
    empty = int(np.flatnonzero(np.all(np.asarray(ids) < 0, axis=1))[0])
    np.testing.assert_array_equal(np.asarray(y_sparse)[empty], 0)
    np.testing.assert_array_equal(np.asarray(g_sparse[0])[empty], 0)


def test_sparse_ignores_the_weights_of_unselected_experts():
  # Empty slots and unselected experts contribute nothing even when their weight entries hold junk.
  rng = np.random.default_rng(4)
  x, a, b = adapters(rng)
  ids, w = routing_case("variable", rng)
  junk = jnp.where(w == 0, 7.0, w)
  np.testing.assert_allclose(
    lora_dispatch.sparse_lora_experts(x, a, b, ids, junk, SCALE, implementation="xla"),
    lora_dispatch.dense_lora_experts(x, a, b, w, SCALE),
    rtol=1e-5,
    atol=1e-5,
  )


def test_dynmole_routing_through_sparse_and_dense_gives_the_same_router_gradient():
  # Router logits -> DynMoLE (variable experts per token, some tokens on all) -> dispatch: gradients wrt the logits.
  rng = np.random.default_rng(5)
  x, a, b = adapters(rng)
  logits = jnp.asarray(rng.normal(size=(TOKENS, EXPERTS)) * np.linspace(0.1, 3.0, TOKENS)[:, None], jnp.float32)
  cot = jnp.asarray(rng.normal(size=(TOKENS, D_OUT)), jnp.float32)

  def loss(logits, sparse):
    r = lora_routers.dynmole(logits)
    if sparse:
      y = lora_dispatch.sparse_lora_experts(x, a, b, r.expert_ids, r.weights, SCALE, implementation="xla")
    else:
      y = lora_dispatch.dense_lora_experts(x, a, b, r.weights, SCALE)
    return jnp.sum(y * cot)

  counts = np.sum(np.asarray(lora_routers.dynmole(logits).expert_ids) >= 0, axis=1)
  assert counts.min() < EXPERTS and counts.max() == EXPERTS  # both regimes present
  np.testing.assert_allclose(loss(logits, True), loss(logits, False), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.grad(loss)(logits, True), jax.grad(loss)(logits, False), rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_refused():
  rng = np.random.default_rng(6)
  x, a, b = adapters(rng)
  ids, w = routing_case("top2", rng)
  with pytest.raises(ValueError, match="weights must be"):
    lora_dispatch.sparse_lora_experts(x, a, b, ids, w[:, :2], SCALE)
  with pytest.raises(ValueError, match="d_in"):
    lora_dispatch.dense_lora_experts(x[:, :3], a, b, w, SCALE)
  with pytest.raises(ValueError, match="expert_ids"):
    lora_dispatch.sparse_lora_experts(x, a, b, ids[:3], w, SCALE)
