"""Routers: pure float32 functions from router logits to a `Routing` record.

A router maps logits [tokens, experts] to a routing decision. Dispatch (`zoo.routing.dispatch`) reads only
`Routing.expert_ids` and `Routing.weights`, so a new router (ReLU-routed BlockFFN, recurrent RMoE, pre-gated Read-ME,
top-p DynMoLE, MoR depth routers...) plugs in by building a `Routing` -- from top-k choices directly, or from a dense
[tokens, experts] weight matrix with `routing_from_dense`.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp

from zoo.routing import losses, metrics as routing_metrics


@flax.struct.dataclass
class Routing:
  """A routing decision for a flat set of tokens.

  Attributes:
    expert_ids: [tokens, k] int32 expert of each slot; -1 marks an empty slot (no expert).
    weights: [tokens, k] float32 combine weight of each slot (0 for empty slots).
    probs: [tokens, experts] float32 router probabilities (a distribution over experts per token; the load-balance
      loss and the entropy metric use it).
    aux: dict name -> unweighted scalar auxiliary loss ('load_balance', 'z_loss', ...). The model weights them.
    metrics: dict name -> array (see `zoo.routing.metrics.routing_metrics`).
    capacity: static number of tokens each expert takes, when the router fixes it (expert-choice); None otherwise.
  """

  expert_ids: jax.Array
  weights: jax.Array
  probs: jax.Array
  aux: dict = flax.struct.field(default_factory=dict)
  metrics: dict = flax.struct.field(default_factory=dict)
  capacity: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_experts(self):
    return self.probs.shape[-1]


def _check_logits(logits, k=None):
  if logits.ndim != 2:
    raise ValueError(f"router logits must be [tokens, experts], got shape {logits.shape}")
  num_experts = logits.shape[-1]
  if k is not None and not 1 <= k <= num_experts:
    raise ValueError(f"k={k} experts per token is invalid; allowed 1..{num_experts} (the number of experts)")


def _finish(logits, probs, expert_ids, weights, *, sequence_length, balance_loss=True, capacity=None):
  """Builds the Routing record with its standard losses and metrics."""
  num_experts = logits.shape[-1]
  aux = {"z_loss": losses.router_z_loss(logits)}
  if balance_loss:
    aux["load_balance"] = losses.load_balance_loss(probs, expert_ids, num_experts, sequence_length=sequence_length)
  return Routing(
    expert_ids=expert_ids.astype(jnp.int32),
    weights=weights.astype(jnp.float32),
    probs=probs,
    aux=aux,
    metrics=routing_metrics.routing_metrics(logits, probs, expert_ids, num_experts),
    capacity=capacity,
  )


def group_limited_mask(scores, n_group, topk_group):
  """Keeps only the experts of each token's best `topk_group` groups (DeepSeek-V3, Sec. 2.1.2 / its inference code).

  Experts are split into `n_group` contiguous groups; a group's score is the sum of its top-2 expert scores
  (DeepSeek-V3 ranks groups this way; groups of one expert use that expert's score).

  Args:
    scores: [tokens, experts] float32 selection scores.
    n_group: number of expert groups; must divide the number of experts.
    topk_group: number of groups each token may select from.

  Returns:
    [tokens, experts] bool, True for experts inside the token's selected groups.
  """
  tokens, num_experts = scores.shape
  if n_group < 1 or num_experts % n_group:
    raise ValueError(f"n_group={n_group} must be >= 1 and divide the number of experts ({num_experts})")
  if not 1 <= topk_group <= n_group:
    raise ValueError(f"topk_group={topk_group} is invalid; allowed 1..n_group={n_group}")
  grouped = scores.reshape(tokens, n_group, num_experts // n_group)
  group_scores = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0].sum(-1)  # [tokens, n_group]
  _, top_groups = jax.lax.top_k(group_scores, topk_group)
  group_mask = jax.nn.one_hot(top_groups, n_group, dtype=jnp.bool_).any(-2)  # [tokens, n_group]
  return jnp.repeat(group_mask, num_experts // n_group, axis=-1)


def _select(choice_scores, k, n_group, topk_group):
  """Top-k expert ids by `choice_scores`, optionally limited to the best groups."""
  if n_group > 1:
    if k > topk_group * (choice_scores.shape[-1] // n_group):
      raise ValueError(
        f"k={k} exceeds the experts in topk_group={topk_group} groups of {choice_scores.shape[-1] // n_group}"
      )
    mask = group_limited_mask(choice_scores, n_group, topk_group)
    choice_scores = jnp.where(mask, choice_scores, -jnp.inf)
  return jax.lax.top_k(choice_scores, k)[1]


def softmax_topk(
  logits, k, *, renormalize=True, n_group=1, topk_group=1, routed_scaling_factor=1.0, sequence_length=None
):
  """Softmax token-choice top-k router (Switch Transformer Sec. 2.1 for k=1; GShard / Mixtral for k=2).

  `p = softmax(logits)`; each token takes its k most probable experts; the combine weights are their probabilities,
  renormalised to sum to 1 when `renormalize` (Mixtral; identical to softmax over the top-k logits, which is also the
  SMoE-Dropout router). With `n_group > 1` selection is limited to the best `topk_group` groups (DeepSeek-V2's
  group-limited routing; groups ranked as in `group_limited_mask`).

  Args:
    logits: [tokens, experts] router logits (cast to float32).
    k: experts per token.
    renormalize: divide the k weights by their sum.
    n_group, topk_group: group-limited selection (1 group = unlimited).
    routed_scaling_factor: multiplies the combine weights (DeepSeek-V2/V3).
    sequence_length: when set, the load-balance loss is computed per sequence of this many consecutive tokens and
      averaged (else over all tokens).

  Returns:
    Routing with aux losses 'load_balance' (Switch, global or per sequence) and 'z_loss'.
  """
  _check_logits(logits, k)
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  expert_ids = _select(probs, k, n_group, topk_group)
  weights = jnp.take_along_axis(probs, expert_ids, axis=-1)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return _finish(logits, probs, expert_ids, weights * routed_scaling_factor, sequence_length=sequence_length)


def sigmoid_topk(
  logits, k, *, bias=None, renormalize=True, n_group=1, topk_group=1, routed_scaling_factor=1.0, sequence_length=None
):
  """Sigmoid top-k router with aux-loss-free bias balancing (DeepSeek-V3, Sec. 2.1.2, Eq. 13-16).

  `s = sigmoid(logits)`; experts are selected by `s + bias` (optionally group-limited), but the combine weights come
  from the unbiased `s` of the selected experts, normalised to sum 1 when `renormalize`, times
  `routed_scaling_factor`. `bias` is updated outside the optimizer with `update_balance_bias`.

  Args:
    logits: [tokens, experts] router logits (cast to float32).
    k: experts per token.
    bias: [experts] float32 selection bias, or None.
    renormalize, n_group, topk_group, routed_scaling_factor, sequence_length: as in `softmax_topk`.

  Returns:
    Routing whose `probs` are the scores normalised per token, `s / sum_e s` (used by the load-balance loss, as in
    DeepSeek-V3's sequence-wise balance loss Eq. 17-20, and by the entropy metric).
  """
  _check_logits(logits, k)
  logits = logits.astype(jnp.float32)
  scores = jax.nn.sigmoid(logits)
  choice = scores
  if bias is not None:
    if bias.shape != (logits.shape[-1],):
      raise ValueError(f"bias must have shape [experts]=({logits.shape[-1]},), got {bias.shape}")
    choice = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
  expert_ids = _select(choice, k, n_group, topk_group)
  weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
  if renormalize:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  return _finish(logits, probs, expert_ids, weights * routed_scaling_factor, sequence_length=sequence_length)


def update_balance_bias(bias, expert_load, update_rate):
  """Aux-loss-free balancing step (DeepSeek-V3, Sec. 2.1.2): `b_e += u * sign(mean_load - load_e)`.

  Overloaded experts get a lower bias, underloaded ones a higher bias. Applied outside the optimizer, once per step.

  Args:
    bias: [experts] float32 current bias.
    expert_load: [experts] tokens (or fraction of assignments) each expert received this step.
    update_rate: the bias update speed u (DeepSeek-V3 uses 1e-3).

  Returns:
    [experts] float32 updated bias.
  """
  expert_load = jax.lax.stop_gradient(expert_load.astype(jnp.float32))
  return bias + update_rate * jnp.sign(jnp.mean(expert_load) - expert_load)


def expert_choice(logits, capacity_factor):
  """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", Sec. 3.1, Eq. 1).

  `S = softmax(logits)` over experts; each expert takes its top-C tokens by `S[:, e]`, with
  `C = ceil(tokens * capacity_factor / experts)`; the combine weight is `S[t, e]`. A token may get 0..experts experts.
  Note: choosing among all tokens of a batch sees future tokens, so causal LMs need care (see papers.md A1).

  Args:
    logits: [tokens, experts] router logits (cast to float32).
    capacity_factor: average number of experts per token (the paper's c).

  Returns:
    Routing with k = experts slots per token (slot e holds expert e or -1) and `capacity` = C; aux has 'z_loss' only
    (expert choice is balanced by construction).
  """
  _check_logits(logits)
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
  logits = logits.astype(jnp.float32)
  tokens, num_experts = logits.shape
  capacity = min(tokens, math.ceil(tokens * capacity_factor / num_experts))
  probs = jax.nn.softmax(logits, axis=-1)
  _, chosen = jax.lax.top_k(probs.T, capacity)  # [experts, capacity] token ids
  chosen_mask = jnp.zeros((num_experts, tokens), jnp.bool_).at[jnp.arange(num_experts)[:, None], chosen].set(True).T
  combine = jnp.where(chosen_mask, probs, 0.0)
  expert_ids = jnp.where(chosen_mask, jnp.arange(num_experts), -1)
  return _finish(logits, probs, expert_ids, combine, sequence_length=None, balance_loss=False, capacity=capacity)


def routing_from_dense(combine, logits, probs=None):
  """A Routing from a dense [tokens, experts] combine matrix (for routers without top-k, e.g. BlockFFN's ReLU router).

  Slot e of each token holds expert e where `combine[t, e] != 0`, else -1 (skipped by dispatch).

  Args:
    combine: [tokens, experts] float32 combine weights; zeros mean "not routed".
    logits: [tokens, experts] router logits (for the z-loss and metrics).
    probs: [tokens, experts] distribution over experts for losses/metrics; default softmax(logits).

  Returns:
    Routing with k = experts slots per token and aux 'z_loss' and 'load_balance'.
  """
  _check_logits(logits)
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1) if probs is None else probs
  expert_ids = jnp.where(combine != 0, jnp.arange(combine.shape[-1]), -1)
  return _finish(logits, probs, expert_ids, combine, sequence_length=None)


def jitter(x, rng, eps):
  """Router jitter (Switch Transformer Sec. 2.4): multiplies the router input by Uniform(1 - eps, 1 + eps) noise.

  Args:
    x: [..., embed] router input.
    rng: PRNG key.
    eps: noise half-width (Switch uses 1e-2); 0 returns x.

  Returns:
    x with multiplicative noise, same shape and dtype.
  """
  if eps == 0:
    return x
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)
