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


def data_parallel_mesh(num_tokens):
  """The mesh in context when it splits `num_tokens` tokens evenly over more than one device of its 'batch' axes,
  else None. Then the local dispatch runs on each device's own tokens (`data_parallel_ffn`) rather than on the whole
  batch on every device.

  Args:
    num_tokens: static number of tokens of the call.

  Returns:
    The (abstract) context mesh, or None.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  shards = _batch_shards(mesh)[1]
  return mesh if shards > 1 and num_tokens % shards == 0 else None


def _on_batch_shards(local, mesh, x, expert_ids, weights, expert_weights):
  """`local(x, expert_ids, weights, expert_weights) -> (y, dropped_fraction)` run on each device's tokens (shard_map
  over the 'batch' mesh axes; the expert weights whole on every device): (y [tokens, embed], metrics)."""
  batch_axes, shards = _batch_shards(mesh)
  if x.shape[0] % shards:
    raise ValueError(f"{x.shape[0]} tokens cannot be split over the batch mesh axes {batch_axes} ({shards} shards)")
  token_spec = P(batch_axes, None)
  y, dropped = jax.shard_map(
    local, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, P()), out_specs=(token_spec, P())
  )(x, expert_ids, weights, expert_weights)
  return y.astype(x.dtype), {"dropped_fraction": dropped}


def data_parallel_ffn(local_ffn, x, expert_ids, weights, expert_weights, *, mesh):
  """A local dispatch whose output for a token depends on that token only ('dense', 'dropless') run on each device's
  own tokens (shard_map over the 'batch' mesh axes), the expert weights whole on every device. Under GSPMD the
  dropless sort over all tokens would run on the global batch on every device.

  Args:
    local_ffn: `(x, expert_ids, weights, expert_weights) -> (y, dropped_fraction)` on one device's tokens.
    x: [tokens, embed]; tokens must divide evenly over the mesh axes of 'batch'.
    expert_ids: [tokens, k] int32 (-1 = empty slot).
    weights: [tokens, k] float32 combine weights.
    expert_weights: stacked dict (see `zoo.routing.dispatch`).
    mesh: a jax.sharding.Mesh (or the AbstractMesh in context) with the project's axes.

  Returns:
    (y [tokens, embed], metrics {'dropped_fraction': over all devices' assignments}).
  """
  batch_axes = _batch_shards(mesh)[0]

  def local(x, expert_ids, weights, expert_weights):
    y, dropped = local_ffn(x, expert_ids, weights, expert_weights)
    assigned = jnp.sum(expert_ids >= 0).astype(jnp.float32)
    total = jax.lax.psum(assigned, batch_axes)
    return y, jax.lax.psum(dropped * assigned, batch_axes) / jnp.maximum(total, 1.0)

  return _on_batch_shards(local, mesh, x, expert_ids, weights, expert_weights)


def data_parallel_capacity_ffn(x, expert_ids, weights, expert_weights, *, mesh, activation, capacity):
  """Capacity-buffered dispatch over the whole batch (`zoo.routing.dispatch.capacity_ffn`: the same buffers, the same
  priority order and so the same dropped assignments) with its work split over the devices of the 'batch' axes.

  Every device orders all tokens' assignments (an all-gather of the int32 expert ids, a cumsum of [k * tokens,
  experts]), runs the experts on its 1/N of every expert's buffer (gathered from the all-gathered tokens), and adds
  its buffer rows into the outputs of all tokens; a reduce-scatter sums them onto the tokens' devices.

  Args:
    x: [tokens, embed]; tokens must divide evenly over the mesh axes of 'batch'.
    expert_ids: [tokens, k] int32 (-1 = empty slot).
    weights: [tokens, k] float32 combine weights.
    expert_weights: stacked dict (see `zoo.routing.dispatch`), whole on every device.
    mesh: a jax.sharding.Mesh (or the AbstractMesh in context) with the project's axes.
    activation: expert activation name.
    capacity: C, buffer slots per expert, of the whole batch.

  Returns:
    (y [tokens, embed], metrics {'dropped_fraction': scalar}).
  """
  num_experts = dispatch.check_expert_weights(expert_weights, activation)[0]
  batch_axes, shards = _batch_shards(mesh)
  tokens = x.shape[0]
  chunk = -(-capacity // shards)  # buffer slots per expert and device

  def local(x, expert_ids, weights, expert_weights):
    device = jax.lax.axis_index(batch_axes)
    all_ids = jax.lax.all_gather(expert_ids, batch_axes, tiled=True)  # [tokens, k]
    slot, token_of_slot, kept = dispatch.capacity_slots(all_ids, num_experts, capacity)
    token_of_slot = jnp.pad(
      token_of_slot.reshape(num_experts, capacity), ((0, 0), (0, chunk * shards - capacity)), constant_values=tokens
    )
    mine = jax.lax.dynamic_slice_in_dim(token_of_slot, device * chunk, chunk, axis=1)  # [E, chunk]
    all_x = jax.lax.all_gather(x, batch_axes, tiled=True)  # [tokens, embed]
    buffers = jnp.take(all_x, mine.reshape(-1), axis=0, mode="fill", fill_value=0)
    out = dispatch.expert_ffn_batched(buffers.reshape(num_experts, chunk, -1), expert_weights, activation)
    expert, position = slot // capacity, slot % capacity
    here = kept & (position // chunk == device)
    local_slot = jnp.where(here, expert * chunk + position - device * chunk, num_experts * chunk)
    all_weights = jax.lax.all_gather(weights, batch_axes, tiled=True)
    y = dispatch.combine_buffers(out, local_slot, all_weights)  # this device's part of every token's output
    y = jax.lax.psum_scatter(y, batch_axes, scatter_dimension=0, tiled=True)
    rows = jax.lax.dynamic_slice_in_dim(kept, device * expert_ids.shape[0], expert_ids.shape[0])
    kept_count = jax.lax.psum(jnp.sum(rows).astype(jnp.float32), batch_axes)
    assigned = jax.lax.psum(jnp.sum(expert_ids >= 0).astype(jnp.float32), batch_axes)
    return y, 1.0 - kept_count / jnp.maximum(assigned, 1.0)

  return _on_batch_shards(local, mesh, x, expert_ids, weights, expert_weights)


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
