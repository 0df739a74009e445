"""The record every model returns beside its main output."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


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
