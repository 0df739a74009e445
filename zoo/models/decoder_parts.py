"""Parts of the zoo's mixture-of-experts decoder LMs, shared by the model files (no model is registered here).

Composition: a decoder LM of the zoo is `DenseLM` (embedding, attention, dense FFN, output) plus the field groups it
uses, each a Linen mixin that declares its config keys, checks them and builds its part:
- `ExpertLayers`: which layers have routed experts, how many, how wide, how tokens reach them (`dispatch`), and the
  layer loop that collects every MoE layer's losses, metrics and expert ids (`expert_forward`);
- `TopKRouting`: the per-layer router chosen by name from `zoo.routing`'s registry, and its loss weights;
- `SharedExperts`: always-on shared experts.
`MoELM` is the three of them; a model with another router (RMoE, SmallThinker, SMoE-Dropout) or FFN (BlockFFN)
composes only the groups whose keys mean something to it, so an unused key fails at start-up.

Each group is a Linen mixin of a `DenseLM` subclass: it declares its config keys as fields, checks them in
`__post_init__` (cooperatively: every `__post_init__` calls `super().__post_init__()`) and builds its part. A model
lists its groups before `DenseLM`, e.g. `class MoELM(ExpertLayers, TopKRouting, SharedExperts, DenseLM)`, and defines
`moe_ffn_factory()` (the FFN of a MoE layer) and `moe_ffn_params()` (its parameter count).
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import DecoderBlock
from zoo.layers.mlp import ACTIVATIONS
from zoo.models.output import ModelOutput, sow_output
from zoo.models.registry import ConfigError, check_config
from zoo.routing import (
  DISPATCH_MODES,
  GATED_ACTIVATIONS,
  PLAIN_ACTIVATIONS,
  MoEFFN,
  get_router,
  router_names,
  stack_layer_metrics,
)

DISPATCH = ("auto",) + DISPATCH_MODES


def layer_expert_ids(routing, x):
  """A layer's routing decision per token: `routing.expert_ids` [tokens, k] as int32 [batch, length, k] (x's
  leading dims; -1 = empty slot), the item MoE FFNs return to `ExpertLayers.expert_layers`."""
  return routing.expert_ids.reshape(x.shape[:-1] + routing.expert_ids.shape[-1:]).astype(jnp.int32)


def weighted_aux_loss(aux_losses, coefs):
  """sum over MoE layers and losses of `coefs[name] * value`; aux_losses: one {name: scalar} per MoE layer.

  Raises:
    ValueError: a layer returned a loss with no coefficient in `coefs`.
  """
  total = jnp.zeros((), jnp.float32)
  for aux in aux_losses:
    for name, value in aux.items():
      if name not in coefs:
        raise ValueError(f"router aux loss {name!r} has no coefficient; known: {sorted(coefs)}")
      total = total + coefs[name] * value
  return total


class RoutedMoEFFN(MoEFFN):
  """`MoEFFN` with the FFN interface of `ExpertLayers.expert_layers`: returns `(y, (aux, metrics, expert_ids))`, the
  expert ids [batch, length, k] of `layer_expert_ids`. Its `router` (required) is the child 'router'."""

  def __call__(self, x, *, deterministic=True):
    if self.router.num_experts != self.num_experts:
      raise ValueError(f"router.num_experts={self.router.num_experts} != MoEFFN.num_experts={self.num_experts}")
    routing = self.router(x, deterministic=deterministic)
    y, aux, metrics = super().__call__(x, deterministic=deterministic, routing=routing)
    return y, (aux, metrics, layer_expert_ids(routing, x))


def routed_ffn_factory(model, **kwargs):
  """The MoE FFN builder of `model` (with `ExpertLayers` and a `make_router()`): `name -> RoutedMoEFFN` with the
  model's `expert_kwargs()` and `kwargs` (e.g. `SharedExperts.shared_ffn_kwargs()`); each call gets its own
  router."""
  kwargs = dict(model.expert_kwargs(), **kwargs)
  return lambda name: RoutedMoEFFN(router=model.make_router(), name=name, **kwargs)


class ExpertLayers(nn.Module):
  """Config keys and layer loop of a decoder whose FFN is a mixture of experts at some layers (a mixin of a
  `DenseLM` subclass, which defines `moe_ffn_factory()`: the FFN of a MoE layer).

  Attributes:
    moe_every: layer i is MoE iff i >= first_dense_layers and i % moe_every == 0 (1 = every layer).
    first_dense_layers: the first layers keep a dense FFN (DeepSeek).
    num_experts: routed experts E per MoE layer.
    expert_mlp_dim: hidden width of one routed expert.
    capacity_factor: expert buffer size factor of 'capacity' dispatch, `C = ceil(cf * tokens * k / E)`; 0 = no
      dropping (C = tokens).
    dispatch: 'auto' (capacity on CPU, dropless elsewhere) | 'dense' | 'capacity' | 'dropless'.
  """

  exposes: ClassVar[tuple[str, ...]] = ("expert_ids",)
  moe_every: int = 1
  first_dense_layers: int = 0
  num_experts: int = 8
  expert_mlp_dim: int = 128
  capacity_factor: float = 1.25
  dispatch: str = "auto"

  def __post_init__(self):
    check_config(
      self,
      positive=("num_experts", "expert_mlp_dim", "moe_every"),
      non_negative=("first_dense_layers", "capacity_factor"),
      choices={"dispatch": DISPATCH},
    )
    experts = {**GATED_ACTIVATIONS, **PLAIN_ACTIVATIONS}
    if self.mlp_activation not in experts:
      raise ConfigError(
        f"config.model.mlp_activation={self.mlp_activation!r} has no expert version; choose one of {sorted(experts)}"
      )
    if not self.moe_layers:
      raise ConfigError(
        f"config.model: no MoE layer with num_layers={self.num_layers}, "
        f"first_dense_layers={self.first_dense_layers}, moe_every={self.moe_every}; a layer i is MoE "
        "iff i >= first_dense_layers and i % moe_every == 0"
      )
    super().__post_init__()

  @property
  def moe_layers(self):
    """Indices of the layers with a routed-expert FFN."""
    return tuple(i for i in range(self.num_layers) if i >= self.first_dense_layers and i % self.moe_every == 0)

  def expert_kwargs(self):
    """The `MoEFFN` arguments these fields set (experts, dispatch, activation, dtypes)."""
    return dict(
      num_experts=self.num_experts,
      expert_mlp_dim=self.expert_mlp_dim,
      activation=self.mlp_activation,
      dispatch=None if self.dispatch == "auto" else self.dispatch,
      capacity_factor=self.capacity_factor or None,
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
    )

  def expert_ffn_params(self, gated=None):
    """Parameters of one layer's routed experts (gated: three matrices each, else two)."""
    gated = ACTIVATIONS[self.mlp_activation][1] if gated is None else gated
    return (3 if gated else 2) * self.embed_dim * self.num_experts * self.expert_mlp_dim

  def dense_ffn_params(self):
    """Parameters of the dense FFN a MoE layer replaces."""
    return (3 if ACTIVATIONS[self.mlp_activation][1] else 2) * self.embed_dim * self.mlp_dim

  def num_params(self):
    """Analytic total parameter count (equals `count_params` of the initialised params): the dense LM with each MoE
    layer's FFN replaced by the model's `moe_ffn_params()`."""
    return super().num_params() + len(self.moe_layers) * (self.moe_ffn_params() - self.dense_ffn_params())

  def num_active_params(self):
    """Parameters a token uses: `num_params()` minus the `num_experts - num_experts_per_tok` routed experts it skips
    in every MoE layer (expert choice: k is the average experts per token). The embedding table is counted, as in
    the Mixtral / DeepSeek active-parameter figures."""
    per_expert = self.expert_ffn_params() // self.num_experts
    return self.num_params() - len(self.moe_layers) * (self.num_experts - self.num_experts_per_tok) * per_expert

  def expert_forward(self, tokens, positions, cache, deterministic, make_block=None, ffn_kwargs=None, aux_coefs=None):
    """The whole LM forward of a MoE decoder; call it from the model's compact `__call__`.

    Args:
      tokens, positions, cache, deterministic: as `DenseLM.__call__`.
      make_block: `(i, is_moe) -> block` (default `decoder_block`).
      ffn_kwargs: see `expert_layers`.
      aux_coefs: {loss name: weight} of the losses the MoE layers return (`aux_loss` is their weighted sum); None
        when the model weights them itself (they stay, unweighted, in the metrics).

    Returns:
      (logits [batch, length, vocab_size] float32, ModelOutput(aux_loss, metrics [moe_layers, ...], cache)).
    """
    embed, x, positions = self.embed_tokens(tokens, positions, cache, deterministic)
    x, out, aux_losses = self.expert_layers(
      x, positions, cache, deterministic, make_block or self.decoder_block, ffn_kwargs
    )
    if aux_coefs is not None:
      out = out.replace(aux_loss=weighted_aux_loss(aux_losses, aux_coefs))
    return self.output_logits(embed, x), out

  def decoder_block(self, i, is_moe, block_cls=DecoderBlock, attention=None, **block_kwargs):
    """Layer i's block `layers_i`: `block_cls` (rematerialised if `remat`) with the MoE or the dense FFN and
    `attention` (default: `attention_factory()`); `block_kwargs` go to `block_cls`."""
    ffn = self.moe_ffn_factory() if is_moe else self.ffn_factory()
    return self.layer_block(i, ffn, attention, block_cls, **block_kwargs)

  def expert_layers(self, x, positions, cache, deterministic, make_block, ffn_kwargs=None):
    """Runs the layers (`make_block(i, is_moe)`, e.g. `decoder_block`), collects the MoE layers' aux losses and
    metrics and sows their expert ids (`intermediates['expert_ids']` [moe_layers, batch, length, k], when
    'intermediates' is mutable).

    Each MoE layer's FFN returns `(y, (aux, metrics, expert_ids[, state]))`: unweighted aux losses, metrics, its
    routing decision int32 [batch, length, k] (`layer_expert_ids`) and optionally a state for the next MoE layer.
    `ffn_kwargs(state)`, if given, makes the extra FFN arguments of each MoE layer (None for dense layers) from the
    state the previous MoE layer returned (None before the first; RMoE's router state).

    Returns:
      (x, ModelOutput(aux_loss=0, metrics [moe_layers, ...] with the unweighted losses, cache), the aux loss dicts
      of the MoE layers in order).
    """
    moe = set(self.moe_layers)
    state, new_cache, aux_losses, layer_metrics, expert_ids = None, [], [], [], []
    for i in range(self.num_layers):
      extra = () if ffn_kwargs is None else (ffn_kwargs(state) if i in moe else None,)
      block = make_block(i, i in moe)
      x, layer_cache, ffn_aux = block(x, positions, None if cache is None else cache[i], None, deterministic, *extra)
      new_cache.append(layer_cache)
      if i in moe:
        aux, metrics, ids, *rest = ffn_aux
        state = rest[0] if rest else None
        aux_losses.append(aux)
        layer_metrics.append({**metrics, **aux})
        expert_ids.append(ids)
    sow_output(self, "expert_ids", lambda: jnp.stack(expert_ids))
    out = ModelOutput(
      aux_loss=jnp.zeros((), jnp.float32),
      metrics=stack_layer_metrics(layer_metrics),
      cache=None if cache is None else tuple(new_cache),
    )
    return x, out, aux_losses


class RouterLossWeights(nn.Module):
  """Config keys weighting the losses a top-k router returns (a mixin).

  Attributes:
    load_balance_coef: weight of the Switch load-balance loss (1e-2).
    z_loss_coef: weight of the router z-loss (1e-3).
  """

  load_balance_coef: float = 1e-2
  z_loss_coef: float = 1e-3

  def __post_init__(self):
    check_config(self, non_negative=("load_balance_coef", "z_loss_coef"))
    super().__post_init__()

  def aux_coefs(self):
    """{loss name a router returns: its weight} (`weighted_aux_loss`)."""
    return {"load_balance": self.load_balance_coef, "z_loss": self.z_loss_coef}


class TopKRouting(RouterLossWeights):
  """Config keys of a registered top-k router in every MoE layer (a mixin with `ExpertLayers`).

  Attributes:
    router: a registered router name (`zoo.routing.router_names()`): 'softmax_topk' | 'sigmoid_topk' |
      'expert_choice' | 'random' (frozen).
    num_experts_per_tok: k, experts per token (expert choice: the average c, capacity `C = tokens * k / E`).
    renormalize: normalise the k combine weights to sum 1 (token-choice routers).
    n_group, topk_group: group-limited selection (experts in n_group groups; each token picks from its best
      topk_group groups); n_group=1 = unlimited.
    routed_scaling_factor: multiplies the routed combine weights (DeepSeek-V2/V3).
    per_sequence_balance: compute the balance loss per sequence (DeepSeek-V3 Eq. 17-20) instead of per batch.
    router_jitter: half-width of the multiplicative router-input noise in training (Switch uses 1e-2; 0 = off).
    router_bias: the 'sigmoid_topk' router keeps a per-expert selection bias (DeepSeek-V3's score correction,
      HF `e_score_correction_bias`) in 'routing_state'; it stays fixed unless `bias_update_rate` > 0.
    bias_update_rate: u of the aux-loss-free bias update (DeepSeek-V3 uses 1e-3); > 0 needs `router_bias`.
    (and `RouterLossWeights`' load_balance_coef, z_loss_coef)
  """

  router: str = "softmax_topk"
  num_experts_per_tok: int = 2
  renormalize: bool = True
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  per_sequence_balance: bool = False
  router_jitter: float = 0.0
  router_bias: bool = False
  bias_update_rate: float = 0.0

  def __post_init__(self):
    check_config(self, choices={"router": router_names()}, non_negative=("router_jitter", "bias_update_rate"))
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ConfigError(
        f"config.model.num_experts_per_tok={self.num_experts_per_tok} is invalid; allowed "
        f"1..num_experts={self.num_experts}"
      )
    if self.n_group < 1 or self.num_experts % self.n_group:
      raise ConfigError(f"config.model.n_group={self.n_group} must be >= 1 and divide num_experts={self.num_experts}")
    if not 1 <= self.topk_group <= self.n_group:
      raise ConfigError(f"config.model.topk_group={self.topk_group} is invalid; allowed 1..n_group={self.n_group}")
    if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
      raise ConfigError(
        f"config.model.num_experts_per_tok={self.num_experts_per_tok} exceeds the "
        f"{self.topk_group * (self.num_experts // self.n_group)} experts of topk_group="
        f"{self.topk_group} groups"
      )
    if self.router_bias and self.router != "sigmoid_topk":
      raise ConfigError(f"config.model.router_bias=True needs router='sigmoid_topk', got router={self.router!r}")
    if self.bias_update_rate > 0 and not self.router_bias:
      raise ConfigError(
        f"config.model.bias_update_rate={self.bias_update_rate} (aux-loss-free balancing) needs "
        f"router='sigmoid_topk' and router_bias=True, got router={self.router!r}, "
        f"router_bias={self.router_bias}"
      )
    super().__post_init__()

  def make_router(self):
    """A fresh unbound router of the registered kind `router` (`zoo.routing.get_router`); `parent=None`: the MoE FFN
    that receives it adopts it as its 'router' child."""
    return get_router(self.router)(
      parent=None,
      num_experts=self.num_experts,
      num_experts_per_tok=self.num_experts_per_tok,
      renormalize=self.renormalize,
      n_group=self.n_group,
      topk_group=self.topk_group,
      routed_scaling_factor=self.routed_scaling_factor,
      jitter_eps=self.router_jitter,
      per_sequence_balance=self.per_sequence_balance,
      bias=self.router_bias,
      bias_update_rate=self.bias_update_rate,
    )

  def router_params(self):
    """Trainable parameters of one layer's router (a frozen router lives in 'routing_state')."""
    return 0 if self.router == "random" else self.embed_dim * self.num_experts


class SharedExperts(nn.Module):
  """Config keys of always-on shared experts beside the routed ones (a mixin with `ExpertLayers`).

  Attributes:
    num_shared_experts: always-on shared experts (DeepSeekMoE / Qwen2-MoE); 0 = none.
    shared_expert_mlp_dim: hidden width of one shared expert (0 = expert_mlp_dim).
    shared_expert_gate: scale the shared experts' output by `sigmoid(x w_g)` (Qwen2-MoE).
  """

  num_shared_experts: int = 0
  shared_expert_mlp_dim: int = 0
  shared_expert_gate: bool = False

  def __post_init__(self):
    check_config(self, non_negative=("num_shared_experts", "shared_expert_mlp_dim"))
    if self.shared_expert_gate and not self.num_shared_experts:
      raise ConfigError("config.model.shared_expert_gate=True needs num_shared_experts >= 1")
    super().__post_init__()

  @property
  def shared_mlp_dim(self):
    """Width of the one FFN the shared experts form (0 = none)."""
    return self.num_shared_experts * (self.shared_expert_mlp_dim or self.expert_mlp_dim)

  def shared_ffn_kwargs(self):
    """The `MoEFFN` arguments these fields set."""
    return dict(shared_mlp_dim=self.shared_mlp_dim, shared_gate=self.shared_expert_gate)

  def shared_params(self):
    """Parameters of one layer's shared experts (and their gate)."""
    gated = ACTIVATIONS[self.mlp_activation][1]
    return (3 if gated else 2) * self.embed_dim * self.shared_mlp_dim + (
      self.embed_dim if self.shared_expert_gate else 0
    )
