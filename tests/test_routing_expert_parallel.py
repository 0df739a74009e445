"""Expert parallelism (shard_map + all_to_all over 'expert') == the unsharded computation on the 8-device CPU mesh."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import routing
from zoo.engine import sharding, trainer
from zoo.engine.sharding import make_mesh, mesh_context
from zoo.routing import dispatch, expert_parallel

TOKENS, EXPERTS, EMBED, MLP, K = 32, 8, 8, 6, 2


def _problem():
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(ks[0], (TOKENS, EMBED))
  logits = jax.random.normal(ks[1], (TOKENS, EXPERTS))
  w = {
    "gate": jax.random.normal(ks[2], (EXPERTS, EMBED, MLP)) * 0.4,
    "up": jax.random.normal(ks[3], (EXPERTS, EMBED, MLP)) * 0.4,
    "down": jax.random.normal(ks[4], (EXPERTS, MLP, EMBED)) * 0.4,
  }
  return x, logits, w


def _loss(x, w, logits, mesh, dispatch, capacity_factor):
  """Local dispatch (mesh None) or expert parallelism over `mesh`."""
  r = routing.softmax_topk(logits, K)
  if mesh is None:
    y, metrics = routing.moe_ffn(x, r, w, dispatch=dispatch, capacity_factor=capacity_factor)
  else:
    y, metrics = routing.expert_parallel_ffn(x, r.expert_ids, r.weights, w, mesh=mesh, capacity_factor=capacity_factor)
  return jnp.sum(jnp.sin(y)), (y, metrics)


_grad = jax.jit(jax.grad(_loss, (0, 1, 2), has_aux=True), static_argnums=(3, 4, 5))


@pytest.mark.parametrize(
  "mesh_shape", [dict(data=2, fsdp=1, expert=4, tensor=1), dict(data=1, fsdp=1, expert=4, tensor=2)]
)
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
  local = routing.MoEFFN(EXPERTS, MLP, dispatch="dense")
  variables = local.init(jax.random.PRNGKey(1), x)
  y_sharded, _, _ = jax.jit(sharded.apply)(variables, x)
  y_local, _, _ = local.apply(variables, x)
  np.testing.assert_allclose(y_sharded, y_local, rtol=1e-5, atol=1e-5)


def test_local_dispatch_does_not_know_expert_parallelism():
  # The MoE layer decides; dispatch (the local path) imports nothing of expert parallelism, which builds on it.
  import ast
  import inspect

  imported = set()
  for node in ast.walk(ast.parse(inspect.getsource(dispatch))):
    if isinstance(node, ast.ImportFrom):
      imported |= {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      imported |= {a.name for a in node.names}
  assert not any("expert_parallel" in name for name in imported), imported
  assert "mesh" not in inspect.signature(dispatch.moe_ffn).parameters
  assert expert_parallel.expert_devices(make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))) == 4
  assert expert_parallel.expert_devices(make_mesh(dict(data=8, fsdp=1, expert=1, tensor=1))) == 1


def test_uneven_split_raises():
  mesh = make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
  x, logits, w = _problem()
  with pytest.raises(ValueError, match="30 tokens cannot be split"):
    routing.expert_parallel_ffn(x[:30], jnp.zeros((30, K), jnp.int32), jnp.zeros((30, K)), w, mesh=mesh)
  w6 = jax.tree.map(lambda a: a[:6], w)
  with pytest.raises(ValueError, match="6 experts cannot be split"):
    routing.expert_parallel_ffn(x, jnp.zeros((TOKENS, K), jnp.int32), jnp.zeros((TOKENS, K)), w6, mesh=mesh)


def test_context_mesh_asks_for_expert_parallelism_only_when_it_can():
  assert expert_parallel.context_mesh(TOKENS) is None  # no mesh in context
  with jax.set_mesh(make_mesh(dict(data=8, fsdp=1, expert=1, tensor=1))):
    assert expert_parallel.context_mesh(TOKENS) is None  # expert axis 1
  with jax.set_mesh(make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))):
    mesh = expert_parallel.context_mesh(TOKENS)
    assert mesh is not None and mesh.shape["expert"] == 4
    assert expert_parallel.context_mesh(TOKENS + 4) is None  # 36 tokens do not split over 8 shards (e.g. decoding)


def test_moe_ffn_module_picks_up_the_mesh_in_context():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, EMBED))
  module = routing.MoEFFN(EXPERTS, MLP, capacity_factor=None, dispatch="dense")
  variables = module.init(jax.random.PRNGKey(1), x)
  apply = jax.jit(module.apply)
  y_local, _, _ = apply(variables, x)
  with jax.set_mesh(make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))):
    assert "all_to_all" in jax.jit(module.apply).lower(variables, x).as_text()
    y_sharded, _, metrics = apply(variables, x)
  np.testing.assert_allclose(y_sharded, y_local, rtol=1e-5, atol=1e-5)
  assert float(metrics["dropped_fraction"]) == 0.0


def test_engine_train_step_with_expert_parallelism(tmp_path):
  # One train.py step (the engine's Experiment API) of a tiny moe_lm with --config.mesh.expert=4 on 8 CPU devices:
  # the expert weights are sharded over 'expert' and the step exchanges tokens with all-to-all.
  config = importlib.import_module("configs.moe_mixtral").get_config()
  config.model.update(
    vocab_size=260, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32, expert_mlp_dim=8
  )
  config.data.seq_len = 8
  config.train.batch_size = 8
  config.optimizer.update(schedule="constant", warmup_steps=0)  # (a warmup would start at learning rate 0)
  config.mesh.update(data=-1, fsdp=1, expert=4, tensor=1)
  exp = trainer.Experiment(config)
  assert dict(exp.mesh.shape) == dict(data=2, fsdp=1, expert=4, tensor=1)
  batch = exp.pad(
    {
      "inputs": np.arange(64, dtype=np.int32).reshape(8, 8),
      "targets": np.arange(1, 65, dtype=np.int32).reshape(8, 8),
      "mask": np.ones((8, 8), np.float32),
      "target_bytes": np.ones((8, 8), np.float32),
    }
  )
  with mesh_context(exp.mesh):
    state, shardings = exp.init_state()
    up = state.params["layers_0"]["ffn"]["up"]
    assert up.sharding.spec[0] == "expert" and up.addressable_shards[0].data.shape[0] == EXPERTS // 4
    step = exp.make_train_step(shardings, batch)
    global_batch = sharding.global_batch(batch, exp.mesh)
    assert "all_to_all" in step.lower(state, global_batch).as_text()
    before = np.asarray(up)
    state, metrics = step(state, global_batch)
  metrics = exp.host_metrics(metrics)
  assert int(state.step) == 1 and np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert not np.allclose(np.asarray(state.params["layers_0"]["ffn"]["up"]), before)


@pytest.mark.parametrize("mode, capacity_factor", [("capacity", 1.0), ("dense", None), ("dropless", None)])
def test_data_parallel_local_dispatch_equals_one_device(mode, capacity_factor):
  """With the batch split over 8 devices and no expert axis, each device dispatches its own share of the work
  (`expert_parallel.data_parallel_capacity_ffn` / `data_parallel_ffn`): outputs, gradients and the dropped fraction
  equal the single-device dispatch, including the capacity path's dropped assignments (a skewed router), and the
  compiled expert matmuls hold 1/8 of the capacity buffers' rows."""
  module = routing.MoEFFN(EXPERTS, MLP, dispatch=mode, capacity_factor=capacity_factor)
  x = jax.random.normal(jax.random.key(3), (4, 16, EMBED)) * 3
  variables = module.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda a: a * 20 if a.ndim == 2 and a.shape[-1] == EXPERTS else a, variables)

  def loss(v):
    y, _, metrics = module.apply(v, x)
    return jnp.sum(jnp.sin(y)), (y, metrics["dropped_fraction"])

  step = jax.jit(jax.grad(loss, has_aux=True))
  ref_grads, (ref_y, ref_dropped) = step(variables)
  with jax.set_mesh(make_mesh(dict(data=8, fsdp=1, expert=1, tensor=1))):
    grads, (y, dropped) = step(variables)
    hlo = step.lower(variables).compile().as_text()
  if mode == "capacity":
    assert float(ref_dropped) > 0.05  # the skewed router overflows the buffers
    capacity = dispatch.capacity(64, K, EXPERTS, capacity_factor)  # 16 slots per expert, 2 per device
    assert f"f32[{EXPERTS},{-(-capacity // 8)},{MLP}]" in hlo and f"f32[{EXPERTS},{capacity},{MLP}]" not in hlo
  np.testing.assert_allclose(float(dropped), float(ref_dropped), atol=1e-6)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
