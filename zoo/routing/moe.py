"""Linen modules that own routing parameters: `Router` (gate kernel, balancing bias) and `MoEFFN` (stacked experts).

The math lives in the pure functions of `zoo.routing.routers`, `zoo.routing.dispatch` and
`zoo.routing.expert_parallel`; these modules only create parameters (with logical axis names, see
`zoo.layers.axes.LOGICAL_AXIS_RULES`) and call them. `MoEFFN` is where the choice between local dispatch and expert
parallelism is made.

The routers models pick by name are registered here (`zoo.routing.registry`): 'softmax_topk', 'sigmoid_topk',
'expert_choice' and 'random' (a frozen random softmax router), each a factory of a configured `Router`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.routing import dispatch, expert_parallel, routers
from zoo.routing.registry import register_router


def _expert_init():
  """Fan-in scaled init for stacked [experts, in, out] kernels (each expert initialised like one dense layer)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


class Router(nn.Module):
  """Linear router `logits = x W` (float32) followed by a routing function of `zoo.routing.routers`.

  score='softmax': `softmax_topk` (Switch / Mixtral; with n_group > 1 DeepSeek-V2 group-limited).
  score='sigmoid': `sigmoid_topk` (DeepSeek-V3); with `bias_balancing` the selection bias lives in the
    'routing_state' collection and is updated by `update_balance_bias` in `apply(..., mutable=['routing_state'])`
    when `deterministic=False` (aux-loss-free balancing, DeepSeek-V3 Sec. 2.1.2).
  score='expert_choice': `expert_choice` with `capacity_factor` (Zhou et al. 2022).
  frozen=True: the kernel is a random matrix kept in 'routing_state' and never trained (SMoE-Dropout, Chen et al.
    2023, Sec. 3.2; use with score='softmax', renormalize=True: softmax over the top-k logits).
  jitter_eps > 0: multiplicative Uniform(1 - eps, 1 + eps) noise on the router input when `deterministic=False`
    (Switch Sec. 2.4); draws from the 'dropout' RNG stream.
  Models build configured Routers by router name through the registry (`zoo.routing.get_router`, factories below).

  Attributes:
    num_experts: E.
    num_experts_per_tok: k, experts per token (top-k scores).
    score, renormalize, n_group, topk_group, routed_scaling_factor: see `zoo.routing.routers`.
    bias_balancing: keep and update a selection bias (score='sigmoid' only).
    bias_update_rate: u of the bias update.
    capacity_factor: expert-choice capacity factor.
    jitter_eps: router jitter half-width (0 = off).
    frozen: frozen random router.
    per_sequence_balance: compute the load-balance loss per sequence (input [batch, length, embed]).
  """

  num_experts: int
  num_experts_per_tok: int = 2
  score: str = "softmax"
  renormalize: bool = True
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  bias_balancing: bool = False
  bias_update_rate: float = 1e-3
  capacity_factor: float = 1.0
  jitter_eps: float = 0.0
  frozen: bool = False
  per_sequence_balance: bool = False
  kernel_init: Any = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    """Routes the tokens of x.

    Args:
      x: [..., embed] (e.g. [batch, length, embed]); routed as a flat list of tokens.
      deterministic: False in training (jitter, bias update).

    Returns:
      Routing over the flattened tokens [prod(leading dims)].
    """
    if self.score not in ROUTER_SCORES:
      raise ValueError(f"Router.score={self.score!r} is unknown; allowed: {tuple(ROUTER_SCORES)}")
    if self.bias_balancing and self.score != "sigmoid":
      raise ValueError(f"Router.bias_balancing needs score='sigmoid', got score={self.score!r}")
    if self.per_sequence_balance and x.ndim != 3:
      raise ValueError(f"Router.per_sequence_balance needs x as [batch, length, embed], got shape {x.shape}")
    embed = x.shape[-1]
    init = nn.with_logical_partitioning(self.kernel_init, ("embed", "expert"))
    if self.frozen:
      kernel = nn.meta.unbox(
        self.variable("routing_state", "kernel", lambda: init(self.make_rng("params"), (embed, self.num_experts))).value
      )
    else:
      kernel = self.param("kernel", init, (embed, self.num_experts), jnp.float32)
    tokens = x.reshape(-1, embed).astype(jnp.float32)
    if not deterministic and self.jitter_eps > 0:
      tokens = routers.jitter(tokens, self.make_rng("dropout"), self.jitter_eps)
    logits = tokens @ kernel
    sequence_length = x.shape[-2] if self.per_sequence_balance else None
    common = dict(
      renormalize=self.renormalize,
      n_group=self.n_group,
      topk_group=self.topk_group,
      routed_scaling_factor=self.routed_scaling_factor,
      sequence_length=sequence_length,
    )
    return ROUTER_SCORES[self.score](self, logits, common, deterministic)


def _softmax_scores(router, logits, common, deterministic):
  del deterministic
  return routers.softmax_topk(logits, router.num_experts_per_tok, **common)


def _expert_choice_scores(router, logits, common, deterministic):
  del common, deterministic
  return routers.expert_choice(logits, router.capacity_factor)


def _sigmoid_scores(router, logits, common, deterministic):
  """`sigmoid_topk`, with the selection bias of `bias_balancing` kept (and updated) in 'routing_state'."""
  bias = None
  if router.bias_balancing:
    bias_var = router.variable(
      "routing_state",
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ("expert",)),
      None,
      (router.num_experts,),
      jnp.float32,
    )
    bias = nn.meta.unbox(bias_var.value)
  routing = routers.sigmoid_topk(logits, router.num_experts_per_tok, bias=bias, **common)
  if router.bias_balancing and not deterministic and router.is_mutable_collection("routing_state"):
    bias_var.value = nn.meta.replace_boxed(
      bias_var.value, routers.update_balance_bias(bias, routing.metrics["expert_load"], router.bias_update_rate)
    )
  return routing


# `Router.score` -> the routing function `(router module, logits [tokens, E] float32, common kwargs, deterministic)
# -> Routing` (called inside the router's compact `__call__`, so it may create the router's variables).
ROUTER_SCORES = {"softmax": _softmax_scores, "sigmoid": _sigmoid_scores, "expert_choice": _expert_choice_scores}


def _no_bias(name, bias):
  if bias:
    raise ValueError(f"router {name!r} has no selection bias (bias=True); use 'sigmoid_topk'")


@register_router("softmax_topk")
def softmax_topk_router(*, bias=False, bias_update_rate=0.0, **options):
  """Softmax token-choice top-k (`routers.softmax_topk`): Switch (k=1), Mixtral, DeepSeek-V2 with groups."""
  del bias_update_rate
  _no_bias("softmax_topk", bias)
  return Router(score="softmax", **options)


@register_router("sigmoid_topk")
def sigmoid_topk_router(*, bias=False, bias_update_rate=0.0, **options):
  """Sigmoid top-k (`routers.sigmoid_topk`, DeepSeek-V3); `bias`: the selection bias in 'routing_state', moved by
  aux-loss-free balancing when `bias_update_rate` > 0."""
  return Router(score="sigmoid", bias_balancing=bias, bias_update_rate=bias_update_rate, **options)


@register_router("expert_choice")
def expert_choice_router(*, bias=False, bias_update_rate=0.0, **options):
  """Expert choice (`routers.expert_choice`) with capacity factor c = `num_experts_per_tok` (the average experts per
  token, so it costs what top-k costs)."""
  del bias_update_rate
  _no_bias("expert_choice", bias)
  return Router(score="expert_choice", capacity_factor=float(options["num_experts_per_tok"]), **options)


@register_router("random")
def random_router(*, bias=False, bias_update_rate=0.0, **options):
  """Frozen random softmax top-k router (SMoE-Dropout, Chen et al. 2023, Sec. 3.2): the kernel lives in
  'routing_state' and is never trained."""
  del bias_update_rate
  _no_bias("random", bias)
  return Router(score="softmax", frozen=True, **options)


class MoEFFN(nn.Module):
  """Mixture-of-experts FFN: router + stacked experts + optional shared experts.

  `y = sum_{e in topk} w_e FFN_e(x) [+ g(x) * FFN_shared(x)]`. Shared experts as in DeepSeekMoE (Dai et al. 2024,
  Sec. 3.2) are one dense FFN of width `shared_mlp_dim` (= number of shared experts * their width); with
  `shared_gate` its output is scaled by `sigmoid(x w_g)` as in Qwen2-MoE (Qwen2 report, Sec. 2.2.3).

  Attributes:
    num_experts: E routed experts.
    expert_mlp_dim: hidden width of one routed expert.
    num_experts_per_tok: k, used when `router` is None (the default softmax top-k router).
    activation: 'swiglu' | 'reglu' | 'geglu' (gated) or 'silu' | 'relu' | 'gelu' (plain).
    router: a `Router` (unbound) to use instead of the default `Router(num_experts, num_experts_per_tok)`.
    dispatch: how tokens reach their experts ('dense' | 'capacity' | 'dropless'; None = automatic per backend).
    permute: 'dropless' token permutation: 'fused' (gather-fused grouped matmul + scatter combine) | 'custom_vjp' |
      'gather' (see `zoo.routing.dispatch.dropless_ffn`).
    capacity_factor: capacity factor for 'capacity' / expert parallelism (Switch's 1.25 by default; None = no
      dropping, at the cost of buffers as large as computing every expert).
    shared_mlp_dim: width of the shared-expert FFN (0 = none).
    shared_gate: sigmoid gate on the shared expert output.
    dtype: compute dtype of the experts (routing is always float32).
    param_dtype: parameter dtype.
    mesh: a Mesh whose 'expert' axis > 1 enables expert parallelism (all-to-all); None = the mesh in context
      (`jax.set_mesh`, as in the engine's train step) when its 'expert' axis is > 1 and the tokens split evenly over
      its 'batch' axes (`zoo.routing.expert_parallel.context_mesh`), else the local `dispatch`. Expert parallelism
      is capacity-buffered per device (`expert_parallel_ffn`; `capacity_factor=None` drops nothing and then equals
      dropless dispatch). This module makes the choice: `zoo.routing.dispatch.moe_ffn` is the local path only.
  """

  num_experts: int
  expert_mlp_dim: int
  num_experts_per_tok: int = 2
  activation: str = "swiglu"
  router: Router | None = None
  dispatch: str | None = None
  permute: str = "fused"
  capacity_factor: float | None = 1.25
  shared_mlp_dim: int = 0
  shared_gate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  mesh: Any = None

  @nn.compact
  def __call__(self, x, *, deterministic=True, routing=None):
    """Applies the MoE FFN.

    Args:
      x: [..., embed] (e.g. [batch, length, embed]).
      deterministic: False in training.
      routing: a precomputed Routing over the flattened tokens (pre-gating / recurrent routers); None = use the
        router.

    Returns:
      (y [..., embed] in `dtype`, aux dict of unweighted scalar losses, metrics dict: routing metrics +
      'dropped_fraction').
    """
    if self.activation in dispatch.GATED_ACTIVATIONS:
      names = ("gate", "up", "down")
    elif self.activation in dispatch.PLAIN_ACTIVATIONS:
      names = ("up", "down")
    else:
      raise ValueError(
        f"MoEFFN.activation={self.activation!r} is unknown; allowed: "
        f"{sorted(dispatch.GATED_ACTIVATIONS) + sorted(dispatch.PLAIN_ACTIVATIONS)}"
      )
    embed = x.shape[-1]
    if routing is None:
      router = (
        self.router if self.router is not None else Router(self.num_experts, self.num_experts_per_tok, name="router")
      )
      if router.num_experts != self.num_experts:
        raise ValueError(f"router.num_experts={router.num_experts} != MoEFFN.num_experts={self.num_experts}")
      routing = router(x, deterministic=deterministic)
    expert_weights = {name: self.expert_weight(name, embed).astype(self.dtype) for name in names}
    tokens = x.reshape(-1, embed).astype(self.dtype)
    tokens = nn.with_logical_constraint(tokens, ("batch", "embed"))
    y, dispatch_metrics = self._dispatch(tokens, routing, expert_weights)
    if self.shared_mlp_dim:
      y = y + self._shared(tokens, names)
    metrics = {**routing.metrics, **dispatch_metrics}
    return y.reshape(x.shape[:-1] + (embed,)), dict(routing.aux), metrics

  def expert_weight(self, name, embed):
    """The stacked weight `name` of the routed experts: 'gate' / 'up' [E, embed, expert_mlp], 'down' [E, expert_mlp,
    embed]. A method of its own so that `zoo.layers.lora` can add an adapter to the weight it returns."""
    shape = (
      (self.num_experts, self.expert_mlp_dim, embed)
      if name == "down"
      else (self.num_experts, embed, self.expert_mlp_dim)
    )
    axes = ("expert", "expert_mlp", "embed") if name == "down" else ("expert", "embed", "expert_mlp")
    return self.param(name, nn.with_logical_partitioning(_expert_init(), axes), shape, self.param_dtype)

  def _dispatch(self, tokens, routing, expert_weights):
    """Expert parallelism when `mesh` (or the mesh in context) splits the experts over devices, else local dispatch.

    Args:
      tokens: [tokens, embed] in `dtype`; routing: a Routing over them; expert_weights: the stacked expert weights.

    Returns:
      (y [tokens, embed], metrics {'dropped_fraction': scalar}).
    """
    if self.permute not in dispatch.PERMUTES:
      raise ValueError(f"MoEFFN.permute={self.permute!r} is unknown; allowed: {dispatch.PERMUTES}")
    mesh = self.mesh if self.mesh is not None else expert_parallel.context_mesh(tokens.shape[0])
    if mesh is not None and expert_parallel.expert_devices(mesh) > 1:
      expert_ids, weights = dispatch.as_slots(routing)
      if expert_ids.shape[0] != tokens.shape[0]:
        raise ValueError(f"routing has {expert_ids.shape[0]} tokens but x has {tokens.shape[0]}")
      return expert_parallel.expert_parallel_ffn(
        tokens,
        expert_ids,
        weights,
        expert_weights,
        mesh=mesh,
        activation=self.activation,
        capacity_factor=self.capacity_factor,
      )
    options = dict(
      dispatch=self.dispatch, activation=self.activation, capacity_factor=self.capacity_factor, permute=self.permute
    )
    mesh = expert_parallel.data_parallel_mesh(tokens.shape[0]) if self.mesh is None else None
    if mesh is None:
      return dispatch.moe_ffn(tokens, routing, expert_weights, **options)
    expert_ids, weights = dispatch.as_slots(routing)
    mode = dispatch.default_dispatch() if self.dispatch is None else self.dispatch
    if mode == "capacity":
      cap = getattr(routing, "capacity", None) or dispatch.capacity(
        tokens.shape[0], expert_ids.shape[1], self.num_experts, self.capacity_factor
      )
      return expert_parallel.data_parallel_capacity_ffn(
        tokens, expert_ids, weights, expert_weights, mesh=mesh, activation=self.activation, capacity=cap
      )

    def local_ffn(x, expert_ids, weights, expert_weights):  # 'dense' / 'dropless': a token's output is its own
      local_routing = routers.Routing(expert_ids=expert_ids, weights=weights, probs=weights)  # (probs unused)
      y, metrics = dispatch.moe_ffn(x, local_routing, expert_weights, **options)
      return y, metrics["dropped_fraction"]

    return expert_parallel.data_parallel_ffn(local_ffn, tokens, expert_ids, weights, expert_weights, mesh=mesh)

  def _shared(self, tokens, names):
    embed = tokens.shape[-1]
    hidden = {}
    for name in names[:-1]:
      kernel = self.param(
        f"shared_{name}",
        nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
        (embed, self.shared_mlp_dim),
        self.param_dtype,
      )
      hidden[name] = tokens @ kernel.astype(self.dtype)
    if "gate" in hidden:
      h = dispatch.GATED_ACTIVATIONS[self.activation](hidden["gate"]) * hidden["up"]
    else:
      h = dispatch.PLAIN_ACTIVATIONS[self.activation](hidden["up"])
    down = self.param(
      "shared_down",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
      (self.shared_mlp_dim, embed),
      self.param_dtype,
    )
    out = h @ down.astype(self.dtype)
    if self.shared_gate:
      gate = self.param(
        "shared_gate_kernel",
        nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
        (embed, 1),
        self.param_dtype,
      )
      out = out * jax.nn.sigmoid(tokens.astype(jnp.float32) @ gate.astype(jnp.float32)).astype(self.dtype)
    return out
