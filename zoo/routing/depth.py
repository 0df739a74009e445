"""Depth routing: which tokens run which recursion of a shared block.

Mixture-of-Recursions (Bae et al., 2025, "Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive
Token-Level Computation"; papers.md A1):
- expert-choice (Sec. 2.2.1): one router per recursion step scores the tokens still active,
  `g = gate_scale * sigmoid(W h)` (the paper's alpha); step r keeps the top `k_r = int(cap_r * T)` of the tokens kept
  at step r-1 (hierarchical), in causal order; default `cap_r = (N_r - r) / N_r`, optional cosine warm-up of the
  capacity from 1. The authors evaluate with the same top-k; top-k over the sequence sees the future, so decoding
  decides per token: an auxiliary BCE loss, in every recursion (recursion 0 included), teaches
  `sigmoid(logit) >= 0.5` to mean "chosen" (or a separate auxiliary router learns it on detached states).
- token-choice (Sec. 2.2.1): one router before the recursions, softmax (or sigmoid) over the N_r depths, top-1 depth.
Authors' code: github raymin0223/mixture_of_recursions, `model/mor_model/expert_choice_router.py` and
`model/mor_model/token_choice_router.py`.

Pure functions over arrays, routing math in float32; `DepthRouter` only owns parameters. The load-balance loss,
router z-loss and loss-free bias update of token-choice live in the rest of `zoo/routing` and are reused from there.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class DepthRouter(nn.Module):
  """Router logits of MoR (papers.md A1): Linear(d -> out, no bias) or MLP d -> 2d -> GELU -> out.

  Attributes:
    num_outputs: 1 for an expert-choice step router, N_r for the token-choice router.
    arch: 'linear' or 'mlp'.
  """

  num_outputs: int
  arch: str = "linear"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    """h: [..., embed] -> logits [..., num_outputs] float32."""
    if self.arch not in ("linear", "mlp"):
      raise ValueError(f"router arch={self.arch!r} is invalid; choose 'linear' or 'mlp'")
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None))
    if self.arch == "mlp":
      hidden_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "mlp"))
      h = nn.gelu(
        nn.Dense(2 * h.shape[-1], use_bias=False, dtype=self.dtype, kernel_init=hidden_init, name="hidden")(h)
      )
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("mlp", None))
    logits = nn.Dense(self.num_outputs, use_bias=False, dtype=self.dtype, kernel_init=init, name="out")(h)
    return logits.astype(jnp.float32)


def default_capacities(num_recursions: int) -> tuple:
  """MoR's default capacity schedule `cap_r = (N_r - r) / N_r` (1, 2/3, 1/3 for N_r = 3)."""
  if num_recursions < 1:
    raise ValueError(f"num_recursions={num_recursions} is invalid; it must be >= 1")
  return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))


def validate_capacities(capacities: Sequence[float], num_recursions: int) -> tuple:
  """Checks a capacity schedule: N_r values in (0, 1], non-increasing (a token continues only if chosen before)."""
  capacities = tuple(float(c) for c in capacities)
  if len(capacities) != num_recursions:
    raise ValueError(f"capacities={capacities} must have num_recursions={num_recursions} entries")
  if any(not 0.0 < c <= 1.0 for c in capacities):
    raise ValueError(f"capacities={capacities} must lie in (0, 1]")
  if any(b > a for a, b in zip(capacities, capacities[1:])):
    raise ValueError(f"capacities={capacities} must be non-increasing (hierarchical selection)")
  return capacities


def capacity_at_step(capacities: Sequence[float], step=None, warmup_steps: int = 0):
  """Capacity per recursion at a training step, with MoR's optional cosine warm-up from 1 (authors' code).

  Args:
    capacities: the target capacities, N_r floats.
    step: the training step (int or traced scalar); None or warmup_steps == 0 gives the targets.
    warmup_steps: steps over which the capacity decays from 1 to its target along a half cosine.

  Returns:
    [N_r] float32 capacities.
  """
  target = jnp.asarray(capacities, jnp.float32)
  if step is None or warmup_steps <= 0:
    return target
  ratio = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
  decay = 0.5 * (1.0 + jnp.cos(jnp.pi * ratio))
  return target + (1.0 - target) * decay


def capacity_to_k(capacity, seq_len: int):
  """Tokens kept per sequence: `max(1, int(capacity * seq_len))`; a Python int when capacity is a Python float."""
  if isinstance(capacity, (int, float)):
    return max(1, int(math.floor(capacity * seq_len + 1e-6)))
  return jnp.maximum(1, jnp.floor(capacity * seq_len + 1e-6).astype(jnp.int32))


def hierarchical_topk(scores, prev_active, k):
  """Expert-choice selection of one recursion step: the top-k of the previously active tokens.

  Ties go to the earlier position. Tokens outside `prev_active` are never chosen, so a token continues only if it was
  chosen at every earlier step.

  Args:
    scores: [batch, length] router scores.
    prev_active: [batch, length] bool, tokens chosen at the previous step (all True at step 0).
    k: tokens to keep per sequence (Python int or traced int scalar).

  Returns:
    chosen: [batch, length] bool, at most k True per row.
  """
  masked = jnp.where(prev_active, scores.astype(jnp.float32), -jnp.inf)
  order = jnp.argsort(-masked, axis=-1, stable=True)  # best first
  rank = jnp.argsort(order, axis=-1)  # rank of each position
  return prev_active & (rank < k)


def chosen_indices(chosen, k: int):
  """Positions of the chosen tokens in causal (increasing) order.

  Args:
    chosen: [batch, length] bool with exactly k True per row.
    k: static count.

  Returns:
    [batch, k] int32 sorted positions.
  """
  return jnp.argsort(~chosen, axis=-1, stable=True)[:, :k].astype(jnp.int32)


def causal_decision(logits, prev_active):
  """Expert-choice decision made per token without seeing the future: `sigmoid(logit) >= 0.5` (decoding with a
  cache, and evaluation with the causal rule; the authors only use it as the accuracy metric of the BCE).

  Args:
    logits: [batch, length] logits of the router trained with `bce_aux_loss` (or of the auxiliary router).
    prev_active: [batch, length] bool.

  Returns:
    [batch, length] bool.
  """
  return prev_active & (logits >= 0.0)


def bce_aux_loss(logits, targets, valid):
  """Mean binary cross-entropy with logits between router logits and the 0/1 "was in the top-k" target.

  MoR's "aux_loss" sampling (Sec. 2.2.1): over the tokens the step scored (those active at the previous step), the
  authors' `BCEWithLogitsLoss(reduction="sum")` divided by batch x scored tokens (`expert_choice_router.py`).

  Args:
    logits: [batch, length] router logits.
    targets: [batch, length] bool, chosen by top-k.
    valid: [batch, length] bool or float, tokens that count.

  Returns:
    scalar float32.
  """
  logits = logits.astype(jnp.float32)
  per_token = jnp.maximum(logits, 0) - logits * targets.astype(jnp.float32) + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  valid = valid.astype(jnp.float32)
  return jnp.sum(per_token * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def token_choice_route(logits, func: str = "softmax", bias=None):
  """Token-choice depth routing: top-1 of N_r depths per token.

  Args:
    logits: [batch, length, N_r] router logits.
    func: 'softmax' or 'sigmoid' for the probabilities.
    bias: optional [N_r] loss-free balancing bias, added for the choice only (not to the weight).

  Returns:
    depth_index: [batch, length] int32 in [0, N_r): the token runs recursions 0..depth_index.
    weight: [batch, length] float32 probability of the chosen depth (scales its last recursion).
    probs: [batch, length, N_r] float32.
  """
  logits = logits.astype(jnp.float32)
  if func == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
  elif func == "sigmoid":
    probs = jax.nn.sigmoid(logits)
  else:
    raise ValueError(f"token-choice func={func!r} is invalid; choose 'softmax' or 'sigmoid'")
  choice = probs if bias is None else probs + bias
  depth_index = jnp.argmax(choice, axis=-1).astype(jnp.int32)
  weight = jnp.take_along_axis(probs, depth_index[..., None], axis=-1)[..., 0]
  return depth_index, weight, probs


def depth_histogram(depth, num_recursions: int, mask=None):
  """Fractions of tokens by recursion depth.

  Args:
    depth: [batch, length] int, recursions each token ran (0..N_r).
    num_recursions: N_r.
    mask: optional [batch, length] weights (0 on padding).

  Returns:
    hist: [N_r + 1] float32, fraction of tokens that ran exactly d recursions.
    reached: [N_r] float32, fraction of tokens that ran recursion r (depth > r).
  """
  w = jnp.ones(depth.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(w), 1.0)
  onehot = jax.nn.one_hot(depth, num_recursions + 1, dtype=jnp.float32)
  hist = jnp.einsum("bt,btd->d", w, onehot) / total
  reached = jnp.flip(jnp.cumsum(jnp.flip(hist)))[1:]
  return hist, reached
