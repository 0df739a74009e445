"""The train state, created already sharded over the mesh."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from zoo.engine import partition, sharding


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params: the trainable parameters (the whole 'params' collection unless some are frozen);
  frozen: the frozen parameters (disjoint paths, `zoo.engine.partition`; {} when none); opt_state: optax state of
  `params` only; collections: every other Linen collection the model keeps (e.g. `batch_stats`, `routing_state`),
  updated by the train step, not the optimizer."""

  step: jax.Array
  params: Any
  opt_state: Any
  collections: Any
  frozen: Any = flax.struct.field(default_factory=dict)

  def variables(self):
    """The model's variables: {'params': trainable and frozen merged, <collection>: ...}."""
    return {"params": partition.merge(self.params, self.frozen), **self.collections}


def init_variables(model, task, batch_spec, rng):
  """The model's variables from `model.init` on zeros of `batch_spec`'s shapes (made inside the trace)."""
  params_rng, dropout_rng = jax.random.split(rng)
  batch = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), batch_spec)
  inputs, _ = task.prepare(batch, {name: jax.random.key(0) for name in task.rng_streams})
  return dict(model.init({"params": params_rng, "dropout": dropout_rng}, **inputs, deterministic=True))


def _init_fn(model, tx, task, dummy_batch, mask):
  """`dummy_batch`: ShapeDtypeStructs; `mask`: {param path: trainable} (`partition.trainable_mask`)."""

  def init(rng):
    variables = init_variables(model, task, dummy_batch, rng)
    params, frozen = partition.split(variables.pop("params"), mask)
    frozen = partition.store_frozen(model, frozen)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), collections=variables, frozen=frozen
    )

  return init


def state_shardings(model, tx, task, dummy_batch, mesh, mask):
  """NamedShardings of the train state from the logical axis names the model gives its parameters.

  Optimizer moments inherit their parameter's names (optax maps over the boxed tree); everything without names is
  replicated.
  """
  abstract = jax.eval_shape(_init_fn(model, tx, task, dummy_batch, mask), jax.random.key(0))
  return sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)


def create_train_state(model, tx, task, dummy_batch, mesh, mask, rng):
  """Initialise the state directly into its shardings (no full copy on one device).

  Returns:
    (state, shardings) with `shardings` a TrainState of NamedShardings.
  """
  shardings = state_shardings(model, tx, task, dummy_batch, mesh, mask)
  init = _init_fn(model, tx, task, dummy_batch, mask)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(model, tx, task, dummy_batch, mesh, mask):
  """ShapeDtypeStructs with target shardings, the template for restoring a checkpoint onto `mesh`."""
  shardings = state_shardings(model, tx, task, dummy_batch, mesh, mask)
  shapes = jax.eval_shape(lambda r: nn.unbox(_init_fn(model, tx, task, dummy_batch, mask)(r)), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings), shardings
