"""Low-communication strategies (`zoo.engine.diloco`): DiLoCo with M=1, H=1, outer lr 1 and no momentum is plain
training; the two-level FedAvg tree equals the flat mean; each strategy's outer step applies the right average (the
overlapped one the previous round's); a crash in the middle of an inner phase resumes to the losses of an
uninterrupted run; the MoE as 4 replicas x 2 devices logs router drift and per-replica expert load; bad input fails in
one line; two processes, each one island of replicas, train as one process."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.moe_mixtral import get_config as moe_config
from test_engine import losses, tiny_config
from zoo.engine import diloco, sharding, trainer
from zoo.engine.checkpoint import Checkpointer
from zoo.engine.config import validate_config
from zoo.engine.writers import read_metrics
from zoo.models import ConfigError


def config(strategy, replicas, inner_steps, steps=4, **train):
  """The engine tests' tiny dense LM; with 'constant' (after warmup) the learning rate does not depend on
  train.steps, so runs of different lengths share their compiled steps."""
  c = tiny_config(steps=steps)
  c.optimizer.schedule = "constant"
  c.train.update(strategy=strategy, replicas=replicas, inner_steps=inner_steps, **train)
  return c


def records(workdir):
  return {r["step"]: r for r in read_metrics(workdir)}


def test_one_replica_one_inner_step_outer_lr_1_is_plain_training(tmp_path):
  one = jax.devices()[:1]
  plain = trainer.train(config("data_parallel", 1, 1), str(tmp_path / "plain"), devices=one, progress=False)
  c = config("diloco", 1, 1, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0)
  state = trainer.train(c, str(tmp_path / "diloco"), devices=one, progress=False)
  a, b = losses(tmp_path / "plain"), losses(tmp_path / "diloco")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(plain.params), jax.tree.leaves(state.outer_params)):
    np.testing.assert_allclose(y, x, atol=1e-6)
  r = records(tmp_path / "diloco")
  np.testing.assert_allclose(r[4]["eval_loss"], records(tmp_path / "plain")[4]["eval_loss"], rtol=1e-5)
  # The ledger: with H=1 an outer step every step, each all-reducing the parameter bytes (= the gradient bytes).
  n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(plain.params))
  assert [r[s]["comm_bytes"] for s in (1, 2, 3, 4)] == [n] * 4
  assert r[4]["comm_bytes_total"] == r[4]["comm_bytes_data_parallel_total"] == 4 * n
  # evaluate.py reads theta_outer from WORKDIR/checkpoints like any run.
  step, results, _ = trainer.evaluate(c, str(tmp_path / "diloco"), devices=one)
  assert step == 4
  np.testing.assert_allclose(results["loss"], r[4]["eval_loss"], rtol=1e-5)


def test_fedavg_two_level_tree_equals_the_flat_weighted_mean():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(8, 5, 3)).astype(np.float32), "b": {"c": rng.normal(size=(8, 7)).astype(np.float32)}}
  weights = rng.integers(1, 1000, size=8).astype(np.float32)
  flat = diloco.weighted_mean(tree, jnp.asarray(weights))
  want = jax.tree.map(lambda x: np.tensordot(weights.astype(np.float64), x.astype(np.float64), 1) / weights.sum(), tree)
  for groups in (1, 2, 4, 8):
    two_level = diloco.tree_mean(tree, jnp.asarray(weights), groups)
    for x, y, z in zip(jax.tree.leaves(flat), jax.tree.leaves(two_level), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, z, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=2e-7)  # float32 rounding apart


def _perturbed(strategy, state, scale):
  """The state with replica m's params = theta_outer + scale * (m + 1) * noise."""
  leaves, treedef = jax.tree.flatten(state.outer_params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noise = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  m = strategy.replicas
  factors = jnp.arange(1, m + 1, dtype=jnp.float32) * scale
  params = [x[None] + factors.reshape(-1, *([1] * x.ndim)) * n[None] for x, n in zip(leaves, noise)]
  return state.replace(params=jax.tree.unflatten(treedef, params))


@pytest.mark.parametrize("name", ["diloco", "diloco_overlap", "fedavg", "fedavg_hierarchical"])
def test_outer_step_applies_the_right_average(name):
  c = config(name, 2, 4, steps=9, fedavg_groups=2 if name == "fedavg_hierarchical" else 1)
  strategy = diloco.DiLoCo(c, jax.devices()[:2])
  outer_step = jax.jit(strategy.outer_step)
  with sharding.mesh_context(strategy.mesh):
    state = strategy.init_state()
    theta0 = state.outer_params
    state = _perturbed(strategy, state, 1e-2).replace(round_weight=jnp.array([100.0, 300.0]))
    fedavg = name.startswith("fedavg")
    w = np.array([0.25, 0.75]) if fedavg else np.array([0.5, 0.5])
    delta1 = jax.tree.map(lambda o, p: np.tensordot(w, o[None] - p, 1), theta0, state.params)
    state, _ = outer_step(state)
    for p, o in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.outer_params)):
      np.testing.assert_array_equal(p, np.broadcast_to(o, p.shape))  # every replica restarts from theta_outer
    np.testing.assert_array_equal(state.round_weight, [0.0, 0.0])
    tx = optax.sgd(1.0) if fedavg else optax.sgd(0.7, momentum=0.9, nesterov=True)
    ref_opt = tx.init(theta0)
    applied1 = jax.tree.map(np.zeros_like, delta1) if name == "diloco_overlap" else delta1
    updates, ref_opt = tx.update(applied1, ref_opt, theta0)
    theta1 = optax.apply_updates(theta0, updates)
    for x, y in zip(jax.tree.leaves(state.outer_params), jax.tree.leaves(theta1)):
      np.testing.assert_allclose(x, y, atol=1e-6)
    if name == "diloco_overlap":
      for x, y in zip(jax.tree.leaves(state.pending), jax.tree.leaves(delta1)):
        np.testing.assert_allclose(x, y, atol=1e-7)  # round 1 applies nothing and keeps its average pending
    # Round 2: the overlapped variant applies round 1's average, the others round 2's.
    state = _perturbed(strategy, state, 2e-2).replace(round_weight=jnp.array([100.0, 300.0]))
    delta2 = jax.tree.map(lambda o, p: np.tensordot(w, o[None] - p, 1), theta1, state.params)
    state, _ = outer_step(state)
    updates, _ = tx.update(delta1 if name == "diloco_overlap" else delta2, ref_opt, theta1)
    theta2 = optax.apply_updates(theta1, updates)
    for x, y in zip(jax.tree.leaves(state.outer_params), jax.tree.leaves(theta2)):
      np.testing.assert_allclose(x, y, atol=1e-6)
    assert int(state.outer_steps) == 2


def _crash_at(monkeypatch, n):
  original = diloco.DiLoCo.compile_steps

  def compile_steps(self):
    inner, outer = original(self)
    calls = [0]

    def wrapped(state, batch):
      calls[0] += 1
      if calls[0] == n:
        raise RuntimeError("simulated crash")
      return inner(state, batch)

    return wrapped, outer

  monkeypatch.setattr(diloco.DiLoCo, "compile_steps", compile_steps)


def test_crash_in_an_inner_phase_resumes_to_the_same_losses(tmp_path, monkeypatch):
  # diloco_overlap (its pending average must be in the checkpoint), 4 replicas on 2 devices (2 on each), H=4, a
  # checkpoint every 3 steps. The first run crashes in step 5 and resumes from step 3 (inside round 1); the second
  # crashes in step 7 and resumes from step 6 (inside round 2, with round 1's average pending).
  devices = jax.devices()[:2]
  c = config("diloco_overlap", 4, 4, steps=9)
  c.checkpoint.every_steps = 3
  ref = trainer.train(c, str(tmp_path / "ref"), devices=devices, progress=False)
  leaf = jax.tree.leaves(ref.params)[0]
  assert leaf.shape[0] == 4 and leaf.sharding.spec[0] == "replica" and leaf.sharding.mesh.shape["replica"] == 2
  run = tmp_path / "run"
  for crash_call in (5, 4):  # the n-th inner step of the run: step 5, then step 7 (the 4th after step 3)
    with monkeypatch.context() as m:
      _crash_at(m, crash_call)
      with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(c, str(run), devices=devices, progress=False)
  assert Checkpointer(str(run / "diloco_checkpoints")).latest_step() == 6
  state = trainer.train(c, str(run), devices=devices, progress=False)
  a, b = records(tmp_path / "ref"), records(run)
  assert sorted(a) == sorted(b) == list(range(1, 10))
  for key in ("loss", "comm_bytes", "comm_bytes_total", "outer_steps"):
    np.testing.assert_allclose([b[s][key] for s in a], [a[s][key] for s in a], rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(b[9]["eval_loss"], a[9]["eval_loss"], rtol=1e-6)
  assert [s for s in a if a[s]["comm_bytes"]] == [4, 8, 9]  # rounds end every H steps and at the last step
  for x, y in zip(
    jax.tree.leaves((ref.outer_params, ref.pending)), jax.tree.leaves((state.outer_params, state.pending))
  ):
    np.testing.assert_allclose(y, x, atol=1e-6)
  # Resuming with another replica count or strategy is refused, naming what is allowed.
  other = config("diloco_overlap", 2, 4, steps=12)
  with pytest.raises(ConfigError, match=r"config.train.replicas=2 is invalid for this workdir; allowed: 4"):
    trainer.train(other, str(run), devices=devices, progress=False)
  other = config("diloco", 4, 4, steps=12)
  with pytest.raises(ConfigError, match=r"config.train.strategy='diloco' is invalid .* allowed: 'diloco_overlap'"):
    trainer.train(other, str(run), devices=devices, progress=False)


def test_moe_as_four_replicas_of_two_devices_logs_router_drift_and_expert_load(tmp_path):
  # The 8 CPU devices as 4 replicas x 2 (each replica a data=2 sub-mesh), the Mixtral-style MoE, hierarchical FedAvg
  # over 2 groups of 2.
  c = moe_config()
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=64, expert_mlp_dim=32, num_experts=4)
  c.data.seq_len = 16
  c.train.update(
    steps=3,
    batch_size=16,
    log_every_steps=1,
    eval_every_steps=0,
    eval_batches=1,
    strategy="fedavg_hierarchical",
    replicas=4,
    inner_steps=2,
    fedavg_groups=2,
  )
  c.checkpoint.update(every_steps=0, async_save=False)
  c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  state = trainer.train(c, str(tmp_path), progress=False)
  leaf = state.params["layers_0"]["ffn"]["router"]["kernel"]
  assert leaf.shape == (4, 32, 4) and leaf.sharding.spec[0] == "replica"
  assert dict(leaf.sharding.mesh.shape) == {"replica": 4, "data": 2, "fsdp": 1, "expert": 1, "tensor": 1}
  assert len(leaf.sharding.device_set) == 8
  r = records(tmp_path)
  assert sorted(r) == [1, 2, 3] and all(np.isfinite(r[s]["loss"]) for s in r)
  assert "router_drift" not in r[1] and r[1]["comm_bytes"] == 0
  assert 0 < r[2]["router_drift"] < 1 and 0 < r[3]["router_drift"] < 1  # rounds end at step 2 and the last step
  assert np.shape(r[2]["replica_expert_load"]) == (4, 1, 4)
  np.testing.assert_allclose(np.sum(r[2]["replica_expert_load"], -1), 1.0, rtol=1e-5)
  n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.outer_params))
  assert r[2]["comm_bytes"] == 2 * n  # the tree all-reduces at two levels
  assert r[3]["comm_bytes_total"] == 4 * n and r[3]["comm_bytes_data_parallel_total"] == 3 * n


def test_router_drift_rule():
  params = {
    "layers_0": {"ffn": {"router": {"kernel": jnp.zeros((4, 2))}, "gate": jnp.zeros((2, 4, 4))}},
    "step_routers_0": {"out": {"kernel": jnp.zeros((4, 1))}},
  }
  mask = diloco.router_mask(params)
  assert sorted("/".join(p) for p, v in mask.items() if v) == [
    "layers_0/ffn/router/kernel",
    "step_routers_0/out/kernel",
  ]
  base = {
    "layers_0": {"ffn": {"router": {"kernel": jnp.ones((4, 2))}, "gate": jnp.ones((2, 4, 4))}},
    "step_routers_0": {"out": {"kernel": jnp.ones((4, 1))}},
  }
  # Two replicas at mean +-0.1 * ones: each is 0.1 * sqrt(12) from the mean, whose norm is sqrt(12).
  stacked = jax.tree.map(lambda x: jnp.stack([0.9 * x, 1.1 * x]), base)
  np.testing.assert_allclose(diloco.router_drift(stacked, mask), 0.1, rtol=1e-5)


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      dict(strategy="local_sgd"),
      r"config.train.strategy='local_sgd' is invalid; allowed: \['data_parallel', "
      r"'diloco', 'diloco_overlap', 'fedavg', 'fedavg_hierarchical'\]",
    ),
    (dict(replicas=3), r"config.train.replicas=3 is invalid; allowed: a divisor of train.batch_size=16"),
    (
      dict(replicas=3, batch_size=24),
      r"config.train.replicas=3 is invalid; allowed: a divisor of the 8 devices .* "
      r"or a multiple of them",
    ),
    (
      dict(replicas=4, batch_size=4),
      r"config.train.batch_size=4 is invalid; allowed: a multiple of "
      r"grad_accum_steps x replicas x",
    ),
    (dict(inner_steps=0), r"config.train.inner_steps=0 is invalid; allowed: >= 1"),
    (dict(outer_optimizer="adam"), r"config.train.outer_optimizer='adam' is invalid; allowed: \['nesterov', 'sgd'\]"),
    (dict(outer_momentum=1.0), r"config.train.outer_momentum=1.0 is invalid; allowed: \[0, 1\)"),
    (
      dict(strategy="fedavg_hierarchical", replicas=4, fedavg_groups=3),
      r"config.train.fedavg_groups=3 is invalid; allowed: a divisor of train.replicas=4",
    ),
  ],
)
def test_bad_strategy_configs_fail_in_one_line(edit, message):
  c = config("diloco", 2, 2)
  c.train.update(**edit)
  with pytest.raises(ConfigError, match=message) as e:
    validate_config(c, num_devices=8)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_two_processes_each_one_island_match_one_process(tmp_path, monkeypatch):
  # jax.distributed: 2 train.py processes of 1 CPU device each and 4 replicas, so each process is one island of 2
  # replicas, == one process with 2 devices fed the same global batches (host 0's rows, then host 1's: replicas 0-1
  # train on host 0's rows). The reference compiles what the crash test compiled (same model, M, devices).
  from test_multihost import TwoHostIterator, launch_two_processes
  from zoo.data import make_iterator

  def two_host(self, split, repeat, drop_remainder=True):
    return TwoHostIterator(
      make_iterator,
      data_config=self.config.data,
      split=split,
      global_batch_size=self.batch_size,
      seed=int(self.config.seed),
      repeat=repeat,
      drop_remainder=drop_remainder,
    )

  c = config("diloco", 4, 2, steps=3)
  monkeypatch.setattr(diloco.DiLoCo, "make_iterator", two_host)
  trainer.train(c, str(tmp_path / "ref"), devices=jax.devices()[:2], progress=False)
  launch_two_processes(
    tmp_path / "run",
    {
      "model.num_layers": 1,
      "model.embed_dim": 32,
      "model.num_heads": 2,
      "model.num_kv_heads": 1,
      "model.mlp_dim": 64,
      "data.seq_len": 16,
      "train.steps": 3,
      "train.batch_size": 16,
      "train.log_every_steps": 1,
      "train.eval_every_steps": 0,
      "train.eval_batches": 2,
      "optimizer.lr": 0.01,
      "optimizer.warmup_steps": 2,
      "optimizer.schedule": "constant",
      "checkpoint.every_steps": 0,
      "checkpoint.async_save": False,
      "train.strategy": "diloco",
      "train.replicas": 4,
      "train.inner_steps": 2,
    },
    devices_per_process=1,
  )
  a, b = records(tmp_path / "ref"), records(tmp_path / "run")
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for key in ("loss", "comm_bytes_total"):
    np.testing.assert_allclose([b[s][key] for s in a], [a[s][key] for s in a], rtol=2e-5, err_msg=key)
  np.testing.assert_allclose(b[3]["eval_loss"], a[3]["eval_loss"], rtol=2e-5)
  for i in range(2):  # every process saved its own share of the input pipeline
    assert (tmp_path / "run" / "diloco_checkpoints" / "3" / "data" / f"process_{i}-of-2.json").exists()
