"""Expert parallelism (shard_map + all_to_all over 'expert') == the unsharded computation on the 8-device CPU mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import routing
from zoo.engine.sharding import make_mesh
from zoo.routing import dispatch

TOKENS, EXPERTS, EMBED, MLP, K = 32, 8, 8, 6, 2


def _problem():
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(ks[0], (TOKENS, EMBED))
  logits = jax.random.normal(ks[1], (TOKENS, EXPERTS))
  w = {"gate": jax.random.normal(ks[2], (EXPERTS, EMBED, MLP)) * 0.4,
       "up": jax.random.normal(ks[3], (EXPERTS, EMBED, MLP)) * 0.4,
       "down": jax.random.normal(ks[4], (EXPERTS, MLP, EMBED)) * 0.4}
  return x, logits, w


def _loss(x, w, logits, mesh, strategy, capacity_factor):
  r = routing.softmax_topk(logits, K)
  y, metrics = routing.moe_ffn(x, r, w, strategy=strategy, mesh=mesh, capacity_factor=capacity_factor)
  return jnp.sum(jnp.sin(y)), (y, metrics)


_grad = jax.jit(jax.grad(_loss, (0, 1, 2), has_aux=True), static_argnums=(3, 4, 5))


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=1, expert=4, tensor=1),
                                        dict(data=1, fsdp=1, expert=4, tensor=2)])
def test_sharded_equals_unsharded_forward_and_gradients(mesh_shape):
  mesh = make_mesh(mesh_shape)
  x, logits, w = _problem()
  ref_grads, (ref_y, _) = _grad(x, w, logits, None, "dropless", None)
  grads, (y, metrics) = _grad(x, w, logits, mesh, None, None)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  assert float(metrics["dropped_fraction"]) == 0.0
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)


def test_sharded_capacity_is_per_device():
  mesh = make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
  x, logits, w = _problem()
  logits = logits + jnp.array([2.0] + [0.0] * (EXPERTS - 1))  # overload expert 0 so that tokens are dropped
  _, (y, metrics) = _grad(x, w, logits, mesh, None, 1.0)
  # Tokens are split into 8 contiguous shards (batch axes data, fsdp, expert); each fills its own buffers.
  r = routing.softmax_topk(logits, K)
  shard = TOKENS // 8
  cap = routing.capacity(shard, K, EXPERTS, 1.0)
  parts, kept = [], 0
  for i in range(8):
    rows = slice(i * shard, (i + 1) * shard)
    y_i, m_i = dispatch.capacity_ffn(x[rows], r.expert_ids[rows], r.weights[rows], w, "swiglu", cap)
    parts.append(y_i)
    kept += (1 - m_i["dropped_fraction"]) * shard * K
  np.testing.assert_allclose(y, jnp.concatenate(parts), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["dropped_fraction"], 1 - kept / (TOKENS * K), rtol=1e-5)
  assert float(metrics["dropped_fraction"]) > 0


def test_moe_ffn_module_with_mesh_matches_without():
  mesh = make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, EMBED))
  sharded = routing.MoEFFN(EXPERTS, MLP, mesh=mesh, capacity_factor=None)
  local = routing.MoEFFN(EXPERTS, MLP, strategy="dense")
  variables = local.init(jax.random.PRNGKey(1), x)
  y_sharded, _, _ = jax.jit(sharded.apply)(variables, x)
  y_local, _, _ = local.apply(variables, x)
  np.testing.assert_allclose(y_sharded, y_local, rtol=1e-5, atol=1e-5)


def test_uneven_split_raises():
  mesh = make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
  x, logits, w = _problem()
  with pytest.raises(ValueError, match="30 tokens cannot be split"):
    routing.expert_parallel_ffn(x[:30], jnp.zeros((30, K), jnp.int32), jnp.zeros((30, K)), w, mesh=mesh)
  w6 = jax.tree.map(lambda a: a[:6], w)
  with pytest.raises(ValueError, match="6 experts cannot be split"):
    routing.expert_parallel_ffn(x, jnp.zeros((TOKENS, K), jnp.int32), jnp.zeros((TOKENS, K)), w6, mesh=mesh)
