"""The one mesh, and the engine's access to the one table of logical-axis rules.

Layers name their parameter and activation axes with logical names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); the table `LOGICAL_AXIS_RULES` (in `zoo.layers.axes`, re-exported here with
`MESH_AXES` and `logical_to_sharding`) maps them onto the mesh axes ('data', 'fsdp', 'expert', 'tensor').
"""

import contextlib
import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

# The logical-axis table lives below the engine (layers, routing and checkpoints use it); re-exported here.
from zoo.layers.axes import LOGICAL_AXIS_RULES, MESH_AXES, logical_to_sharding  # noqa: F401


def resolve_mesh_shape(mesh_config, num_devices):
  """Sizes for MESH_AXES from `config.mesh` (-1 = the rest). Raises ValueError naming the bad key."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size} is invalid; use a positive size or -1 for the rest")
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: {num_devices} devices cannot be split with fixed axes {sizes}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
      f"config.mesh {sizes} uses {math.prod(sizes.values())} devices but {num_devices} exist; "
      "set one axis to -1 to take the rest"
    )
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_config, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh, ndim):
  """Shard the leading (batch) axis over data, fsdp and expert; replicate the rest."""
  return NamedSharding(mesh, P(("data", "fsdp", "expert"), *([None] * (ndim - 1))))


def replicated(mesh):
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def mesh_context(mesh, rules=LOGICAL_AXIS_RULES):
  """Make `mesh` and the logical-axis rules current, so `nn.with_logical_constraint` in layers takes effect."""
  import flax.linen as nn

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def global_batch(batch, mesh):
  """Turn this host's share of a batch (dict of numpy arrays) into global arrays sharded over the batch axes."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v)) for k, v in batch.items()
  }
