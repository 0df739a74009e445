"""Expert parallelism: experts sharded over the 'expert' mesh axis, tokens exchanged with all-to-all.

GShard (Lepikhin et al. 2020, Sec. 2.2-3.2): every device fills capacity buffers [experts, C, embed] from its own
tokens, an all-to-all over the 'expert' axis sends each expert's buffer to the device that owns the expert, the
experts run on [local experts, devices * C, embed], and a second all-to-all brings the outputs back for the combine.
Buffers have a static size, so this uses `jax.lax.all_to_all` (available on every backend, CPU included) rather
than `ragged_all_to_all`.

Mesh axes come from the logical-axis table `zoo.layers.axes.LOGICAL_AXIS_RULES`: tokens are sharded like 'batch',
expert weights like 'expert' (and their hidden dimension like 'expert_mlp', with a psum of the partial outputs when
that axis is > 1).
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zoo.layers.axes import mesh_axes
from zoo.routing import dispatch


def _batch_shards(mesh):
  """(mesh axes of 'batch' present in `mesh`, number of token shards over them)."""
  axes = tuple(a for a in mesh_axes("batch") if a in mesh.shape)
  shards = 1
  for a in axes:
    shards *= mesh.shape[a]
  return axes, shards


def expert_devices(mesh):
  """How many devices `mesh` splits the experts over: the size of its mesh axes of 'expert' (1 = no expert
  parallelism)."""
  return math.prod(mesh.shape.get(a, 1) for a in mesh_axes("expert"))


def context_mesh(num_tokens):
  """The mesh in context (`jax.set_mesh`) when it asks for expert parallelism over `num_tokens` tokens, else None.

  Expert parallelism is used when the context mesh has an 'expert' axis of size > 1 and the tokens split evenly
  over the 'batch' mesh axes; otherwise (no mesh, expert axis 1, or e.g. a one-token decoding step that cannot be
  split) the caller runs its local dispatch.

  Args:
    num_tokens: static number of tokens of the call.

  Returns:
    The (abstract) context mesh, or None.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or expert_devices(mesh) <= 1:
    return None
  return mesh if num_tokens % _batch_shards(mesh)[1] == 0 else None


def expert_parallel_ffn(x, expert_ids, weights, expert_weights, *, mesh, activation="swiglu", capacity_factor=None):
  """Capacity-buffered expert-parallel MoE FFN over `mesh` (GShard Sec. 3.2).

  Capacity is per device: `C = ceil(capacity_factor * local_tokens * k / E)`, or local_tokens when
  `capacity_factor` is None (nothing dropped; then the result equals the unsharded dropless one).

  Args:
    x: [tokens, embed]; tokens must divide evenly over the mesh axes of 'batch'.
    expert_ids: [tokens, k] int32 (-1 = empty slot).
    weights: [tokens, k] float32 combine weights.
    expert_weights: stacked dict (see `zoo.routing.dispatch`); experts must divide evenly over the 'expert' axes.
    mesh: a jax.sharding.Mesh (or the AbstractMesh in context) with the project's axes.
    activation: expert activation name.
    capacity_factor: per-device capacity factor, or None.

  Returns:
    (y [tokens, embed] in x.dtype, metrics {'dropped_fraction': scalar over all devices}).
  """
  num_experts, _, mlp = dispatch.check_expert_weights(expert_weights, activation)
  batch_axes, shards = _batch_shards(mesh)
  (expert_axis,) = mesh_axes("expert")
  mlp_axes = tuple(a for a in mesh_axes("expert_mlp") if mesh.shape.get(a, 1) > 1)
  devices = mesh.shape[expert_axis]
  if x.shape[0] % shards:
    raise ValueError(f"{x.shape[0]} tokens cannot be split over the batch mesh axes {batch_axes} ({shards} shards)")
  if num_experts % devices:
    raise ValueError(f"{num_experts} experts cannot be split over mesh axis '{expert_axis}' of size {devices}")
  mlp_spec = mlp_axes if mlp_axes else None
  weight_specs = {
    name: P(expert_axis, mlp_spec, None) if name == "down" else P(expert_axis, None, mlp_spec)
    for name in expert_weights
  }
  token_spec = P(batch_axes, None)

  def local(x, expert_ids, weights, expert_weights):
    tokens, k = expert_ids.shape
    embed = x.shape[-1]
    cap = dispatch.capacity(tokens, k, num_experts, capacity_factor)
    slot, token_of_slot, kept = dispatch.capacity_slots(expert_ids, num_experts, cap)
    buffers = dispatch.gather_buffers(x, token_of_slot, num_experts)  # [E, C, embed]
    buffers = buffers.reshape(devices, num_experts // devices, cap, embed)
    buffers = jax.lax.all_to_all(buffers, expert_axis, 0, 0)  # [source device, local experts, C, embed]
    buffers = buffers.transpose(1, 0, 2, 3).reshape(num_experts // devices, devices * cap, embed)
    out = dispatch.expert_ffn_batched(buffers, expert_weights, activation)
    out = out.reshape(num_experts // devices, devices, cap, embed).transpose(1, 0, 2, 3)
    out = jax.lax.all_to_all(out, expert_axis, 0, 0).reshape(num_experts, cap, embed)  # back to token owners
    y = dispatch.combine_buffers(out, slot, weights)
    if mlp_axes:
      y = jax.lax.psum(y, mlp_axes)
    kept_count = jax.lax.psum(jnp.sum(kept).astype(jnp.float32), batch_axes)
    assigned = jax.lax.psum(jnp.sum(expert_ids >= 0).astype(jnp.float32), batch_axes)
    return y, 1.0 - kept_count / jnp.maximum(assigned, 1.0)

  y, dropped = jax.shard_map(
    local, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, weight_specs), out_specs=(token_spec, P())
  )(x, expert_ids, weights, expert_weights)
  return y.astype(x.dtype), {"dropped_fraction": dropped}
