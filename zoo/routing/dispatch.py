"""Dispatch / combine: run the routed experts on their tokens and mix their outputs back.

Every dispatch mode reads only `routing.expert_ids` [tokens, k] (-1 = empty slot) and `routing.weights` [tokens, k]
(or a dense [tokens, experts] weight matrix), and computes `y_t = sum_slots w_ts * FFN_{e_ts}(x_t)`:
  - 'dense': every expert on every token, masked (reference; costs all experts).
  - 'capacity': each expert gets a buffer of C token slots, filled in priority order (all first choices before second
    choices, GShard Sec. 2.2 / Switch Sec. 2.2); one batched einsum over [experts, C, embed]; assignments past C are
    dropped and reported. The fast path on CPU.
  - 'dropless': sort the (token, slot) pairs by expert, one grouped matmul per projection, unsort. By default the
    first matmuls gather their rows in sorted order (`kernels.gmm_gather`) and the combine scatters them back
    (`kernels.scatter_combine`), so no permuted copy of the activations is written. Nothing is dropped. The path
    for accelerators.

Expert weights are a dict of stacked arrays: gated activations ('swiglu', 'reglu', 'geglu') use
`{'gate': [E, embed, mlp], 'up': [E, embed, mlp], 'down': [E, mlp, embed]}`, plain ones ('silu', 'relu', 'gelu')
use `{'up': [E, embed, mlp], 'down': [E, mlp, embed]}`.
"""

import math

import jax
import jax.numpy as jnp

from zoo import kernels

GATED_ACTIVATIONS = {"swiglu": jax.nn.silu, "reglu": jax.nn.relu, "geglu": jax.nn.gelu}
PLAIN_ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": jax.nn.gelu}
DISPATCH_MODES = ("dense", "capacity", "dropless")


def default_dispatch(backend=None):
  """'capacity' on CPU (where a grouped matmul costs about one dense matmul per expert), 'dropless' elsewhere."""
  backend = jax.default_backend() if backend is None else backend
  return "capacity" if backend == "cpu" else "dropless"


def check_expert_weights(weights, activation):
  """Validates the expert weight dict against the activation; returns (num_experts, embed, mlp)."""
  if activation in GATED_ACTIVATIONS:
    names = ("gate", "up", "down")
  elif activation in PLAIN_ACTIVATIONS:
    names = ("up", "down")
  else:
    raise ValueError(
      f"activation={activation!r} is unknown; allowed: {sorted(GATED_ACTIVATIONS) + sorted(PLAIN_ACTIVATIONS)}"
    )
  if set(weights) != set(names):
    raise ValueError(f"activation={activation!r} needs expert weights {names}, got {tuple(sorted(weights))}")
  num_experts, embed, mlp = weights["up"].shape
  if weights["down"].shape != (num_experts, mlp, embed) or (
    "gate" in weights and weights["gate"].shape != weights["up"].shape
  ):
    raise ValueError(
      f"expert weight shapes disagree: { {k: v.shape for k, v in weights.items()} }; expected "
      "gate/up [experts, embed, mlp] and down [experts, mlp, embed]"
    )
  return num_experts, embed, mlp


def _hidden(gate, up, activation):
  if activation in GATED_ACTIVATIONS:
    return GATED_ACTIVATIONS[activation](gate) * up
  return PLAIN_ACTIVATIONS[activation](up)


def expert_ffn_batched(xs, weights, activation):
  """All experts on their own token buffers: xs [E, C, embed] -> [E, C, embed]."""
  up = jnp.einsum("ecd,edm->ecm", xs, weights["up"])
  gate = jnp.einsum("ecd,edm->ecm", xs, weights["gate"]) if "gate" in weights else None
  return jnp.einsum("ecm,emd->ecd", _hidden(gate, up, activation), weights["down"])


def as_slots(routing):
  """(expert_ids [T, k] int32, weights [T, k] float32) from a Routing or a dense [T, E] weight matrix."""
  if isinstance(routing, jax.Array) or hasattr(routing, "shape"):
    if routing.ndim != 2:
      raise ValueError(f"a dense routing matrix must be [tokens, experts], got shape {routing.shape}")
    ids = jnp.where(routing != 0, jnp.arange(routing.shape[-1], dtype=jnp.int32), -1)
    return ids, routing.astype(jnp.float32)
  ids, weights = routing.expert_ids, routing.weights
  return ids.astype(jnp.int32), jnp.where(ids >= 0, weights, 0.0).astype(jnp.float32)


def dense_ffn(x, expert_ids, weights, expert_weights, activation):
  """Reference: every expert on every token, combined with the dense [tokens, E] weight matrix.

  Args:
    x: [tokens, embed]; expert_ids, weights: [tokens, k]; expert_weights: stacked dict; activation: name.

  Returns:
    (y [tokens, embed], metrics {'dropped_fraction': 0}).
  """
  num_experts = expert_weights["up"].shape[0]
  combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype))
  ys = expert_ffn_batched(jnp.broadcast_to(x, (num_experts,) + x.shape), expert_weights, activation)
  y = jnp.einsum("te,etd->td", combine.astype(ys.dtype), ys)
  return y, {"dropped_fraction": jnp.zeros((), jnp.float32)}


def capacity(tokens, k, num_experts, capacity_factor):
  """Tokens per expert buffer: `ceil(capacity_factor * tokens * k / E)`, or `tokens` (nothing dropped) if None."""
  if capacity_factor is None:
    return tokens
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0 (or None for no dropping)")
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / num_experts)))


def capacity_slots(expert_ids, num_experts, capacity_):
  """Buffer slot of every assignment, in priority order (all slot-0 choices first, then slot 1, ...).

  Args:
    expert_ids: [tokens, k] int32 (-1 = empty).
    num_experts: E.
    capacity_: C, slots per expert.

  Returns:
    slot [tokens, k] int32 in [0, E*C) for kept assignments and E*C for dropped or empty ones;
    token_of_slot [E*C] int32 token in each buffer slot, `tokens` for unused slots;
    kept [tokens, k] bool.
  """
  tokens, k = expert_ids.shape
  ids = expert_ids.T.reshape(-1)  # slot-major priority order
  one_hot = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32)  # [k*T, E]; empty slots are all-zero rows
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
  kept = (ids >= 0) & (position < capacity_)
  slot = jnp.where(kept, ids * capacity_ + position, num_experts * capacity_)
  token = jnp.tile(jnp.arange(tokens, dtype=jnp.int32), k)
  token_of_slot = jnp.full((num_experts * capacity_,), tokens, jnp.int32).at[slot].set(token, mode="drop")
  return slot.reshape(k, tokens).T, token_of_slot, kept.reshape(k, tokens).T


def gather_buffers(x, token_of_slot, num_experts):
  """x [T, embed] -> expert buffers [E, C, embed] (zeros in unused slots)."""
  buffers = jnp.take(x, token_of_slot, axis=0, mode="fill", fill_value=0)
  return buffers.reshape(num_experts, -1, x.shape[-1])


def combine_buffers(out, slot, weights):
  """Expert outputs [E, C, embed] -> y [T, embed] = sum_k weights[t, k] * out[slot[t, k]] (dropped slots give 0)."""
  flat = out.reshape(-1, out.shape[-1])
  picked = jnp.take(flat, slot, axis=0, mode="fill", fill_value=0)  # [T, k, embed]
  return jnp.einsum("tk,tkd->td", weights.astype(picked.dtype), picked)


def capacity_ffn(x, expert_ids, weights, expert_weights, activation, capacity_):
  """Capacity-buffered dispatch (GShard Sec. 2.2; Switch Transformer Sec. 2.2): gather -> batched einsum -> combine.

  Args:
    x: [tokens, embed]; expert_ids, weights: [tokens, k]; expert_weights: stacked dict; activation: name;
    capacity_: C, buffer slots per expert.

  Returns:
    (y [tokens, embed], metrics {'dropped_fraction': fraction of non-empty assignments that did not fit}).
  """
  num_experts = expert_weights["up"].shape[0]
  slot, token_of_slot, kept = capacity_slots(expert_ids, num_experts, capacity_)
  out = expert_ffn_batched(gather_buffers(x, token_of_slot, num_experts), expert_weights, activation)
  y = combine_buffers(out, slot, weights)
  assigned = jnp.sum(expert_ids >= 0)
  dropped = 1.0 - jnp.sum(kept) / jnp.maximum(assigned, 1)
  return y, {"dropped_fraction": dropped.astype(jnp.float32)}


@jax.custom_vjp
def _permute(x, perm, inverse):
  """x[perm] whose backward is the gather g[inverse] (a permutation's transpose), not a scatter-add."""
  del inverse
  return jnp.take(x, perm, axis=0)


def _permute_fwd(x, perm, inverse):
  return jnp.take(x, perm, axis=0), (perm, inverse)


def _permute_bwd(res, g):
  perm, inverse = res
  return jnp.take(g, inverse, axis=0), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


PERMUTES = ("fused", "custom_vjp", "gather")


def sort_by_expert(expert_ids, num_experts):
  """Sorts the (token, slot) pairs by expert for the grouped matmuls (MegaBlocks, Gale et al. 2023, Sec. 5).

  The sort is stable (token order within an expert) and empty slots (-1) sort last, outside every group, where the
  grouped matmuls return zeros.

  Args:
    expert_ids: [tokens, k] int expert of each slot, -1 = empty slot.
    num_experts: E.

  Returns:
    order [tokens * k] int32, the token-major (token, slot) index of each sorted row;
    row_ids [tokens * k] int32, the token of each sorted row (`order // k`; a valid token id for every row, the empty
      slots' rows included, as `kernels.gmm_gather` needs);
    group_sizes [E] int32, the rows of each expert.
  """
  k = expert_ids.shape[-1]
  key = jnp.where(expert_ids >= 0, expert_ids, num_experts).reshape(-1)  # token-major, empty slots sort last
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  group_sizes = jnp.sum(jax.nn.one_hot(key, num_experts, dtype=jnp.int32), axis=0)
  return order, order // k, group_sizes


def dropless_ffn(x, expert_ids, weights, expert_weights, activation, *, permute="fused"):
  """Dropless dispatch (MegaBlocks, Gale et al. 2023, Sec. 5): sort by expert, grouped matmuls, unsort.

  The (token, slot) pairs are sorted by expert (stable, so token order within an expert; empty slots last, outside
  every group, where the grouped matmuls return zeros). `row_ids = order // k` is the token of each sorted row.

  Args:
    x: [tokens, embed]; expert_ids, weights: [tokens, k]; expert_weights: stacked dict; activation: name.
    permute: how tokens reach the sorted order and come back:
      'fused' (default): the gate/up grouped matmuls read the token rows through `row_ids` (`kernels.gmm_gather`)
        and the combine is a weighted scatter over `row_ids` (`kernels.scatter_combine`), so no permuted copy of the
        activations is written;
      'custom_vjp': a sorted copy of the k-times repeated tokens, unsorted after the down projection; both are
        gathers whose backward gathers with the inverse permutation;
      'gather': as 'custom_vjp' with plain gathers (the backward is a scatter-add).

  Returns:
    (y [tokens, embed], metrics {'dropped_fraction': 0}).
  """
  if permute not in PERMUTES:
    raise ValueError(f"permute={permute!r} is unknown; allowed: {PERMUTES}")
  tokens, k = expert_ids.shape
  num_experts = expert_weights["up"].shape[0]
  order, row_ids, group_sizes = sort_by_expert(expert_ids, num_experts)
  if permute == "fused":
    up = kernels.gmm_gather(x, row_ids, expert_weights["up"], group_sizes)
    gate = kernels.gmm_gather(x, row_ids, expert_weights["gate"], group_sizes) if "gate" in expert_weights else None
    out = kernels.gmm(_hidden(gate, up, activation), expert_weights["down"], group_sizes)
    y = kernels.scatter_combine(out, row_ids, weights.reshape(-1)[order], tokens)
    return y, {"dropped_fraction": jnp.zeros((), jnp.float32)}
  inverse = jnp.argsort(order).astype(jnp.int32)
  x_rep = jnp.repeat(x, k, axis=0) if k > 1 else x
  if permute == "custom_vjp":
    xs = _permute(x_rep, order, inverse)
  else:
    xs = jnp.take(x_rep, order, axis=0)
  up = kernels.gmm(xs, expert_weights["up"], group_sizes)
  gate = kernels.gmm(xs, expert_weights["gate"], group_sizes) if "gate" in expert_weights else None
  out = kernels.gmm(_hidden(gate, up, activation), expert_weights["down"], group_sizes)
  if permute == "custom_vjp":
    out = _permute(out, inverse, order)
  else:
    out = jnp.take(out, inverse, axis=0)
  y = jnp.einsum("tk,tkd->td", weights.astype(out.dtype), out.reshape(tokens, k, -1))
  return y, {"dropped_fraction": jnp.zeros((), jnp.float32)}


def moe_ffn(x, routing, expert_weights, *, dispatch=None, activation="swiglu", capacity_factor=None, permute="fused"):
  """Routed expert FFN on local tokens: `y_t = sum_slots w_ts * FFN_{e_ts}(x_t)`.

  This is the local (single-program) dispatch. Expert parallelism over a mesh is
  `zoo.routing.expert_parallel.expert_parallel_ffn`; the MoE layer (`zoo.routing.MoEFFN`) chooses between the two.

  Args:
    x: [tokens, embed] activations.
    routing: a `Routing` (uses `expert_ids`, `weights` and, if set, `capacity`) or a dense [tokens, experts] weight
      matrix (zeros = not routed).
    expert_weights: stacked expert weights (see the module docstring).
    dispatch: 'dense' | 'capacity' | 'dropless', or None for `default_dispatch()`.
    activation: 'swiglu' | 'reglu' | 'geglu' | 'silu' | 'relu' | 'gelu'.
    capacity_factor: for 'capacity': buffer size factor; None = no dropping. Ignored when the routing fixes its own
      capacity (expert-choice).
    permute: 'dropless' only: 'fused' | 'custom_vjp' | 'gather' (see `dropless_ffn`).

  Returns:
    (y [tokens, embed] in x.dtype, metrics {'dropped_fraction': scalar}).
  """
  if x.ndim != 2:
    raise ValueError(f"moe_ffn expects x as [tokens, embed], got shape {x.shape}")
  num_experts, embed, _ = check_expert_weights(expert_weights, activation)
  if x.shape[-1] != embed:
    raise ValueError(f"x has embed {x.shape[-1]} but expert weights have embed {embed}")
  expert_ids, weights = as_slots(routing)
  if expert_ids.shape[0] != x.shape[0]:
    raise ValueError(f"routing has {expert_ids.shape[0]} tokens but x has {x.shape[0]}")
  if permute not in PERMUTES:
    raise ValueError(f"permute={permute!r} is unknown; allowed: {PERMUTES}")
  fixed_capacity = getattr(routing, "capacity", None)
  dispatch = default_dispatch() if dispatch is None else dispatch
  if dispatch == "dense":
    y, metrics = dense_ffn(x, expert_ids, weights, expert_weights, activation)
  elif dispatch == "capacity":
    cap = fixed_capacity or capacity(x.shape[0], expert_ids.shape[1], num_experts, capacity_factor)
    y, metrics = capacity_ffn(x, expert_ids, weights, expert_weights, activation, cap)
  elif dispatch == "dropless":
    y, metrics = dropless_ffn(x, expert_ids, weights, expert_weights, activation, permute=permute)
  else:
    raise ValueError(f"dispatch={dispatch!r} is unknown; allowed: {DISPATCH_MODES} or None (automatic)")
  return y.astype(x.dtype), metrics
