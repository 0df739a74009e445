"""Scheduled and learned expert sparsity: SMoE-Dropout's growing k (papers.md A7) and BlockFFN (papers.md A2).

- `expert_count_schedule` / `truncate_routing`: SMoE-Dropout (Chen et al. 2023, "Sparse MoE as the New Dropout:
  Scaling Dense and Self-Slimmable Transformers", Sec. 3.2; VITA-Group/Random-MoE-as-Dropout). The number of active
  experts k grows with the optimizer step, by the schedules of the authors' code; routing is computed once for k_max
  experts and the slots past k(t) are emptied, so k can follow a traced step without a new compilation per k.
- BlockFFN (Song et al. 2025, "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
  Chunk-Level Activation Sparsity"; thunlp/BlockFFN): the ReLU + RMSNorm router without top-k (`relu_rmsnorm_router`,
  Linen `ReLURouter`), the activation-locality and chunk-sparsification losses, the adaptive chunk-loss coefficient
  (`update_chunk_lambda`, the authors' `AdaptiveLinearScheduler`), token- and chunk-level sparsity (TLS, CLS(L)) and
  a dispatch that skips the experts inactive for a whole chunk (`chunk_sparse_ffn`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.routing import losses
from zoo.routing.dispatch import PLAIN_ACTIVATIONS
from zoo.routing.routers import Routing

K_SCHEDULES = ("linear", "cosine", "exponential", "step", "constant")

# The k list of the authors' 'multi_step_increase' schedule (clipped to [k_min, k_max]).
STEP_SCHEDULE_KS = (1, 2, 4, 8, 16)


def _authors_expert_count(step, total_steps, k_min, k_max, kind):
  """k at an integer step 0 <= step <= total_steps, with the authors' float64 arithmetic and Python rounding (half to
  even) of `calculate_gate_number` (VITA-Group/Random-MoE-as-Dropout, new_utils.py L91-124, its '*_increase' modes)."""
  if kind == "linear":  # linear_increase
    k = round((k_max - k_min) * step / total_steps) + k_min
  elif kind == "cosine":  # cosine_increase
    k = round((k_min - k_max) * np.cos(np.pi * step / (2 * total_steps))) + k_max
  elif kind == "exponential":  # exp_increase; the authors divide by total_steps // 300 (0 below 300 steps)
    k = round((k_min - k_max) * 0.99 ** (step // max(total_steps // 300, 1))) + k_max
  elif kind == "step":  # multi_step_increase; the authors index past the list's end at step = total_steps
    k = STEP_SCHEDULE_KS[min(int(len(STEP_SCHEDULE_KS) * step / total_steps), len(STEP_SCHEDULE_KS) - 1)]
  else:
    k = k_max
  return int(np.clip(k, k_min, k_max))


@functools.lru_cache(maxsize=64)
def _first_steps(total_steps, k_min, k_max, kind):
  """For j = k_min + 1 .. k_max, the first step in [0, total_steps] with k >= j (total_steps + 1 if none): every
  schedule is non-decreasing, so `k(step) = k_min + #{j: first_steps[j] <= step}` (found by bisection)."""
  firsts = []
  for j in range(k_min + 1, k_max + 1):
    lo, hi = 0, total_steps + 1
    while lo < hi:
      mid = (lo + hi) // 2
      if _authors_expert_count(mid, total_steps, k_min, k_max, kind) >= j:
        hi = mid
      else:
        lo = mid + 1
    firsts.append(lo)
  return tuple(firsts)


def expert_count_schedule(step, total_steps, k_min, k_max, kind="linear"):
  """Active experts k at optimizer step t (SMoE-Dropout, Sec. 3.2), the formulas of the authors' code.

  The authors' `calculate_gate_number` (VITA-Group/Random-MoE-as-Dropout, new_utils.py L91-124; called with the
  optimizer step `train_step` by `adjust_moe_gate_number` in train.py L509-510), with T = `total_steps`, then
  clipped to [k_min, k_max]:
    linear (`linear_increase`, the paper's): `k = round((k_max - k_min) t / T) + k_min`;
    cosine (`cosine_increase`): `k = round((k_min - k_max) cos(pi t / (2 T))) + k_max` (a quarter cosine: slow
      growth first, fastest at T);
    exponential (`exp_increase`): `k = round((k_min - k_max) 0.99^(t // (T // 300))) + k_max` (fast growth first;
      k may stay below k_max at T: 0.99^300 = 0.049);
    step (`multi_step_increase`): `k = [1, 2, 4, 8, 16][int(5 t / T)]` (five equal intervals; the list does not
      depend on k_min, k_max);
    constant: `k = k_max` (not in the authors' code).
  `round` rounds half to even (Python's). Differences, where the authors' code has no value: t is clipped to
  [0, T] (k stays at its value at T; the authors train exactly T steps), 'step' keeps 16 at t = T (the authors'
  index runs past the list) and 'exponential' uses `max(T // 300, 1)` (the authors divide by zero for T < 300).

  The values are the authors' float64 arithmetic exactly: they are computed on the host, as the step at which each
  k is first reached, so the step may be traced.

  Args:
    step: scalar int optimizer step t (may be traced).
    total_steps: T, the schedule's length (> 0; the authors' `dynamic_overall_steps`).
    k_min, k_max: 1 <= k_min <= k_max.
    kind: one of K_SCHEDULES.

  Returns:
    scalar int32 k in [k_min, k_max].
  """
  if kind not in K_SCHEDULES:
    raise ValueError(f"k schedule {kind!r} is unknown; allowed: {K_SCHEDULES}")
  if not 1 <= k_min <= k_max:
    raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1")
  firsts = jnp.asarray(_first_steps(int(total_steps), int(k_min), int(k_max), kind), jnp.int32)
  t = jnp.clip(jnp.asarray(step, jnp.int32), 0, total_steps)
  return (k_min + jnp.sum(firsts <= t)).astype(jnp.int32)


def truncate_routing(routing, k):
  """Keeps the first k slots of a top-k_max routing and renormalises their weights to sum 1.

  The slots of `softmax_topk` are sorted by probability, so the result is the softmax over the top-k logits, the
  SMoE-Dropout router, for a k that may be traced. The load and the load-balance loss are recomputed on the kept
  slots.

  Args:
    routing: a Routing whose slots are sorted by decreasing weight (`softmax_topk`).
    k: scalar int (may be traced), 1..k_max.

  Returns:
    Routing with the same [tokens, k_max] shapes: slots >= k hold expert -1 and weight 0; metrics gain 'active_k'.
  """
  num_experts = routing.num_experts
  keep = jnp.arange(routing.expert_ids.shape[-1]) < k
  expert_ids = jnp.where(keep, routing.expert_ids, -1)
  weights = jnp.where(keep, routing.weights, 0.0)
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-20)
  load = losses.expert_fraction(expert_ids, num_experts)
  aux = dict(routing.aux)
  if "load_balance" in aux:
    aux["load_balance"] = losses.load_balance_loss(routing.probs, expert_ids, num_experts)
  metrics = {
    **routing.metrics,
    "expert_load": load,
    "load_imbalance": num_experts * jnp.max(load),
    "active_k": jnp.asarray(k, jnp.float32),
  }
  return Routing(
    expert_ids=expert_ids, weights=weights, probs=routing.probs, aux=aux, metrics=metrics, capacity=routing.capacity
  )


def relu_rmsnorm(logits, *, epsilon=1e-6):
  """`RMSNorm_noweight(ReLU(s))` over the experts: the BlockFFN router output before its learnable gain.

  Args:
    logits: [..., experts] router scores s = W_r x.
    epsilon: RMSNorm epsilon.

  Returns:
    [..., experts] float32, non-negative.
  """
  h = jax.nn.relu(logits.astype(jnp.float32))
  return h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + epsilon)


def relu_rmsnorm_router(logits, gain, *, epsilon=1e-6):
  """BlockFFN router: `r = RMSNorm_noweight(ReLU(s)) * gain` over the experts, no top-k (an expert with r = 0 is off).

  Args:
    logits: [..., experts] router scores s = W_r x.
    gain: [experts] learnable gain (initialised to 1): the weight of the authors' RMSNorm over the experts
      (`router_norm` in thunlp/BlockFFN pretrain/cpm/dragonfly/blockffn.py).
    epsilon: RMSNorm epsilon.

  Returns:
    [..., experts] float32 non-negative combine weights r.
  """
  return relu_rmsnorm(logits, epsilon=epsilon) * gain.astype(jnp.float32)


def activation_locality_loss(logits, *, alpha=100.0, segment_ids=None):
  """BlockFFN activation-locality loss (Sec. 3.2): `BCEWithLogits(alpha s_{t-1}, target = sigmoid(alpha s_t))`.

  Pushes adjacent tokens of one document to switch the same experts on (s > 0) and off. As in the authors' code
  (`ActivationContext.transfer_regularization`, thunlp/BlockFFN pretrain/cpm/dragonfly/activation_context.py
  L333-369: `F.binary_cross_entropy_with_logits(left * steep, torch.sigmoid(right * steep))`, whose target is not
  detached and which PyTorch differentiates in both arguments), the target is differentiated too: both tokens of
  a pair are pulled towards each other. With `x = alpha s_{t-1}`, `y = sigmoid(alpha s_t)` the term is
  `softplus(x) - x y`, so `d/ds_{t-1} = alpha (sigmoid(x) - y)` and `d/ds_t = -alpha x y (1 - y)`.

  Args:
    logits: [batch, length, experts] router scores s.
    alpha: sharpness (100; the authors' `sigmoid_steep`).
    segment_ids: optional [batch, length] document ids; pairs across a document boundary are left out (the
      authors' `segment_shift_indices` = -1 at a document's first token).

  Returns:
    scalar float32, mean over the (adjacent pair, expert) terms.
  """
  s = alpha * logits.astype(jnp.float32)
  prev, target = s[:, :-1], jax.nn.sigmoid(s[:, 1:])
  bce = jnp.maximum(prev, 0) - prev * target + jnp.log1p(jnp.exp(-jnp.abs(prev)))
  mask = jnp.ones(bce.shape[:2], jnp.float32)
  if segment_ids is not None:
    mask = (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)
  return jnp.sum(bce * mask[..., None]) / jnp.maximum(jnp.sum(mask) * bce.shape[-1], 1.0)


def _chunks(x, chunk_length):
  """[batch, length, ...] -> [batch, length // chunk_length, chunk_length, ...]."""
  if chunk_length < 1 or x.shape[1] % chunk_length:
    raise ValueError(f"chunk_length={chunk_length} must be >= 1 and divide the sequence length {x.shape[1]}")
  return x.reshape(x.shape[0], x.shape[1] // chunk_length, chunk_length, *x.shape[2:])


def normalized_weights(weights):
  """`p = r / sum_e r` over the last axis; 0 for a token with every expert off (its gradient stays finite)."""
  r = weights.astype(jnp.float32)
  total = jnp.sum(r, axis=-1, keepdims=True)
  return r / jnp.where(total > 0, total, 1.0)


def chunk_sparsification_loss(weights, chunk_length):
  """BlockFFN chunk-sparsification loss (Sec. 3.2) `1 - mean_{chunk, e} prod_{t in chunk} (1 - p_{t,e})`,
  `p = h / sum_e h`.

  `prod (1 - p)` is the probability that expert e stays off for the whole chunk if each token drew one expert from
  p; the loss is small when a chunk's tokens share few experts. `h` is the router output BEFORE its learnable gain,
  `RMSNorm_noweight(ReLU(s))` (`relu_rmsnorm`), as in the authors' code: with `norm_after_router='rms'`,
  `router_ori, router_score = self.router_norm(..., output_hidden=True)` and the loss takes
  `router_score_scaled = router_ori / sum(router_ori)` (thunlp/BlockFFN pretrain/cpm/dragonfly/blockffn.py
  L161-163, L183; `router_ori` is the normalised value before the weight, layer_norm.py L7-11). So `p` equals
  `ReLU(s) / sum_e ReLU(s)` and the gain gets no gradient from this loss. The authors take
  `1 - mean exp(sum log(1 - p + 1e-5))` (activation_context.py L267-285); the 1e-5 is left out here.

  Args:
    weights: [batch, length, experts] router outputs before the gain, h >= 0.
    chunk_length: tokens per chunk (64 in the paper); must divide length.

  Returns:
    scalar float32.
  """
  p = normalized_weights(weights)
  return 1.0 - jnp.mean(jnp.prod(1.0 - _chunks(p, chunk_length), axis=2))


def token_level_sparsity(weights):
  """TLS: fraction of (token, expert) pairs with r = 0. weights: [..., experts] -> scalar float32."""
  return jnp.mean((weights == 0).astype(jnp.float32))


def chunk_level_sparsity(weights, chunk_length):
  """CLS(L): fraction of (window of L consecutive tokens, expert) pairs where the expert is off for every token.

  Windows are consecutive and non-overlapping; when L does not divide the length, the last `length % L` tokens of
  each row are left out, as the authors do (`ActivationContext.stat_window_activation`, thunlp/BlockFFN
  pretrain/cpm/dragonfly/activation_context.py L312-329, which counts windows of each size in
  `--stat_act_window_sizes`). The authors window the batch's tokens flattened into one stream; here each row is
  windowed on its own.

  Args:
    weights: [batch, length, experts] router outputs r; chunk_length: L, 1 <= L <= length.

  Returns:
    scalar float32.
  """
  length = weights.shape[1]
  if chunk_length < 1 or chunk_length > length:
    raise ValueError(f"chunk_length={chunk_length} must be between 1 and the sequence length {length}")
  kept = weights[:, : length - length % chunk_length]
  return jnp.mean(jnp.all(_chunks(kept, chunk_length) == 0, axis=2).astype(jnp.float32))


def init_chunk_lambda_state(initial=5e-2):
  """State of the adaptive chunk-loss coefficient (`update_chunk_lambda`): dict of float32/int32 scalars (lives in
  'routing_state').

  'lambda': the coefficient of the next step; 'step': steps taken; 'window_sum': sum of the chunk losses of the
  current window; 'previous_mean': mean of the previous window; 'ramp_from', 'ramp_to', 'ramp_start': the linear
  ramp lambda follows, from 'ramp_from' at step 'ramp_start' to 'ramp_to' one interval later.
  """
  return {
    "lambda": jnp.asarray(initial, jnp.float32),
    "step": jnp.zeros((), jnp.int32),
    "window_sum": jnp.zeros((), jnp.float32),
    "previous_mean": jnp.zeros((), jnp.float32),
    "ramp_from": jnp.asarray(initial, jnp.float32),
    "ramp_to": jnp.asarray(initial, jnp.float32),
    "ramp_start": jnp.zeros((), jnp.int32),
  }


def update_chunk_lambda(state, loss, *, initial, warmup_steps=1000, interval=100, min_factor=1.025, max_factor=4.0):
  """One step of BlockFFN's adaptive chunk-loss coefficient: the authors' `AdaptiveLinearScheduler`
  (thunlp/BlockFFN pretrain/cpm/training_utils/value_scheduler.py L119-166), built with `warmup_iter=0`,
  `stable_iter=1000`, `step_iter=100` (pretrain/apps/dragonfly_2b/pretrain_dragonfly.py L190-195) and
  `--scheduler_min_factor 1.025 --scheduler_max_factor 4.0` (pretrain/entrance.sh), fed the layer-averaged,
  unweighted chunk loss of each step (pretrain_dragonfly.py L791-794).

  The chunk losses are averaged over consecutive windows of `interval` steps. Until step `warmup_steps` lambda is
  `initial`. At every step t >= warmup_steps that ends a window, with `ratio = recent_mean / previous_mean` (this
  window over the one before):
    `ratio <- max(ratio, min_factor)` if ratio > 1, else unchanged (so lambda shrinks while the loss still falls);
    `ratio <- min(ratio, initial * max_factor / lambda_t)` (lambda never exceeds `max_factor * initial`);
  and lambda moves linearly from `lambda_t` to `lambda_t * ratio` over the next `interval` steps:
  `lambda_{t+k} = lambda_t (1 + (ratio - 1) min(k, interval) / interval)`. The coefficient of step t is the one
  before the update of step t (the scheduler returns its value before stepping).

  Args:
    state: dict from `init_chunk_lambda_state`.
    loss: scalar chunk-sparsification loss of this step (averaged over layers; not differentiated).
    initial: the starting coefficient (`init_start_val`), the base of the cap.
    warmup_steps: the authors' `stable_iter`: the first step that may adapt (1000).
    interval: window and ramp length in steps (the authors' `step_iter`, 100).
    min_factor, max_factor: the authors' `min_factor` (1.025) and `max_factor` (4.0).

  Returns:
    the updated state dict; its 'lambda' is the coefficient of the next step.
  """
  step = state["step"] + 1
  window_sum = state["window_sum"] + jax.lax.stop_gradient(loss).astype(jnp.float32)
  at_end = step % interval == 0
  recent = window_sum / interval
  previous = state["previous_mean"]
  adapt = at_end & (step >= warmup_steps) & (previous > 0)  # the authors assert previous > 0
  current = state["lambda"]
  ratio = recent / jnp.maximum(previous, 1e-20)
  ratio = jnp.where(ratio > 1, jnp.maximum(ratio, min_factor), ratio)
  ratio = jnp.minimum(ratio, initial * max_factor / jnp.maximum(current, 1e-30))
  ramp_from = jnp.where(adapt, current, state["ramp_from"])
  ramp_to = jnp.where(adapt, current * ratio, state["ramp_to"])
  ramp_start = jnp.where(adapt, step, state["ramp_start"])
  progress = jnp.clip((step + 1 - ramp_start).astype(jnp.float32) / interval, 0.0, 1.0)
  return {
    "lambda": ramp_from + (ramp_to - ramp_from) * progress,
    "step": step,
    "window_sum": jnp.where(at_end, 0.0, window_sum),
    "previous_mean": jnp.where(at_end, recent, previous),
    "ramp_from": ramp_from,
    "ramp_to": ramp_to,
    "ramp_start": ramp_start,
  }


class ReLURouter(nn.Module):
  """BlockFFN router parameters: `kernel` [embed, experts] (no bias) and `gain` [experts] (init 1).

  Returns `(r, s, h)`, each [..., experts] float32: the weights r of `relu_rmsnorm_router`, the scores s = x W_r and
  the router output before the gain h = `relu_rmsnorm(s)` (r = h * gain; the chunk loss takes h).
  """

  num_experts: int
  epsilon: float = 1e-6
  kernel_init: object = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(self.kernel_init, ("embed", "expert")),
      (x.shape[-1], self.num_experts),
      jnp.float32,
    )
    gain = self.param(
      "gain", nn.with_logical_partitioning(nn.initializers.ones_init(), ("expert",)), (self.num_experts,), jnp.float32
    )
    logits = x.astype(jnp.float32) @ kernel
    h = relu_rmsnorm(logits, epsilon=self.epsilon)
    return h * gain, logits, h


def chunk_sparse_ffn(x, weights, expert_weights, chunk_length, activation="silu"):
  """Non-gated experts `y_t = sum_e r_{t,e} W_down,e act(W_up,e x_t)`, computing an expert on a chunk only if it is
  active for some token of the chunk (BlockFFN's chunk-level sparse kernel, written with `lax.cond`).

  Args:
    x: [batch, length, embed].
    weights: [batch, length, experts] router outputs r (0 = off).
    expert_weights: {'up': [E, embed, mlp], 'down': [E, mlp, embed]}.
    chunk_length: tokens per chunk; must divide length.
    activation: a plain activation of `zoo.routing.PLAIN_ACTIVATIONS`.

  Returns:
    [batch, length, embed] in x.dtype; equal to running every expert on every token.
  """
  if activation not in PLAIN_ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is not a plain activation; allowed: {sorted(PLAIN_ACTIVATIONS)}")
  act = PLAIN_ACTIVATIONS[activation]
  b, length, embed = x.shape
  xs = _chunks(x, chunk_length).reshape(-1, chunk_length, embed)
  rs = _chunks(weights, chunk_length).reshape(-1, chunk_length, weights.shape[-1])

  def one_chunk(args):
    xc, rc = args

    def one_expert(y, e):
      r_e = jax.lax.dynamic_index_in_dim(rc, e, axis=1)  # [chunk_length, 1]

      def run(y):
        h = act(xc @ expert_weights["up"][e])
        return y + (r_e.astype(h.dtype) * h) @ expert_weights["down"][e]

      return jax.lax.cond(jnp.any(r_e != 0), run, lambda y: y, y), None

    y, _ = jax.lax.scan(one_expert, jnp.zeros_like(xc), jnp.arange(rc.shape[-1]))
    return y

  return jax.lax.map(one_chunk, (xs, rs)).reshape(b, length, embed).astype(x.dtype)
