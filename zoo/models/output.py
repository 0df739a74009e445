"""The record every model returns beside its main output, and the one way models expose per-token outputs."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

INTERMEDIATES = "intermediates"


@flax.struct.dataclass
class ModelOutput:
  """What a model returns next to its logits.

  aux_loss: scalar float32, already weighted by its coefficients; the engine adds it to the task loss.
  metrics: flat dict name -> array (scalars, or per-layer vectors such as `expert_load` [layers, experts]).
  cache: the updated decoding cache when `cache=` was passed, else None.
  """

  aux_loss: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))
  metrics: dict = flax.struct.field(default_factory=dict)
  cache: Any = None


def sow_output(module, name, value):
  """Sows a per-token output into the 'intermediates' collection of `module`, storing the array itself.

  Unlike Flax's default `sow` (which appends to a tuple), the entry IS the array: after
  `_, state = model.apply(variables, tokens, mutable=['intermediates'])`, `state['intermediates'][name]` is the value
  (a second sow under the same name in one call replaces it). When 'intermediates' is not mutable nothing is stored
  and a callable `value` is not called, so the output costs nothing.

  Args:
    module: the Linen module sowing (a model sows at its top level, under a name of its `exposes`).
    name: the entry's name.
    value: the array, or a function of no arguments returning it (computed only when it is stored).

  Returns:
    True when the value was stored.
  """
  if not module.is_mutable_collection(INTERMEDIATES):
    return False
  if callable(value):
    value = value()
  return module.sow(INTERMEDIATES, name, value, reduce_fn=lambda _, x: x, init_fn=lambda: None)
