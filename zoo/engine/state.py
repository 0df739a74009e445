"""The train state, created already sharded over the mesh."""
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from zoo.engine import sharding


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params: the 'params' collection; opt_state: optax state; collections: every other Linen
  collection the model keeps (e.g. `batch_stats`, `routing_state`), updated by the train step, not the optimizer."""
  step: jax.Array
  params: Any
  opt_state: Any
  collections: Any

  def variables(self):
    return {"params": self.params, **self.collections}


def _init_fn(model, tx, task, dummy_batch):
  """`dummy_batch`: arrays or ShapeDtypeStructs; zeros of their shapes are made inside the traced init."""
  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    batch = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), dummy_batch)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, task.inputs(batch),
                           deterministic=True)
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      collections=variables)
  return init


def state_shardings(model, tx, task, dummy_batch, mesh):
  """NamedShardings of the train state from the logical axis names the model gives its parameters.

  Optimizer moments inherit their parameter's names (optax maps over the boxed tree); everything without names is
  replicated.
  """
  abstract = jax.eval_shape(_init_fn(model, tx, task, dummy_batch), jax.random.key(0))
  return sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)


def create_train_state(model, tx, task, dummy_batch, mesh, rng):
  """Initialise the state directly into its shardings (no full copy on one device).

  Returns:
    (state, shardings) with `shardings` a TrainState of NamedShardings.
  """
  shardings = state_shardings(model, tx, task, dummy_batch, mesh)
  init = _init_fn(model, tx, task, dummy_batch)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(model, tx, task, dummy_batch, mesh):
  """ShapeDtypeStructs with target shardings, the template for restoring a checkpoint onto `mesh`."""
  shardings = state_shardings(model, tx, task, dummy_batch, mesh)
  shapes = jax.eval_shape(lambda r: nn.unbox(_init_fn(model, tx, task, dummy_batch)(r)), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings), shardings
