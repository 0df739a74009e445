"""Auxiliary router losses (papers.md A9), returned as values: the model weights and sums them."""

import jax
import jax.numpy as jnp


def expert_fraction(expert_ids, num_experts):
  """Fraction of (token, slot) assignments routed to each expert; empty slots (-1) are not counted.

  Args:
    expert_ids: [..., k] int expert ids, -1 = empty slot.
    num_experts: number of experts E.

  Returns:
    [E] float32 summing to 1 (0 everywhere if there is no assignment).
  """
  counts = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=tuple(range(expert_ids.ndim)))
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def load_balance_loss(probs, expert_ids, num_experts, *, sequence_length=None):
  """Switch Transformer load-balance loss `E * sum_e f_e P_e` (Fedus et al. 2021, Eq. 4-6).

  `f_e` is the fraction of assignments (token-slot pairs) routed to expert e (not differentiable), `P_e` the mean
  router probability of e. Its minimum under uniform routing is 1.0 for any k.

  Args:
    probs: [tokens, E] router probabilities.
    expert_ids: [tokens, k] selected experts (-1 = empty slot).
    num_experts: E.
    sequence_length: when set, tokens are consecutive sequences of this length; the loss is computed per sequence and
      averaged (the sequence-wise balance loss of DeepSeek-V3 Eq. 17-20); else over all tokens.

  Returns:
    scalar float32.
  """
  tokens = probs.shape[0]
  groups = 1
  if sequence_length is not None:
    if sequence_length < 1 or tokens % sequence_length:
      raise ValueError(f"sequence_length={sequence_length} must divide the number of tokens ({tokens})")
    groups = tokens // sequence_length
  probs = probs.astype(jnp.float32).reshape(groups, -1, num_experts)
  expert_ids = expert_ids.reshape(groups, -1, expert_ids.shape[-1])
  f = jax.vmap(lambda ids: expert_fraction(ids, num_experts))(expert_ids)  # [groups, E]
  p = jnp.mean(probs, axis=1)  # [groups, E]
  return num_experts * jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))


def router_z_loss(logits):
  """Router z-loss `mean_t logsumexp(logits_t)^2` (ST-MoE, Zoph et al. 2022, Eq. 5).

  Args:
    logits: [tokens, E] router logits.

  Returns:
    scalar float32.
  """
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(z))
