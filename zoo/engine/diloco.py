"""Low-communication training: DiLoCo, overlapped DiLoCo, FedAvg and hierarchical FedAvg (papers.md, section H).

`train(config, workdir)` for `config.train.strategy` in STRATEGIES; `zoo.engine.trainer.train` dispatches here.

The algorithm (DiLoCo, Douillard et al. 2023, Algorithm 1; OpenDiLoCo / PCCL; FedAvg, McMahan et al. 2017, Alg. 1):
M replicas (`train.replicas`) each take H (`train.inner_steps`) inner steps of the engine's own optimizer (AdamW,
`config.optimizer`) on their own share of the global batch (`train.batch_size / M` rows of every batch, in order).
At the end of a round (every H steps, and at the last step) the pseudo-gradient of replica m,
`delta_m = theta_outer - theta_m`, is averaged over the replicas and an outer optimizer applies it to theta_outer;
every replica restarts from the new theta_outer and keeps its own inner optimizer state.
- 'diloco': plain mean of the deltas; outer SGD with Nesterov momentum (`train.outer_optimizer='nesterov'`,
  `outer_lr` 0.7, `outer_momentum` 0.9), or heavy-ball SGD ('sgd'; momentum 0 = plain SGD).
- 'diloco_overlap': the outer step of round r applies the average of round r-1 (the average of round r is kept,
  `pending`, in the state and the checkpoint); round 1 applies zeros. On a real cluster the all-reduce of round r
  then runs during the inner phase of round r+1; here the delay is the algorithm, the overlap itself is not measured.
  The average of the last round stays pending (an extended run applies it).
- 'fedavg': the mean of the deltas weighted by the tokens (examples, for example-level tasks: the task's summed
  `weight`) each replica trained on in the round; theta_outer minus it (outer lr 1, no momentum; the `outer_*` keys
  are not used).
- 'fedavg_hierarchical': the same weighted mean as a two-level tree (LIFL; FL over 5G): `train.fedavg_groups` groups
  of consecutive replicas averaged first, then the group means weighted by their groups' sample counts; equal to the
  flat mean up to float32 rounding.

Non-parameter collections (BatchNorm statistics, aux-loss-free routing biases) are averaged like the parameters
(their floating leaves; integer leaves are taken from replica 0) and restart every replica [guess: the papers
train models without such state].

Layout: one mesh with axes ('replica', 'data', 'fsdp', 'expert', 'tensor'). With M <= devices, replica m is the data
sub-mesh `mesh.devices[m]` shaped by `config.mesh` over devices / M devices; with M > devices (a multiple of them),
each device holds M / devices consecutive replicas. In a multi-host run consecutive replicas belong to consecutive
processes, so with M = processes each process is one island. Replica-stacked leaves carry a leading axis of size M
sharded over 'replica'; theta_outer and the outer optimizer state are replicated over it. The inner
step is the engine's train step (`Experiment.make_train_step`) vmapped over the replica axis
(`spmd_axis_name='replica'`) under one jit; the outer step is a second jit.

Checkpoints: `WORKDIR/diloco_checkpoints` holds the whole strategy state (replica params, inner optimizer states,
theta_outer, outer optimizer state, the pending average, the round's sample counts) with every host's data-iterator
state, and `strategy.json` (strategy and replica count; a resume with another replica count or strategy is refused).
`WORKDIR/checkpoints` holds, at the same steps, an engine checkpoint of theta_outer (its AdamW state: the replicas'
inner states averaged [guess: only read when a data-parallel run resumes from it]), so `evaluate.py`, `init_from`
and the evaluators read a DiLoCo run as any other.

Communication ledger (metrics.jsonl): `comm_bytes` counts the payload bytes of each all-reduce the strategy makes at
that step, once per all-reduce (not the 2(M-1)/M factor of a ring): at an outer step the bytes of the averaged tree
(trainable parameters plus floating non-parameter collections) per aggregation level (1; 2 for the two-level tree),
0 at inner steps; FedAvg's M per-replica sample counts (4 bytes each) are not counted. `comm_bytes_total` is the
cumulative sum and `comm_bytes_data_parallel_total` what data-parallel training of the same model would have
all-reduced by this step counted the same way: the trainable-gradient bytes once per step.

Routed models (the model exposes 'expert_ids' or has router parameters): at every outer step the record holds
`replica_expert_load` [M, layers, experts] (the model's `expert_load` metric of each replica's last inner batch,
when the model reports it) and (when it has router parameters) `router_drift` = mean over replicas m of
||R_m - R_mean|| / ||R_mean||, R_m the router parameters of replica m before averaging, R_mean their unweighted mean
over replicas, norms over all router parameters together. Router parameters: those whose '/'-joined path has a component
containing 'router' (`router`, `router_gru`, `step_routers_0`, ...). Path components named 'gate' are not counted: in
this zoo 'gate' is the gate projection of every SwiGLU FFN and expert bank (`zoo/layers/mlp.py`, `moe_lm`'s `ffn/gate`),
expert weights, not routing.

Dropout and the tasks' random streams use the engine's per-step keys, the same on every replica (each replica sees
different data) [guess].
"""

import copy
import json
import os
import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from zoo.engine import partition, sharding
from zoo.engine.checkpoint import Checkpointer, CheckpointError
from zoo.engine.config import validate_config
from zoo.engine.memory import check_memory
from zoo.engine.state import TrainState, init_variables, state_shardings
from zoo.engine.trainer import (
  Experiment,
  _all_finite,
  _log,
  log_init_from,
  open_run,
  resume_data,
  run_steps,
  use_hf_model_config,
)
from zoo.models import ConfigError

STRATEGIES = ("diloco", "diloco_overlap", "fedavg", "fedavg_hierarchical")
REPLICA = "replica"
STATE_DIR = "diloco_checkpoints"
METADATA = "strategy.json"
ROUTER_PATTERN = r"(^|/)[^/]*router[^/]*(/|$)"


@flax.struct.dataclass
class DiLoCoState:
  """step: int32 scalar, inner steps taken; outer_steps: int32 scalar, outer steps taken.
  params, opt_state, collections: the replicas' trainable parameters, inner optimizer states and non-param
    collections, each leaf [M, ...].
  outer_params: theta_outer (trainable parameters); outer_opt_state: the outer optimizer's state;
  outer_collections: the non-param collections of the last outer step.
  pending: 'diloco_overlap': the averaged delta of the last round, not yet applied (params' structure); else {}.
  round_weight: [M] float32, the tokens (or examples) each replica trained on in the current round.
  frozen: the frozen parameters, shared by every replica."""

  step: jax.Array
  outer_steps: jax.Array
  params: Any
  opt_state: Any
  collections: Any
  outer_params: Any
  outer_opt_state: Any
  outer_collections: Any
  pending: Any
  round_weight: jax.Array
  frozen: Any = flax.struct.field(default_factory=dict)

  def outer_state(self):
    """theta_outer as the engine's TrainState (no optimizer state), e.g. for evaluation."""
    return TrainState(
      step=self.step, params=self.outer_params, opt_state={}, collections=self.outer_collections, frozen=self.frozen
    )

  def packed(self):
    """The state in the engine checkpoint's four parts (`Checkpointer` saves a TrainState's fields)."""
    return TrainState(
      step=self.step,
      params={"outer": self.outer_params, "replicas": self.params},
      opt_state={
        "outer": self.outer_opt_state,
        "inner": self.opt_state,
        "pending": self.pending,
        "round_weight": self.round_weight,
        "outer_steps": self.outer_steps,
      },
      collections={"outer": self.outer_collections, "replicas": self.collections},
      frozen=self.frozen,
    )

  @classmethod
  def unpacked(cls, packed):
    o = packed.opt_state
    return cls(
      step=packed.step,
      outer_steps=o["outer_steps"],
      params=packed.params["replicas"],
      opt_state=o["inner"],
      collections=packed.collections["replicas"],
      outer_params=packed.params["outer"],
      outer_opt_state=o["outer"],
      outer_collections=packed.collections["outer"],
      pending=o["pending"],
      round_weight=o["round_weight"],
      frozen=packed.frozen,
    )


def make_outer_optimizer(train_config):
  """The outer optimizer of `train_config.strategy` (an optax transformation of the averaged delta)."""
  t = train_config
  if t.strategy.startswith("fedavg"):
    return optax.sgd(1.0)
  momentum = float(t.outer_momentum) or None
  return optax.sgd(float(t.outer_lr), momentum=momentum, nesterov=t.outer_optimizer == "nesterov" and bool(momentum))


def weighted_mean(tree, weights):
  """Flat weighted mean over the leading (replica) axis.

  Args:
    tree: leaves [M, ...].
    weights: [M] non-negative, not all zero.

  Returns:
    leaves [...]: sum_m w_m x_m / sum_m w_m, in float32 (cast back to each leaf's dtype).
  """
  w = weights.astype(jnp.float32)
  total = jnp.sum(w)

  def mean(x):
    return (jnp.tensordot(w, x.astype(jnp.float32), axes=1) / total).astype(x.dtype)

  return jax.tree.map(mean, tree)


def tree_mean(tree, weights, groups):
  """The weighted mean of `weighted_mean` as a two-level tree: `groups` groups of M / groups consecutive replicas
  averaged first (weighted by their replicas' weights), then the group means weighted by their groups' total weight
  (LIFL's hierarchical aggregation). Equal to the flat mean up to float32 rounding.

  Args:
    tree: leaves [M, ...]; weights: [M]; groups: a divisor of M.
  """
  w = weights.astype(jnp.float32).reshape(groups, -1)
  group_weight = jnp.sum(w, axis=1)

  def mean(x):
    xg = x.astype(jnp.float32).reshape(groups, -1, *x.shape[1:])
    group_means = jnp.einsum("gr,gr...->g...", w, xg) / group_weight.reshape(-1, *([1] * (x.ndim - 1)))
    return (jnp.tensordot(group_weight, group_means, axes=1) / jnp.sum(group_weight)).astype(x.dtype)

  return jax.tree.map(mean, tree)


def router_mask(params):
  """{path tuple: bool} of the trainable parameters counted as router parameters (`ROUTER_PATTERN`)."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  return {p: re.search(ROUTER_PATTERN, partition.path_name(p)) is not None for p in flat}


def router_drift(replica_params, mask):
  """mean_m ||R_m - R_mean|| / ||R_mean|| over the router parameters (module docstring).

  Args:
    replica_params: trainable parameters, leaves [M, ...].
    mask: `router_mask` of the (unstacked) parameters.

  Returns:
    float32 scalar (0 when no parameter is a router parameter).
  """
  flat = traverse_util.flatten_dict(replica_params)
  leaves = [flat[p].astype(jnp.float32) for p, is_router in mask.items() if is_router]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  means = [jnp.mean(x, axis=0) for x in leaves]
  diff = jnp.sqrt(sum(jnp.sum(jnp.square(x - m[None]).reshape(x.shape[0], -1), axis=1) for x, m in zip(leaves, means)))
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(m)) for m in means))
  return jnp.mean(diff) / jnp.maximum(norm, 1e-30)


def _tree_bytes(tree):
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def _floating(x):
  return jnp.issubdtype(x.dtype, jnp.inexact)


class DiLoCo:
  """The strategy for `config` (`config.train.strategy` in STRATEGIES): mesh, replica experiment, steps, state.

  Args:
    config: the experiment config (validated here; `config.task` and, with `init_from='hf:DIR'`, `config.model` are
      filled in place).
    devices: every device of the run (default: all); M must divide their number or be a multiple of it.

  Attributes:
    exp: the engine's Experiment of ONE replica (its config: `train.strategy='data_parallel'`, `train.batch_size` /
      M), whose mesh is then replaced by the replica mesh: its model, task, optimizer and train/eval steps are used.
    mesh: the replica mesh, axes ('replica', *sharding.MESH_AXES).
  """

  def __init__(self, config, devices=None):
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    use_hf_model_config(config)
    validate_config(config, num_devices=len(devices))
    t = config.train
    if t.strategy not in STRATEGIES:
      raise ConfigError(
        f"config.train.strategy={t.strategy!r} is not a strategy of zoo.engine.diloco; allowed: "
        f"{list(STRATEGIES)} (or 'data_parallel', zoo.engine.trainer.train)"
      )
    self.config = config
    self.strategy = t.strategy
    self.replicas = m = int(t.replicas)
    self.inner_steps = int(t.inner_steps)
    self.groups = int(t.fedavg_groups) if self.strategy == "fedavg_hierarchical" else 1
    self.overlap = self.strategy == "diloco_overlap"
    self.batch_size = int(t.batch_size)
    groups = min(m, len(devices))  # the size of the 'replica' mesh axis; m / groups replicas on each group
    replica_config = copy.deepcopy(config)
    replica_config.train.strategy = "data_parallel"
    replica_config.train.batch_size = self.batch_size // m
    self.exp = exp = Experiment(replica_config, devices[: len(devices) // groups])
    shape = tuple(exp.mesh.devices.shape)
    self.mesh = Mesh(
      np.array(devices, dtype=object).reshape(groups, *shape),
      (REPLICA, *sharding.MESH_AXES),
      axis_types=(AxisType.Auto,) * (1 + len(shape)),
    )
    exp.mesh = self.mesh  # the replica experiment's state and steps now live on the replica mesh
    self.outer_tx = make_outer_optimizer(t)
    self.info = exp.info

    # Shardings: the engine's logical rules on the replica mesh (replicated over 'replica'), stacked leaves with
    # 'replica' in front.
    base = state_shardings(exp.model, exp.tx, exp.task, exp.dummy, self.mesh, exp.mask)
    boxed = jax.eval_shape(lambda r: init_variables(exp.model, exp.task, exp.dummy, r), jax.random.key(0))
    boxed_params, _ = partition.split(boxed["params"], exp.mask)
    outer_opt = sharding.logical_to_sharding(
      nn.get_partition_spec(jax.eval_shape(self.outer_tx.init, boxed_params)), self.mesh
    )
    stack = lambda tree: jax.tree.map(lambda s: NamedSharding(self.mesh, P(REPLICA, *s.spec)), tree)
    self.base_shardings = base
    self.shardings = DiLoCoState(
      step=base.step,
      outer_steps=base.step,
      params=stack(base.params),
      opt_state=stack(base.opt_state),
      collections=stack(base.collections),
      outer_params=base.params,
      outer_opt_state=outer_opt,
      outer_collections=base.collections,
      pending=base.params if self.overlap else {},
      round_weight=NamedSharding(self.mesh, P()),
      frozen=base.frozen,
    )
    shapes = jax.eval_shape(self._stack, exp.abstract_state()[0])
    self.abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.shardings
    )
    self.router_mask = router_mask(self.abstract.outer_params)
    self.routed = "expert_ids" in getattr(type(exp.model), "exposes", ()) or any(self.router_mask.values())
    # The communication ledger (module docstring).
    averaged = _tree_bytes(self.abstract.outer_params) + _tree_bytes(
      [x for x in jax.tree.leaves(self.abstract.outer_collections) if _floating(x)]
    )
    self.outer_bytes = averaged * (2 if self.strategy == "fedavg_hierarchical" else 1)
    self.grad_bytes = _tree_bytes(self.abstract.outer_params)
    local_groups = sum(
      any(d.process_index == jax.process_index() for d in self.mesh.devices[g].flat) for g in range(groups)
    )
    self.local_replicas = local_groups * (m // groups)

  # --- state ---

  def _stack(self, state):
    """A TrainState (one replica, replicated) -> the DiLoCoState of round 1: every replica a copy of it."""
    m = self.replicas
    bcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x[None], (m, *x.shape)), tree)
    return DiLoCoState(
      step=state.step,
      outer_steps=jnp.zeros((), jnp.int32),
      params=bcast(state.params),
      opt_state=bcast(state.opt_state),
      collections=bcast(state.collections),
      outer_params=state.params,
      outer_opt_state=self.outer_tx.init(state.params),
      outer_collections=state.collections,
      pending=jax.tree.map(jnp.zeros_like, state.params) if self.overlap else {},
      round_weight=jnp.zeros((m,), jnp.float32),
      frozen=state.frozen,
    )

  def init_state(self, loaded=()):
    """The state of step 0 (the engine's init for `config.seed`, with `config.init_from`'s variables overlaid),
    placed in `self.shardings`. Call inside `sharding.mesh_context(self.mesh)`."""
    state, base = self.exp.init_state()
    if loaded:
      state = self.exp.with_init_from(state, base, loaded)
    return jax.jit(self._stack, out_shardings=self.shardings)(state)

  # --- steps ---

  def _reduce_metrics(self, metrics):
    """Per-replica train-step metrics [M, ...] -> the metrics of the global batch (task sums added, aux loss, grad
    norm and model metrics averaged over replicas) plus 'replica_model': the per-replica `expert_load`."""
    out = {
      "stats": jax.tree.map(lambda x: jnp.sum(x, 0), metrics["stats"]),
      "aux_loss": jnp.mean(metrics["aux_loss"]),
      "grad_norm": jnp.mean(metrics["grad_norm"]),
      "learning_rate": metrics["learning_rate"][0],
      "model": jax.tree.map(lambda x: jnp.mean(x, 0), metrics["model"]),
    }
    if "expert_load" in metrics["model"]:
      out["replica_model"] = {"expert_load": metrics["model"]["expert_load"]}
    return out

  def inner_step(self, state, batch):
    """One inner step of every replica. batch: leaves [M, batch_size / M, ...]. Returns (state, metrics)."""
    step_fn = self.exp.make_train_step(self.exp.abstract_state()[1], self.exp.dummy).__wrapped__
    axes = TrainState(step=None, params=0, opt_state=0, collections=0, frozen=None)
    replicated = TrainState(
      step=state.step,
      params=state.params,
      opt_state=state.opt_state,
      collections=state.collections,
      frozen=state.frozen,
    )
    new, metrics = jax.vmap(step_fn, in_axes=(axes, 0), out_axes=(axes, 0), spmd_axis_name=REPLICA)(replicated, batch)
    state = state.replace(
      step=new.step,
      params=new.params,
      opt_state=new.opt_state,
      collections=new.collections,
      round_weight=state.round_weight + metrics["stats"]["weight"].astype(jnp.float32),
    )
    return state, self._reduce_metrics(metrics)

  def aggregate(self, tree, weights):
    """The strategy's mean over replicas of `tree` (leaves [M, ...]) with `weights` [M]."""
    if self.strategy == "fedavg_hierarchical":
      return tree_mean(tree, weights, self.groups)
    return weighted_mean(tree, weights)

  def outer_step(self, state):
    """The end of a round: average the replicas' deltas, apply (this round's, or with overlap the previous round's)
    average to theta_outer, restart every replica from it. Returns (state, {'router_drift': scalar})."""
    m = self.replicas
    if self.strategy.startswith("fedavg"):
      weights = state.round_weight
      weights = jnp.where(jnp.sum(weights) > 0, weights, jnp.ones_like(weights))
    else:
      weights = jnp.ones((m,), jnp.float32)
    deltas = jax.tree.map(lambda o, p: o[None] - p, state.outer_params, state.params)
    average = self.aggregate(deltas, weights)
    applied, pending = (state.pending, average) if self.overlap else (average, state.pending)
    updates, outer_opt_state = self.outer_tx.update(applied, state.outer_opt_state, state.outer_params)
    outer = optax.apply_updates(state.outer_params, updates)
    floats = jax.tree.map(lambda x: _floating(x), state.collections)
    collections = jax.tree.map(lambda x, f: self.aggregate(x, weights) if f else x[0], state.collections, floats)
    bcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x[None], (m, *x.shape)), tree)
    metrics = {"router_drift": router_drift(state.params, self.router_mask)}
    state = state.replace(
      outer_steps=state.outer_steps + 1,
      params=bcast(outer),
      outer_params=outer,
      outer_opt_state=outer_opt_state,
      collections=bcast(collections),
      outer_collections=collections,
      pending=pending,
      round_weight=jnp.zeros_like(state.round_weight),
    )
    return state, metrics

  def batch_sharding(self, ndim):
    """[M, rows, ...]: replicas over 'replica', rows over the replica's batch axes."""
    return NamedSharding(self.mesh, P(REPLICA, ("data", "fsdp", "expert"), *([None] * (ndim - 2))))

  def batch_spec(self, batch_size):
    spec = self.exp.task.batch_spec(self.info, self.config.data, batch_size)
    m = self.replicas
    return {
      k: jax.ShapeDtypeStruct((m, v.shape[0] // m, *v.shape[1:]), v.dtype, sharding=self.batch_sharding(v.ndim + 1))
      for k, v in spec.items()
    }

  def compile_steps(self):
    """(inner step, outer step), compiled ahead of time for `self.abstract`; the inner step is refused when XLA's
    estimate of its memory exceeds a device's."""
    with sharding.mesh_context(self.mesh):
      inner = (
        jax.jit(self.inner_step, out_shardings=(self.shardings, NamedSharding(self.mesh, P())), donate_argnums=0)
        .lower(self.abstract, self.batch_spec(self.batch_size))
        .compile()
      )
      outer = (
        jax.jit(self.outer_step, out_shardings=(self.shardings, NamedSharding(self.mesh, P())), donate_argnums=0)
        .lower(self.abstract)
        .compile()
      )
    check_memory(
      inner,
      self.mesh.local_devices[0],
      "train.batch_size (or raise train.grad_accum_steps or "
      "train.replicas), the input size (data.seq_len) or the model",
    )
    return inner, outer

  def replica_batch(self, batch):
    """This host's rows of a global batch (dict of numpy arrays, `weight` included) -> global arrays
    [M, batch / M, ...]: replica m trains on rows [m * batch / M, (m + 1) * batch / M) of the global batch."""
    m = self.replicas
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      local = v.reshape(self.local_replicas, -1, *v.shape[1:])
      global_shape = (m, len(v) * jax.process_count() // m, *v.shape[1:])
      out[k] = jax.make_array_from_process_local_data(self.batch_sharding(v.ndim + 1), local, global_shape)
    return out

  def make_iterator(self, split, repeat, drop_remainder=True):
    """This host's iterator over `split` with the global batch `train.batch_size` (the data a data-parallel run of
    the same config reads, in the same order)."""
    return self.exp.make_iterator(split, repeat, drop_remainder, global_batch_size=self.batch_size)

  def pad(self, batch):
    """Add the per-example `weight` and pad a short last batch with zero-weight rows (to this host's rows)."""
    return self.exp.pad(batch, rows=self.batch_size // jax.process_count())

  def make_eval_step(self):
    """A jitted `(state: TrainState of theta_outer, batch [M, rows, ...]) -> (summed weighted sums, model metrics)`:
    the engine's eval step vmapped over the replica axis, each replica scoring its rows."""
    step_fn = self.exp.make_eval_step(self.exp.abstract_state()[1], self.exp.dummy).__wrapped__

    def step(state, batch):
      stats, metrics = jax.vmap(step_fn, in_axes=(None, 0), spmd_axis_name=REPLICA)(state, batch)
      return jax.tree.map(lambda x: jnp.sum(x, 0), stats), jax.tree.map(lambda x: jnp.mean(x, 0), metrics)

    return jax.jit(step, out_shardings=NamedSharding(self.mesh, P()))

  def run_eval(self, state, eval_step):
    """Score theta_outer on `config.data.eval_split` as `Experiment.run_eval` does (the same batches)."""
    batches = self.make_iterator(self.config.data.eval_split, repeat=False, drop_remainder=False)
    return self.exp.run_eval(
      state.outer_state(), eval_step, batches, place=lambda batch: self.replica_batch(self.pad(batch))
    )

  def export_state(self, state):
    """theta_outer as the engine's TrainState (for `WORKDIR/checkpoints`): its optimizer state the replicas' inner
    states averaged (floating leaves; others from replica 0)."""
    opt_state = jax.tree.map(lambda x: jnp.mean(x, 0).astype(x.dtype) if _floating(x) else x[0], state.opt_state)
    return TrainState(
      step=state.step,
      params=state.outer_params,
      opt_state=opt_state,
      collections=state.outer_collections,
      frozen=state.frozen,
    )

  def metadata(self):
    return {
      "strategy": self.strategy,
      "replicas": self.replicas,
      "inner_steps": self.inner_steps,
      "fedavg_groups": self.groups,
    }


def _check_metadata(directory, metadata, has_steps):
  """Refuse to resume checkpoints written with another replica count or strategy; record `metadata` on a fresh
  start (primary process)."""
  path = os.path.join(directory, METADATA)
  if has_steps and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for key in ("replicas", "strategy"):
      if saved.get(key) != metadata[key]:
        raise ConfigError(
          f"config.train.{key}={metadata[key]!r} is invalid for this workdir; allowed: "
          f"{saved.get(key)!r}, the {key} of the checkpoints in {directory} (or a new workdir)"
        )
    return
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    with open(path + ".partial", "w") as f:
      json.dump(metadata, f, indent=1)
    os.replace(path + ".partial", path)


def _host_record(strategy, metrics):
  """Host metrics of a reduced inner-step metrics dict (the per-replica expert load kept apart)."""
  metrics = jax.device_get(metrics)
  replica = metrics.pop("replica_model", {})
  record = strategy.exp.host_metrics(metrics)
  return record, replica


def train(config, workdir, *, devices=None, progress=True, step=None):
  """Train (or resume) `config` with `config.train.strategy` in STRATEGIES in `workdir`; the contract of
  `zoo.engine.trainer.train` (resume from the latest or `step`, checks before the first step, saves every
  `checkpoint.every_steps`, at the end and on SIGTERM, NaN guard), with the strategy state in
  `workdir/diloco_checkpoints` and theta_outer in `workdir/checkpoints`.

  Returns:
    The final DiLoCoState.
  """
  strategy = DiLoCo(config, devices)
  exp, t = strategy.exp, config.train
  steps, h = int(t.steps), strategy.inner_steps
  with open_run(config, workdir, progress) as run:
    primary, stack, workdir = run.primary, run.stack, run.workdir
    keep, use_async = int(config.checkpoint.keep), bool(config.checkpoint.async_save)
    ckpt = Checkpointer(os.path.join(workdir, STATE_DIR), keep=keep, use_async=use_async)
    stack.callback(ckpt.close)
    export = Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep, use_async=use_async)
    stack.callback(export.close)
    train_iter = strategy.make_iterator(config.data.train_split, repeat=True)
    strategy.make_iterator(config.data.eval_split, repeat=False)  # a bad eval split fails now
    latest = ckpt.latest_step()
    if latest is None and export.latest_step() is not None:
      raise CheckpointError(
        f"{export.directory} holds checkpoints (latest step {export.latest_step()}) but "
        f"{ckpt.directory} holds no {strategy.strategy} state; allowed: a new workdir (with "
        f"config.init_from={workdir!r} to start from those weights) or "
        "train.strategy='data_parallel'"
      )
    _check_metadata(ckpt.directory, strategy.metadata(), latest is not None)
    if step is not None:
      if step not in ckpt.all_steps():
        raise CheckpointError(f"--step={step}: no such checkpoint in {ckpt.directory}; steps: {ckpt.all_steps()}")
      moved = [f"{STATE_DIR}/{name}" for name in ckpt.set_aside_after(step)] + [
        f"checkpoints/{name}" for name in export.set_aside_after(step)
      ]
      if moved:
        _log(primary, f"resuming from step {step}: later checkpoints set aside (kept) as {moved}")
      latest = step
    inner_step, outer_step = strategy.compile_steps()
    loaded = exp.load_init_from() if latest is None else []
    stack.enter_context(sharding.mesh_context(strategy.mesh))

    if latest is not None:
      packed, data_state = ckpt.restore(latest, strategy.abstract.packed())
      state = DiLoCoState.unpacked(packed)
      resume_data(train_iter, data_state, ckpt, latest, primary)
    else:
      state = strategy.init_state(loaded)
      log_init_from(loaded, primary)
    eval_step = strategy.make_eval_step()
    export_fn = jax.jit(strategy.export_state, out_shardings=strategy.base_shardings)

    def advance(step, state, batch):
      state, metrics = inner_step(state, strategy.replica_batch(strategy.pad(batch)))
      is_outer = step % h == 0 or step == steps
      record = {}
      if is_outer:
        state, outer_metrics = outer_step(state)
        if strategy.routed:
          if any(strategy.router_mask.values()):
            record["router_drift"] = float(outer_metrics["router_drift"])
          if "replica_model" in metrics:
            record["replica_expert_load"] = np.asarray(jax.device_get(metrics["replica_model"]["expert_load"]))
      return state, metrics, record, is_outer

    def communication(step, state, is_outer):
      """The communication ledger of a log record: bytes of this step's and all outer all-reduces, and what data
      parallelism would have sent."""
      outer_steps = int(jax.device_get(state.outer_steps))
      return dict(
        comm_bytes=strategy.outer_bytes if is_outer else 0,
        comm_bytes_total=outer_steps * strategy.outer_bytes,
        comm_bytes_data_parallel_total=step * strategy.grad_bytes,
        outer_steps=outer_steps,
      )

    def save(step, state):
      data_state = train_iter.get_state()
      ckpt.save(step, state.packed(), data_state)
      export.save(step, export_fn(state), data_state)

    return run_steps(
      state,
      run,
      task=exp.task,
      train_iter=train_iter,
      checkpointers=(ckpt, export),
      advance=advance,
      host_metrics=lambda metrics: _host_record(strategy, metrics)[0],
      params_finite=lambda state: bool(_all_finite((state.params, state.outer_params))),
      save=save,
      evaluate=lambda state: strategy.run_eval(state, eval_step),
      log_extras=communication,
    )
