"""Mixture-of-Recursions and the Recursive Transformer baseline (papers.md A1).

Bae et al., 2025, "Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive Token-Level Computation".

- Parameter sharing (Sec. 2.1): an effective stack of `num_layers` decoder layers is built from fewer unique layers.
  `cycle`: `num_layers / N_r` unique layers looped N_r times; `sequence`: each unique layer repeated N_r times in a
  row; `middle_cycle` / `middle_sequence`: the first and the last layer are unshared and the middle
  `base_depth = (num_layers - 2) / N_r` layers are shared as above. Recursion r is the r-th chunk of `base_depth`
  layers of the effective middle stack (for `sequence` this chunking is a [guess]).
- Routers (Sec. 2.2.1, `zoo.routing.depth`):
  `router='expert'`: step r scores the tokens still active with `g = gate_scale * sigmoid(W_r h)` (the paper's
  alpha) and keeps the top `k_r = int(cap_r * T)` of them (hierarchical, causal order); chosen tokens update
  `h <- h + g * Block_r(h)` where `Block_r(h)` already contains its own residual (authors' code), the others pass
  unchanged. Top-k over the sequence sees the future, so a BCE loss (`causal_router='aux_loss'`: on the router's own
  logits; `'aux_router'`: on a separate router fed with detached states), in every recursion including recursion 0
  (capacity 1, all targets 1; authors' `model/mor_model/expert_choice_router.py`), teaches a per-token decision
  `sigmoid(logit) >= 0.5` that cached decoding uses.
  `router='token'`: one router before the recursions, top-1 depth j of N_r; the token runs recursions 0..j with
  `h_{r+1} = Block_r(h_r)` and leaves with `h_0 + p_j * Block_j(h_j)`, where `h_0` is the input of the whole recursion
  stack (authors' `model/mor_model/token_choice_router.py`, `final_x = x.clone()` plus a scatter-add of the weighted
  output of the token's last recursion); balance loss `N_r * sum_i f_i P_i` over the whole batch (authors' code;
  `load_balance_coef` 0.1), z-loss (`z_loss_coef` 1e-5), optional loss-free bias (DeepSeek-V3 style, [guess] for
  MoR).
  `router='none'`: the Recursive Transformer baseline, every token runs every recursion with `h <- Block_r(h)`.
- KV (Sec. 2.2.2): `kv_mode='recursion'` (recursion-wise caching): at recursion r a query attends only to the tokens
  active at r, and the decoding cache of recursion r holds only their keys/values (marked in `active`).
  `kv_mode='share'` (recursive KV sharing): every recursion attends to the keys/values that recursion 0 computed for
  all tokens (same slot of the shared block), and only recursion 0 is cached. The layers' attention is
  `zoo.layers.Attention`; KV sharing hands it recursion 0's keys/values as a read-only cache (`SharedKV`).

Which tokens run recursion r (expert-choice; token-choice and the baseline are causal by construction):
- training (`deterministic=False`): top-k over the sequence (capacity warm-up: the capacity decays from 1 to its
  target along a half cosine over `capacity_warmup_steps`, counted in `routing_state/step`).
- evaluation without a cache (`deterministic=True`), `eval_routing='topk'` (default): the training rule, top-k over the
  sequence at the target capacity. This is what the authors evaluate (`expert_choice_router.py` runs the same
  `torch.topk` in eval mode; `sigmoid >= 0.5` only feeds a training accuracy metric), so the validation loss compares
  like for like with the paper, but a token's depth depends on future tokens.
- `eval_routing='causal'`: token by token, a recursion with capacity 1 keeps every active token, otherwise a token
  continues iff it was active and the decision logit is >= 0 (sigmoid >= 0.5). The honest number for generation.
- decoding with a cache: always the causal rule, whatever `eval_routing` says (top-k over a sequence that is not
  there yet is impossible; the prefill uses it too, so a prompt's decisions do not depend on how it is split).

Cached decoding equals the full forward under the causal rule for every router and both KV modes: each token's
decisions depend only on its own hidden state, which depends only on earlier tokens.

Training top-k with a static k runs the block only on the gathered chosen tokens (real compute savings); token-choice,
causal decisions and capacity warm-up run the block on all tokens and mask the attention and the update.

Per-token output (`exposes`, the `zoo.models` contract): with `apply(..., mutable=['intermediates'])`,
`intermediates['depth']` int32 [batch, length], the recursions each token ran in this call (0..N_r; the selection
rule of the call: training top-k when `deterministic=False`, the inference rule otherwise, as `depth_per_token`).
"""

import functools
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from zoo.layers import MLP, Attention, DecoderBlock, DenseGeneral, Embed, KVCache, RMSNorm, mean_attended_keys
from zoo.layers.mlp import ACTIVATIONS
from zoo.models.output import ModelOutput, sow_output
from zoo.models.registry import ConfigError, check_config, register_model
from zoo.routing import depth as depth_routing, losses
from zoo.routing.routers import update_balance_bias

SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTERS = ("expert", "token", "none")


@flax.struct.dataclass
class SharedKV:
  """Keys/values of recursion 0 that later recursions attend to (Sec. 2.2.2, recursive KV sharing).

  A cache of `zoo.layers.Attention`: `SharedKV()` (all None) captures the keys/values the attention computes
  (`update`); a filled record is `read_only`: the attention attends to it and projects no keys/values.
  k, v: [batch, keys, kv_heads, head_dim]; positions: [batch, keys] int; valid: [batch, keys] bool or None.
  """

  k: Any = None
  v: Any = None
  positions: Any = None
  valid: Any = None

  @property
  def read_only(self):
    return self.k is not None

  def update(self, k, v, positions):
    """The keys/values [batch, length, kv_heads, head_dim] computed at `positions` [batch, length], captured."""
    return SharedKV(k, v, positions, None)

  def read(self):
    """(k, v, positions, valid)."""
    return self.k, self.v, self.positions, self.valid


def layer_schedule(sharing, num_layers, num_recursions):
  """Which unique layer runs where.

  Returns:
    (num_unique, first, recursions, last): `recursions[r]` is the tuple of unique-layer ids of recursion r; `first` and
    `last` are the ids of the unshared outer layers (None for cycle/sequence).
  """
  if sharing not in SHARING:
    raise ConfigError(f"config.model.sharing={sharing!r} is invalid; choose one of {SHARING}")
  if num_recursions < 1:
    raise ConfigError(f"config.model.num_recursions={num_recursions} must be >= 1")
  middle = sharing.startswith("middle_")
  shared_depth = num_layers - 2 if middle else num_layers
  if shared_depth < num_recursions or shared_depth % num_recursions:
    raise ConfigError(
      f"config.model.num_layers={num_layers} is invalid for sharing={sharing!r}: "
      f"{'num_layers - 2' if middle else 'num_layers'} must be a positive multiple of "
      f"num_recursions={num_recursions}"
    )
  base = shared_depth // num_recursions
  offset = 1 if middle else 0
  if sharing.endswith("cycle"):
    stack = [offset + i for _ in range(num_recursions) for i in range(base)]
  else:
    stack = [offset + i for i in range(base) for _ in range(num_recursions)]
  recursions = tuple(tuple(stack[r * base : (r + 1) * base]) for r in range(num_recursions))
  if middle:
    return base + 2, 0, recursions, base + 1
  return base, None, recursions, None


@flax.struct.dataclass
class StepRoute:
  """Which tokens run recursion r and how its output is combined (Sec. 2.2.1).

  chosen: [batch, length] bool, the tokens that run recursion r.
  gate: [batch, length] float32 weight of the block output (expert- and token-choice), or None (baseline).
  last: [batch, length] bool, token-choice only: recursion r is the token's last one; None for the other routers.
  stack_input: [batch, length, d], token-choice only: h_0, the input of the whole recursion stack, to which the
    weighted output of a token's last recursion is added; None for the other routers.
  """

  chosen: Any
  gate: Any = None
  last: Any = None
  stack_input: Any = None


@register_model("mor")
class MoRLM(nn.Module):
  """Mixture-of-Recursions decoder LM (papers.md A1); `router='none'` is the Recursive Transformer baseline.

  Attributes:
    vocab_size: vocabulary size.
    embed_dim: model width d.
    num_layers: effective depth (that of the vanilla model it is compared with).
    num_heads, num_kv_heads, head_dim: attention shape (GQA when num_kv_heads < num_heads).
    mlp_dim, mlp_activation: the FFN of each layer (`zoo.layers.MLP`).
    num_recursions: N_r.
    sharing: 'cycle' | 'sequence' | 'middle_cycle' | 'middle_sequence'.
    router: 'expert' | 'token' | 'none'.
    router_arch: 'linear' (d -> out) or 'mlp' (d -> 2d -> GELU -> out).
    gate_scale: scale of the expert-choice gate `gate_scale * sigmoid(W h)` (0.1; the paper's alpha).
    capacities: expert-choice capacity per recursion; () = (N_r - r) / N_r.
    capacity_warmup_steps: cosine warm-up of the capacity from 1 (0 = none).
    causal_router: 'aux_loss' (BCE on the router logits) or 'aux_router' (separate router on detached states).
    bce_coef: weight of the BCE loss (1e-3), whose per-recursion means over the scored tokens are summed over every
      recursion (recursion 0 included). 1e-3 is the authors' `mor.expert.coeff` (conf/pretrain/*_aux_loss_0.001.yaml)
      and it is the zoo's effective weight: the engine averages the gradients of the micro-batches and sees the
      global batch, so the weight does not depend on how a batch is split. The authors' effective weight is larger
      and depends on the launch: their trainer (`util/trainer_pt.py`, `training_step`) adds `coeff * sampling_loss`,
      a per-micro-batch mean, to an LM loss normalised by the tokens of the whole accumulated batch
      (`num_items_in_batch`), so over G accumulation steps the BCE weighs `G * coeff` (G = 16 in their 360M configs:
      1024 / (16 per device x 4 GPUs)), and `compute_loss` multiplies it by the number of processes when
      `average_tokens_across_devices` is on. The zoo does not reproduce that launch-dependent factor.
    eval_routing: expert-choice selection in evaluation without a cache: 'topk' (default, the authors' evaluation)
      or 'causal' (the per-token decision); decoding with a cache is always causal (see the module docstring).
    token_func: 'softmax' | 'sigmoid' for token-choice.
    load_balance_coef, z_loss_coef: token-choice balance loss (0.1) and router z-loss (1e-5) weights; the balance
      loss is computed over the whole (micro-)batch, as the authors do.
    balance_bias_rate: > 0 enables loss-free bias balancing of token-choice with this update rate.
    kv_mode: 'recursion' (recursion-wise caching) or 'share' (recursive KV sharing).
    rope_theta, norm_epsilon, tie_embeddings, dtype: as in the dense LM.
  """

  exposes: ClassVar[tuple[str, ...]] = ("depth",)
  renamed_keys: ClassVar[dict[str, str]] = {
    "balance_coef": "load_balance_coef",
    "z_coef": "z_loss_coef",
    "alpha": "gate_scale",
    "inference_selection": "eval_routing",
  }
  vocab_size: int = 260
  embed_dim: int = 128
  num_layers: int = 6
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int = 32
  mlp_dim: int = 512
  mlp_activation: str = "swiglu"
  num_recursions: int = 2
  sharing: str = "middle_cycle"
  router: str = "expert"
  router_arch: str = "linear"
  gate_scale: float = 0.1
  capacities: tuple = ()
  capacity_warmup_steps: int = 0
  causal_router: str = "aux_loss"
  bce_coef: float = 1e-3
  eval_routing: str = "topk"
  token_func: str = "softmax"
  load_balance_coef: float = 0.1
  z_loss_coef: float = 1e-5
  balance_bias_rate: float = 0.0
  kv_mode: str = "recursion"
  rope_theta: float = 10000.0
  norm_epsilon: float = 1e-6
  tie_embeddings: bool = True
  dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("vocab_size", "embed_dim", "num_layers", "num_heads", "head_dim", "mlp_dim", "num_recursions"),
      optional_positive=("num_kv_heads",),
      non_negative=("capacity_warmup_steps", "bce_coef", "load_balance_coef", "z_loss_coef", "balance_bias_rate"),
      intervals={"gate_scale": "(0, inf)", "rope_theta": "(0, inf)", "norm_epsilon": "(0, inf)"},
      choices={
        "router": ROUTERS,
        "router_arch": ("linear", "mlp"),
        "causal_router": ("aux_loss", "aux_router"),
        "eval_routing": ("topk", "causal"),
        "token_func": ("softmax", "sigmoid"),
        "kv_mode": ("recursion", "share"),
        "sharing": SHARING,
        "mlp_activation": sorted(ACTIVATIONS),
      },
      dtypes=("dtype",),
    )
    if self.head_dim % 2:
      raise ConfigError(f"config.model.head_dim={self.head_dim} must be even for RoPE")
    if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
      raise ConfigError(f"config.model.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    layer_schedule(self.sharing, self.num_layers, self.num_recursions)
    caps = self.caps
    if self.kv_mode == "share" and caps[0] < 1.0:
      raise ConfigError(f"config.model.kv_mode='share' needs every token in recursion 0, but capacities[0]={caps[0]}")
    super().__post_init__()

  @property
  def caps(self):
    """Capacity per recursion (validated): `capacities` or the default (N_r - r) / N_r."""
    try:
      return depth_routing.validate_capacities(
        self.capacities or depth_routing.default_capacities(self.num_recursions), self.num_recursions
      )
    except ValueError as e:
      raise ConfigError(f"config.model.capacities: {e}") from None

  def setup(self):
    self.num_unique, self.first_id, self.schedule, self.last_id = layer_schedule(
      self.sharing, self.num_layers, self.num_recursions
    )
    dtype = jnp.dtype(self.dtype)
    attention = functools.partial(
      Attention,
      num_heads=self.num_heads,
      head_dim=self.head_dim,
      num_kv_heads=self.num_kv_heads,
      rope_theta=self.rope_theta,
      dtype=dtype,
    )
    ffn = functools.partial(MLP, hidden_dim=self.mlp_dim, activation=self.mlp_activation, dtype=dtype)
    self.embed = Embed(self.vocab_size, self.embed_dim, dtype=dtype)
    self.layers = [
      DecoderBlock(attention, ffn, norm_epsilon=self.norm_epsilon, dtype=dtype) for _ in range(self.num_unique)
    ]
    if self.router == "expert":
      self.step_routers = [depth_routing.DepthRouter(1, self.router_arch) for _ in range(self.num_recursions)]
      if self.causal_router == "aux_router":
        self.aux_routers = [depth_routing.DepthRouter(1, self.router_arch) for _ in range(self.num_recursions)]
    elif self.router == "token":
      self.depth_router = depth_routing.DepthRouter(self.num_recursions, self.router_arch)
    if self.router == "expert" and self.capacity_warmup_steps > 0:
      self.step = self.variable("routing_state", "step", jnp.zeros, (), jnp.int32)
    if self.router == "token" and self.balance_bias_rate > 0:
      self.depth_bias = self.variable("routing_state", "depth_bias", jnp.zeros, (self.num_recursions,), jnp.float32)
    self.final_norm = RMSNorm(epsilon=self.norm_epsilon, dtype=dtype)
    if not self.tie_embeddings:
      self.lm_head = DenseGeneral(self.vocab_size, kernel_axes=("embed", "vocab"), dtype=dtype)

  def init_cache(self, batch_size, max_length):
    """An empty decoding cache: per-layer KVCache records, plus, for recursion-wise caching, `active`
    [N_r, batch, max_length] bool marking the slots whose token ran recursion r."""
    kv = functools.partial(
      KVCache.create, batch_size, max_length, self.num_kv_heads or self.num_heads, self.head_dim, jnp.dtype(self.dtype)
    )
    _, first, schedule, last = layer_schedule(self.sharing, self.num_layers, self.num_recursions)
    cached = 1 if self.kv_mode == "share" else self.num_recursions
    cache = {
      "length": jnp.zeros((batch_size,), jnp.int32),
      "recursions": tuple(tuple(kv() for _ in schedule[0]) for _ in range(cached)),
    }
    if first is not None:
      cache["first"], cache["last"] = kv(), kv()
    if self.kv_mode == "recursion":
      cache["active"] = jnp.zeros((self.num_recursions, batch_size, max_length), bool)
    return cache

  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True):
    """tokens: [batch, length] int32 -> (logits [batch, length, vocab] float32, ModelOutput); sows
    `intermediates['depth']` [batch, length] int32 when 'intermediates' is mutable."""
    logits, output, depth = self._forward(tokens, positions, cache, deterministic)
    sow_output(self, "depth", depth)
    return logits, output

  def depth_per_token(self, tokens, positions=None):
    """Recursions each token runs at inference: [batch, length] int32 in 0..N_r (for plots; what `__call__` sows as
    `intermediates['depth']` with `deterministic=True` and no cache)."""
    return self._forward(tokens, positions, None, True)[2]

  def _forward(self, tokens, positions, cache, deterministic):
    """The whole model (Sec. 2): prelude, N_r routed recursions of the shared layers, coda, losses and metrics.

    Args:
      tokens: [batch, length] int32.
      positions: [batch, length] int32 absolute positions, or None (after the cached ones).
      cache: None or the decoding cache of `init_cache`.
      deterministic: False in training (top-k selection, capacity warm-up, loss-free bias updates).

    Returns:
      (logits [batch, length, vocab] float32, ModelOutput, depth [batch, length] int32).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    b, t = tokens.shape
    if positions is None:
      start = jnp.zeros((b,), jnp.int32) if cache is None else cache["length"]
      positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    training = not deterministic
    # Top-k over the sequence in training and (eval_routing='topk') in evaluation; never with a cache, where the
    # future tokens do not exist yet: decoding always uses the causal rule.
    use_topk = cache is None and (training or self.eval_routing == "topk")
    ks, static_k = self._step_sizes(t, training, use_topk)
    new_cache = None if cache is None else dict(cache)

    h = self._prelude(tokens, positions, cache, new_cache)
    aux, metrics, token_route = jnp.zeros((), jnp.float32), {}, None
    if self.router == "token":
      token_route, aux, metrics = self._route_token_choice(h, training)
    active, ran = jnp.ones((b, t), bool), jnp.zeros((b, t), jnp.int32)
    shared, decision_terms, stack_input = None, [], h
    for r in range(self.num_recursions):
      if self.router == "expert":
        route, terms = self._route_expert_step(r, h, active, ks[r], use_topk, cache)
        decision_terms += terms
      elif self.router == "token":
        route = StepRoute(token_route[0] >= r, token_route[1], token_route[0] == r, stack_input)
      else:
        route = StepRoute(active)
      h, shared = self._recursion(r, h, positions, route, static_k, cache, new_cache, shared)
      active = route.chosen
      ran = ran + route.chosen.astype(jnp.int32)
    logits = self._coda(h, positions, cache, new_cache)

    aux = self._depth_losses_and_metrics(aux, metrics, decision_terms, ran)
    if cache is not None:
      new_cache["length"] = jnp.maximum(cache["length"], jnp.max(positions, axis=1) + 1)
    return logits.astype(jnp.float32), ModelOutput(aux_loss=aux, metrics=metrics, cache=new_cache), ran

  def _step_sizes(self, t, training, use_topk):
    """Tokens kept per sequence by each expert-choice step, `k_r = int(cap_r T)` (Sec. 2.2.1), the capacity warmed
    up from 1 in training (authors' code; advances `routing_state/step`).

    Returns:
      (ks: N_r ints, traced during a warm-up; static_k: the Python ints when training top-k runs the block on the
      gathered chosen tokens, else None).
    """
    caps = self.caps
    warmup = self.router == "expert" and training and self.capacity_warmup_steps > 0
    if warmup:
      caps = depth_routing.capacity_at_step(caps, self.step.value, self.capacity_warmup_steps)
      if not self.is_initializing():
        self.step.value = self.step.value + 1
    ks = [depth_routing.capacity_to_k(caps[r], t) for r in range(self.num_recursions)]
    return ks, ks if self.router == "expert" and use_topk and not warmup else None

  def _prelude(self, tokens, positions, cache, new_cache):
    """Embedding, then the unshared first layer of middle-* sharing (Sec. 2.1, Middle-Cycle); h [batch, length, d].
    Writes the first layer's decoding cache into `new_cache`."""
    h = self.embed(tokens)
    if self.first_id is not None:
      h, c, _ = self.layers[self.first_id](h, positions, cache=None if cache is None else cache["first"])
      if cache is not None:
        new_cache["first"] = c
    return h

  def _coda(self, h, positions, cache, new_cache):
    """The unshared last layer of middle-* sharing (Sec. 2.1), the final norm and the output projection;
    -> logits [batch, length, vocab]. Writes the last layer's decoding cache into `new_cache`."""
    if self.last_id is not None:
      h, c, _ = self.layers[self.last_id](h, positions, cache=None if cache is None else cache["last"])
      if cache is not None:
        new_cache["last"] = c
    h = self.final_norm(h)
    return self.embed.attend(h) if self.tie_embeddings else self.lm_head(h)

  def _route_token_choice(self, h, training):
    """Token-choice routing (Sec. 2.2.1): one router before the recursions picks each token's depth (top-1 of N_r),
    with the balance loss `N_r sum_i f_i P_i` over the whole batch, the router z-loss and, optionally, the loss-free
    bias (DeepSeek-V3 style, [guess] for MoR) updated in training.

    Returns:
      ((depth_index [batch, length] int32, weight [batch, length] float32), weighted aux loss, metrics).
    """
    bias = self.depth_bias if self.balance_bias_rate > 0 else None
    router_logits = self.depth_router(h)
    depth_index, token_weight, probs = depth_routing.token_choice_route(
      router_logits, self.token_func, None if bias is None else bias.value
    )
    n = self.num_recursions
    # Over the whole batch, as the authors (`token_choice_router.py`: P_i and f_i are sums over batch and length
    # divided by bs * seq_len); their division by `num_items_in_batch / bs / seq_len` undoes gradient accumulation, so
    # `load_balance_coef` is the effective weight in both. The zoo's batch here is the global micro-batch (all
    # devices), the authors' one device's micro-batch.
    balance = losses.load_balance_loss(probs.reshape(-1, n), depth_index.reshape(-1, 1), n)
    z = losses.router_z_loss(router_logits.reshape(-1, n))
    aux = jnp.zeros((), jnp.float32) + self.load_balance_coef * balance + self.z_loss_coef * z
    if bias is not None and training and not self.is_initializing():
      load = jnp.mean(jax.nn.one_hot(depth_index, n), axis=(0, 1))
      bias.value = update_balance_bias(bias.value, load, self.balance_bias_rate)
    return (depth_index, token_weight), aux, {"router_balance_loss": balance, "router_z_loss": z}

  def _route_expert_step(self, r, h, active, k, use_topk, cache):
    """Expert-choice step r (Sec. 2.2.1): router r scores the active tokens, `g = gate_scale * sigmoid(W_r h)`.

    Training (and evaluation with `eval_routing='topk'`) keeps the top k of the active tokens (hierarchical);
    otherwise (`eval_routing='causal'`, and always with a cache) a token continues iff the decision logit (the
    router's own, or the auxiliary router's on detached states) is >= 0, and every active token when the capacity is
    1. Without a cache, the BCE between the decision logits and the top-k choice, a mean over the active tokens, is
    returned with the decisions' accuracy at every step, recursion 0 included (capacity 1: every target is 1), as in
    the authors' `expert_choice_router.py`, which computes it in every expert-choice layer from the scatter of the
    top-k indices.

    Returns:
      (StepRoute, [(bce, accuracy)] or []).
    """
    logits = self.step_routers[r](h)[..., 0]
    gate = self.gate_scale * jax.nn.sigmoid(logits)
    targets = None if cache is not None else depth_routing.hierarchical_topk(gate, active, k)
    if self.causal_router == "aux_router":
      decision = self.aux_routers[r](jax.lax.stop_gradient(h))[..., 0]
    else:
      decision = logits
    if use_topk:
      chosen = targets
    elif self.caps[r] >= 1.0:
      chosen = active
    else:
      chosen = depth_routing.causal_decision(decision, active)
    terms = []
    if targets is not None:
      agree = jnp.where(active, (decision >= 0) == targets, False)
      terms.append(
        (depth_routing.bce_aux_loss(decision, targets, active), jnp.sum(agree) / jnp.maximum(jnp.sum(active), 1))
      )
    return StepRoute(chosen, gate), terms

  def _recursion(self, r, h, positions, route, static_k, cache, new_cache, shared):
    """Recursion r: the shared layers run on the tokens `route.chosen`, the others pass unchanged (Sec. 2.1, 2.2.1).

    Training top-k with a static k runs the layers on the gathered chosen tokens only; otherwise on all tokens, with
    the attention masked (recursion-wise caching) and the update kept for the chosen ones.

    Args:
      h: [batch, length, d]; positions: [batch, length]; route: StepRoute of recursion r.
      shared: the recursion-0 keys/values of KV sharing (one SharedKV per layer), None before they exist.

    Returns:
      (h [batch, length, d], shared).
    """
    b, t = route.chosen.shape
    kv = self._recursion_kv(r, shared, cache)
    if static_k is not None and static_k[r] < t:
      idx = depth_routing.chosen_indices(route.chosen, static_k[r])

      def take(a):
        return None if a is None else jnp.take_along_axis(a, idx if a.ndim == 2 else idx[..., None], axis=1)

      x = take(h)
      y, out_kv = self._shared_layers(r, x, take(positions), None, kv)
      update = self._combine(x, y, take(route.gate), take(route.last), take(route.stack_input))
      h = h.at[jnp.arange(b)[:, None], idx].set(update.astype(h.dtype))
    else:
      mask = self._recursion_mask(r, route.chosen, positions, cache, new_cache)
      # Decoding: a recursion that no token of the batch runs is skipped, so early exits save compute (its cache is
      # left as it was; recursion-wise caching marks the token inactive there, KV sharing reads r = 0).
      skip_unless = route.chosen if cache is not None and r > 0 else None
      y, out_kv = self._shared_layers(r, h, positions, mask, kv, skip_unless)
      update = self._combine(h, y, route.gate, route.last, route.stack_input)
      h = jnp.where(route.chosen[..., None], update.astype(h.dtype), h)
    return h, self._store_kv(r, out_kv, shared, cache, new_cache)

  def _shared_layers(self, r, x, positions, mask, kv, skip_unless=None):
    """The unique layers recursion r runs (Sec. 2.1, parameter sharing: `self.schedule[r]`).

    Args:
      x: [batch, n, d] with positions [batch, n]; mask: extra attention mask or None; kv: one attention cache per
        layer (KVCache, SharedKV or None).
      skip_unless: optional [batch, length] bool; when none is True the layers are skipped (`nn.cond`).

    Returns:
      (y [batch, n, d], the layers' updated caches).
    """

    def run(module, y, kv):
      out = []
      for j, layer_id in enumerate(self.schedule[r]):
        y, c, _ = module.layers[layer_id](y, positions, cache=kv[j], mask=mask)
        out.append(c)
      return y, tuple(out)

    if skip_unless is None:
      return run(self, x, kv)
    return nn.cond(jnp.any(skip_unless), run, lambda module, y, kv: (y, tuple(kv)), self, x, kv)

  def _combine(self, x, y, gate, last, stack_input):
    """A chosen token's new state from its input x = h_r and the layers' output y = Block_r(h_r) (Sec. 2.2.1;
    Block_r(h) holds its own residual, authors' code).

    Expert-choice: `h_r + g * y` (`expert_choice_router.py`: scatter-add of the weighted output onto the recursion's
    input). Token-choice: y at the recursions before the token's last one, and `h_0 + g * y` at its last one, h_0
    being `stack_input`, the input of the whole recursion stack (`token_choice_router.py`: `final_x` starts as a copy
    of the stack's input and receives the weighted output of the token's last recursion; the intermediate states
    `updates` are the unweighted block outputs). The baseline: y.

    Args:
      x, y: [batch, n, d]; gate: [batch, n] or None; last: [batch, n] bool or None; stack_input: [batch, n, d] or
        None.
    """
    if self.router == "expert":
      return x + gate[..., None] * y
    if self.router == "token":
      return jnp.where(last[..., None], stack_input + gate[..., None] * y, y)
    return y

  def _recursion_kv(self, r, shared, cache):
    """The attention cache of each layer of recursion r (Sec. 2.2.2): recursion-wise caching reads the decoding cache
    of recursion r (None in a full forward); KV sharing captures recursion 0's keys/values (`SharedKV()`, or the
    decoding cache of recursion 0) and lets later recursions attend to them."""
    n = len(self.schedule[r])
    if self.kv_mode == "share" and r > 0:
      return tuple(shared)
    if cache is not None:
      return tuple(cache["recursions"][r])
    return (SharedKV(),) * n if self.kv_mode == "share" else (None,) * n

  def _recursion_mask(self, r, chosen, positions, cache, new_cache):
    """Recursion-wise caching (Sec. 2.2.2): at recursion r a query attends only to the tokens that run r; decoding
    records them in the cache's `active[r]` (written into `new_cache`). KV sharing: None (all of recursion 0's keys).

    Returns:
      None or bool [batch, 1, 1, keys].
    """
    if self.kv_mode != "recursion":
      return None
    if cache is None:
      return chosen[:, None, None, :]
    rows = jnp.arange(chosen.shape[0])[:, None]
    act = cache["active"][r].at[rows, positions].set(chosen, mode="drop")
    new_cache["active"] = new_cache["active"].at[r].set(act)
    return act[:, None, None, :]

  def _store_kv(self, r, out_kv, shared, cache, new_cache):
    """Keeps the keys/values recursion r produced (Sec. 2.2.2): recursion 0's become the `shared` ones of KV sharing;
    the decoding cache keeps every recursion's (recursion-wise) or recursion 0's (sharing). Returns `shared`."""
    if self.kv_mode == "share" and r == 0:
      shared = [c if isinstance(c, SharedKV) else SharedKV(*c.read()) for c in out_kv]
    if cache is not None and (self.kv_mode == "recursion" or r == 0):
      recs = list(new_cache["recursions"])
      recs[r] = tuple(out_kv)
      new_cache["recursions"] = tuple(recs)
    return shared

  def _depth_losses_and_metrics(self, aux, metrics, decision_terms, ran):
    """Adds the expert-choice BCE loss (summed over the steps, Sec. 2.2.1) to `aux` and the depth metrics (histogram,
    fraction reaching each recursion, mean depth, capacity usage) to `metrics`; ran: [batch, length] int32.
    Returns the aux loss."""
    if decision_terms:
      bce = jnp.sum(jnp.stack([bce for bce, _ in decision_terms]))
      aux = aux + self.bce_coef * bce
      metrics.update(
        router_bce_loss=bce, router_decision_accuracy=jnp.mean(jnp.stack([acc for _, acc in decision_terms]))
      )
    hist, reached = depth_routing.depth_histogram(ran, self.num_recursions)
    metrics.update(depth_hist=hist, depth_reached=reached, mean_depth=jnp.mean(ran.astype(jnp.float32)))
    if self.router == "expert":
      metrics["capacity_usage"] = reached / jnp.asarray(self.caps, jnp.float32)
    return aux

  def num_params(self):
    """Analytic unique-parameter count (equals `count_params` of the initialised params)."""
    num_unique = layer_schedule(self.sharing, self.num_layers, self.num_recursions)[0]
    d, kv_dim = self.embed_dim, (self.num_kv_heads or self.num_heads) * self.head_dim
    attention = 2 * d * self.num_heads * self.head_dim + 2 * d * kv_dim
    layer = attention + (3 if ACTIVATIONS[self.mlp_activation][1] else 2) * d * self.mlp_dim + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + num_unique * layer + self._router_params() + d + head

  def _router_params(self):
    """Parameters of all depth routers (each `DepthRouter` has no biases)."""
    if self.router == "none":
      return 0
    d = self.embed_dim
    if self.router == "expert":
      outputs, count = 1, self.num_recursions * (2 if self.causal_router == "aux_router" else 1)
    else:
      outputs, count = self.num_recursions, 1
    return count * (d * outputs if self.router_arch == "linear" else 2 * d * d + 2 * d * outputs)

  def train_flops_per_token(self, seq_len):
    """Analytic training FLOPs per token, counting that tokens leave early (6 FLOPs per matmul parameter per token that
    uses it, plus `12 * attention_dim * keys` per attention layer; Kaplan et al. 2020 as in `zoo.layers.accounting`).

    Recursion r is run by a fraction f_r of the tokens: the capacity for expert-choice, all for the baseline, and
    (N_r - r) / N_r for token-choice, i.e. a balanced router ([guess]: the real split is learned). With recursion-wise
    caching a query of recursion r sees f_r of the keys; with KV sharing it sees all keys, and recursions r > 0 skip the
    key/value projections. The input embedding lookup is free; the output projection counts; routers count as if they
    scored every token. A capacity warm-up (more tokens early in training) is not counted.

    Returns:
      float FLOPs per token.
    """
    n_r = self.num_recursions
    _, first, schedule, _ = layer_schedule(self.sharing, self.num_layers, n_r)
    if self.router == "expert":
      fractions = self.capacities or depth_routing.default_capacities(n_r)
    elif self.router == "token":
      fractions = depth_routing.default_capacities(n_r)
    else:
      fractions = (1.0,) * n_r
    d, kv_dim = self.embed_dim, (self.num_kv_heads or self.num_heads) * self.head_dim
    attention_dim = self.num_heads * self.head_dim
    ffn = (3 if ACTIVATIONS[self.mlp_activation][1] else 2) * d * self.mlp_dim
    q_out = 2 * d * attention_dim
    kv_proj = 2 * d * kv_dim
    layer = ffn + q_out + kv_proj
    keys = mean_attended_keys(seq_len)
    flops = 6.0 * (d * self.vocab_size + self._router_params())
    if first is not None:
      flops += 2 * (6.0 * layer + 12.0 * attention_dim * keys)
    base = len(schedule[0])
    for r, f in enumerate(fractions):
      share = self.kv_mode == "share" and r > 0
      params = layer - kv_proj if share else layer
      seen = keys if self.kv_mode == "share" else f * keys
      flops += f * base * (6.0 * params + 12.0 * attention_dim * seen)
    return flops
