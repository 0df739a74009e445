"""The one table of logical-axis rules: logical axis names of parameters and activations -> mesh axes.

Layers name their parameter and activation axes with logical names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); `LOGICAL_AXIS_RULES` maps each name onto the mesh axes `MESH_AXES`
('data', 'fsdp', 'expert', 'tensor'). Add a logical name here, never a mesh axis in a layer. The table lives below
the engine so that layers, routing and checkpoint loading can use it without importing the engine; the engine
(`zoo.engine.sharding`) builds the mesh and re-exports these names.
"""

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES = (
  ("batch", ("data", "fsdp", "expert")),
  ("length", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("expert", "expert"),
  ("expert_mlp", "tensor"),
  ("layers", None),
  ("conv_in", None),
  ("conv_out", "tensor"),
  ("norm", None),
)


def mesh_axes(logical_name, rules=LOGICAL_AXIS_RULES):
  """The mesh axes a logical axis name maps to, as a tuple (empty = replicated).

  Args:
    logical_name: a name of `rules` (e.g. 'batch', 'expert').
    rules: the logical-axis table.

  Returns:
    tuple of mesh axis names, e.g. ('data', 'fsdp', 'expert') for 'batch'.
  """
  table = dict(rules)
  if logical_name not in table:
    raise ValueError(f"logical axis {logical_name!r} is not in the logical-axis rules; known: {sorted(table)}")
  axes = table[logical_name]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_sharding(logical_specs, mesh, rules=LOGICAL_AXIS_RULES):
  """Maps a pytree of logical PartitionSpecs onto NamedShardings of `mesh`.

  Args:
    logical_specs: pytree of PartitionSpecs of logical names (e.g. `nn.get_partition_spec(boxed_variables)`).
    mesh: a jax.sharding.Mesh with the axes `MESH_AXES`.
    rules: the logical-axis table.

  Returns:
    the same pytree with a NamedSharding of `mesh` per leaf.
  """
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs, is_leaf=lambda x: isinstance(x, P))
