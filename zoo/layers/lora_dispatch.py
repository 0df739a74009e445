"""Applying E LoRA experts to tokens: the dense masked reference and the sparse grouped-matmul dispatch.

A mixture of LoRA experts (papers.md B1-B3: LoRA-Mixer, DynMoLE, GLIDER) adds to a frozen projection the routed
low-rank updates `delta_t = scale * sum_e w_te x_t A_e B_e` (Hu et al. 2021, eq. 3, one adapter per expert), with
combine weights `w [tokens, E]` from a router of `zoo.routing.lora_routers` (0 for the experts a token does not use).

- `dense_lora_experts` computes every expert on every token and weights them: what PEFT's X-LoRA does (each adapter's
  output times its per-token scaling, summed); the masked reference.
- `sparse_lora_experts` computes only the selected (token, expert) pairs: the pairs are sorted by expert
  (`zoo.routing.dispatch.sort_by_expert`, as the dropless MoE dispatch sorts them), `x A_e` is a gather-fused grouped
  matmul over the token rows (`kernels.gmm_gather`), `(x A_e) B_e` a grouped matmul (`kernels.gmm`), and the weighted
  scatter back to the tokens is `kernels.scatter_combine` (MegaBlocks, Gale et al. 2023, Sec. 5). The kernels carry
  custom VJPs, so gradients reach x, the adapters and the combine weights.

Both return the update only; the caller adds it to the base projection `x W`.
"""

import jax.numpy as jnp

from zoo import kernels
from zoo.routing import dispatch


def _check(x, lora_a, lora_b, weights, expert_ids=None):
  """Validates the shapes; returns (tokens, num_experts)."""
  if x.ndim != 2:
    raise ValueError(f"x must be [tokens, d_in], got shape {x.shape}")
  if lora_a.ndim != 3 or lora_b.ndim != 3:
    raise ValueError(
      f"lora_a must be [experts, d_in, r] and lora_b [experts, r, d_out], got {lora_a.shape} and {lora_b.shape}"
    )
  num_experts, d_in, rank = lora_a.shape
  if x.shape[1] != d_in:
    raise ValueError(f"x has d_in={x.shape[1]} but lora_a {lora_a.shape} has d_in={d_in}")
  if lora_b.shape[:2] != (num_experts, rank):
    raise ValueError(f"lora_b {lora_b.shape} must be [experts={num_experts}, r={rank}, d_out]")
  tokens = x.shape[0]
  if weights.shape != (tokens, num_experts):
    raise ValueError(f"weights must be [tokens={tokens}, experts={num_experts}], got shape {weights.shape}")
  if expert_ids is not None:
    if expert_ids.ndim != 2 or expert_ids.shape[0] != tokens or not jnp.issubdtype(expert_ids.dtype, jnp.integer):
      raise ValueError(
        f"expert_ids must be an integer [tokens={tokens}, k] array, got {expert_ids.dtype}{list(expert_ids.shape)}"
      )
  return tokens, num_experts


def dense_lora_experts(x, lora_a, lora_b, weights, scale):
  """Every LoRA expert on every token, combined with the dense weights (the masked reference; PEFT's X-LoRA).

  `y_t = scale * sum_e w_te (x_t A_e) B_e`, computed as one einsum into [tokens, E, r] and one contraction over
  (expert, rank) together, so its cost is that of one LoRA of rank E * r.

  Args:
    x: [tokens, d_in] activations.
    lora_a: [E, d_in, r] down projections.
    lora_b: [E, r, d_out] up projections.
    weights: [tokens, E] combine weights (0 for the experts a token does not use).
    scale: the LoRA scale `alpha / r` (a Python float or a scalar).

  Returns:
    [tokens, d_out], the update to add to the base projection, in the promoted dtype of x and the adapters.
  """
  _check(x, lora_a, lora_b, weights)
  h = jnp.einsum("td,edr->ter", x, lora_a)  # [tokens, E, r]
  h = h * weights.astype(h.dtype)[:, :, None]
  return jnp.einsum("ter,ero->to", h, lora_b) * jnp.asarray(scale, h.dtype)


def sparse_lora_experts(x, lora_a, lora_b, expert_ids, weights, scale, implementation=None):
  """The selected LoRA experts only, through the grouped-matmul kernels (sort by expert, two grouped matmuls, scatter).

  Equal to `dense_lora_experts` when `weights` is 0 outside the selected experts. The (token, slot) pairs are sorted by
  expert; each group's rows `x_t A_e` come from a gather-fused grouped matmul (no permuted copy of x is written), are
  multiplied by `B_e` in a second grouped matmul, and are scattered back to their tokens weighted by `scale * w_te`.
  Empty slots (-1) sort after every group, where the grouped matmuls give zero rows, and carry weight 0.

  Args:
    x: [tokens, d_in] activations.
    lora_a: [E, d_in, r] down projections.
    lora_b: [E, r, d_out] up projections.
    expert_ids: [tokens, k] int expert of each slot, -1 = empty slot (a router's `expert_ids`).
    weights: [tokens, E] combine weights (a router's `weights`); only the entries of the selected experts are read,
      so the gradient of the others is 0.
    scale: the LoRA scale `alpha / r`.
    implementation: grouped-matmul implementation (`kernels.IMPLEMENTATIONS`) or None (per backend).

  Returns:
    [tokens, d_out], the update to add to the base projection, in the promoted dtype of x and the adapters.
  """
  tokens, num_experts = _check(x, lora_a, lora_b, weights, expert_ids)
  expert_ids = expert_ids.astype(jnp.int32)
  order, row_ids, group_sizes = dispatch.sort_by_expert(expert_ids, num_experts)
  slot_weights = jnp.take_along_axis(weights, jnp.maximum(expert_ids, 0), axis=-1)
  slot_weights = jnp.where(expert_ids >= 0, slot_weights, 0.0) * scale  # [tokens, k]
  h = kernels.gmm_gather(x, row_ids, lora_a, group_sizes, implementation=implementation)  # [tokens * k, r]
  out = kernels.gmm(h, lora_b, group_sizes, implementation=implementation)  # [tokens * k, d_out]
  return kernels.scatter_combine(out, row_ids, slot_weights.reshape(-1)[order].astype(out.dtype), tokens)
