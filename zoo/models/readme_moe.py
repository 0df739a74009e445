"""Read-ME: router-decoupled MoE refactored from a dense LM (papers.md A4; Cai et al. 2024, "Read-ME: Refactorizing
LLMs as Router-Decoupled Mixture of Experts with System Co-Design", Sec. 3).

- Every FFN is `shared(x) + expert_{c(t)}(x)`: top-1, no gate weight (the combine weight is exactly 1), the shared
  expert always on (Sec. 3.1). Experts are `zoo.routing.MoEFFN` stacked experts with its shared expert; widths are
  fixed by the config, and experts extracted from a dense LM (`zoo.routing.pregate.readme_params_from_dense`) are
  zero-padded to them.
- The route `c(t)` comes from the pre-gating router `zoo.routing.pregate.PreGateRouter` (Sec. 3.2), a small causal
  transformer over the token ids only: ONE expert id per token, shared by ALL layers, computed before the backbone
  runs and handed to each layer's FFN through `DecoderBlock`'s `ffn_kwargs`.
- Router targets (Sec. 3.2): each layer scores every expert per token by the mean |input of down| over the expert's
  neurons (all experts are evaluated for this), the scores are normalised per layer and averaged over layers
  (`pregate_targets`, [guess] on the aggregation); loss `0.75 * CE(label smoothing 0.5) + 0.25 * soft CE`.
- Training alternates router-only and backbone-only phases (Sec. 3.2): `train_phase='router'` stops the LM loss's
  gradient (only the weighted router loss trains, i.e. the router), `'backbone'` drops the router loss (the router's
  argmax carries no gradient, so only the backbone trains), `'joint'` trains both. Run phases one after another with
  `--config.model.train_phase=... --config.init_from=<previous workdir>`. [guess] Frozen parameters still see the
  optimizer's weight decay; use `--config.optimizer.weight_decay=0` in phase runs to keep them exactly frozen.

Cache: a tuple of `num_layers` backbone KVCaches followed by `router_layers` router KVCaches. Cached decoding equals
the full forward (routes depend only on the token prefix; dispatch drops nothing with `capacity_factor=0`).

Output metrics: the `MoEFFN` routing metrics per layer stacked on [layers, ...] (`expert_load` [layers, experts], ...),
plus `router_loss` and `router_accuracy` (agreement of the router's argmax with the target argmax) when the router
loss is computed (phases 'router' and 'joint', no cache).

Per-token output (`exposes`, the `zoo.models` contract): with `apply(..., mutable=['intermediates'])`,
`intermediates['expert_ids']` int32 [num_layers, batch, length, 1], the pre-gate's expert of every token (the same
in every layer, as Read-ME routes; the layout of `moe_lm`'s expert ids).
"""

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers import Embed
from zoo.layers.mlp import ACTIVATIONS
from zoo.models.dense_lm import DenseLM, default_positions
from zoo.models.output import ModelOutput, sow_output
from zoo.models.registry import ConfigError, check_config, register_model
from zoo.routing import DISPATCH_MODES, GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, MoEFFN, stack_layer_metrics
from zoo.routing.pregate import PreGateRouter, expert_activation_scores, pregate_loss, pregate_routing, pregate_targets

TRAIN_PHASES = ("router", "backbone", "joint")
DISPATCH = ("auto",) + DISPATCH_MODES


class ReadMeFFN(MoEFFN):
  """`MoEFFN` dispatching the pre-gate's routing; with `with_scores` it also returns every expert's per-token score
  (mean |input of down| over its non-padded neurons), the router's target statistic. Returns `(y, (metrics,
  scores or None))` for `DecoderBlock`."""

  def __call__(self, x, *, deterministic=True, routing=None, with_scores=False):
    if routing is None:
      raise ValueError("ReadMeFFN needs the pre-gate routing (routing=...)")
    y, _, metrics = super().__call__(x, deterministic=deterministic, routing=routing)
    if not with_scores:
      return y, (metrics, None)
    weights = {
      n: nn.meta.unbox(self.get_variable("params", n)).astype(jnp.float32)
      for n in ("gate", "up")
      if self.has_variable("params", n)
    }
    tokens = jax.lax.stop_gradient(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
    up = jax.lax.stop_gradient(weights["up"])
    h = jnp.einsum("td,edh->teh", tokens, up)
    if "gate" in weights:
      h = (
        GATED_ACTIVATIONS[self.activation](jnp.einsum("td,edh->teh", tokens, jax.lax.stop_gradient(weights["gate"])))
        * h
      )
    else:
      h = PLAIN_ACTIVATIONS[self.activation](h)
    valid = jnp.any(up != 0, axis=1)
    return y, (metrics, expert_activation_scores(h, valid))


@register_model("readme_moe")
class ReadMeLM(DenseLM):
  """Read-ME LM (see the module docstring for the paper sections). Inherits the `DenseLM` fields; `mlp_dim` is the
  width of the dense FFN the experts are (or would be) extracted from.

  Attributes:
    num_experts: domain experts E (= the number of data domains used for extraction).
    keep_fraction: fraction of a dense FFN's neurons each domain keeps (0.5); fixes the default widths.
    expert_mlp_dim: width of one domain expert (0 = round(keep_fraction * mlp_dim), the most extraction can give).
    shared_mlp_dim: width of the shared expert (0 = round(keep_fraction * mlp_dim)).
    router_layers, router_num_heads, router_mlp_dim: the pre-gating router's transformer (width = embed_dim).
    train_phase: 'router' | 'backbone' | 'joint' (which part the loss trains).
    router_loss_coef: weight of the router loss in `aux_loss`.
    label_smoothing, hard_weight, soft_weight: the router loss (`zoo.routing.pregate.pregate_loss`).
    dispatch: 'auto' | 'dense' | 'capacity' | 'dropless'.
    capacity_factor: 0 = no token dropped (the routes known ahead are the routes run).
  """

  exposes: ClassVar[tuple[str, ...]] = ("expert_ids",)
  num_experts: int = 4
  keep_fraction: float = 0.5
  expert_mlp_dim: int = 0
  shared_mlp_dim: int = 0
  router_layers: int = 1
  router_num_heads: int = 2
  router_mlp_dim: int = 128
  train_phase: str = "joint"
  router_loss_coef: float = 1.0
  label_smoothing: float = 0.5
  hard_weight: float = 0.75
  soft_weight: float = 0.25
  dispatch: str = "auto"
  capacity_factor: float = 0.0

  def __post_init__(self):
    check_config(
      self,
      choices={"train_phase": TRAIN_PHASES, "dispatch": DISPATCH},
      positive=("num_experts", "router_layers", "router_num_heads", "router_mlp_dim"),
      intervals={"keep_fraction": "(0, 1]"},
      non_negative=(
        "expert_mlp_dim",
        "shared_mlp_dim",
        "router_loss_coef",
        "label_smoothing",
        "hard_weight",
        "soft_weight",
        "capacity_factor",
      ),
    )
    if self.mlp_activation not in {**GATED_ACTIVATIONS, **PLAIN_ACTIVATIONS}:
      raise ConfigError(
        f"config.model.mlp_activation={self.mlp_activation!r} has no expert version; choose one of "
        f"{sorted({**GATED_ACTIVATIONS, **PLAIN_ACTIVATIONS})}"
      )
    if self.attention != "gqa":
      raise ConfigError(f"config.model.attention={self.attention!r}: readme_moe supports 'gqa' only")
    if self.num_experts < 2:
      raise ConfigError(f"config.model.num_experts={self.num_experts} must be >= 2 (one per domain)")
    if self.embed_dim % self.router_num_heads or (self.embed_dim // self.router_num_heads) % 2:
      raise ConfigError(
        f"config.model.router_num_heads={self.router_num_heads} must split embed_dim="
        f"{self.embed_dim} into heads of even width"
      )
    super().__post_init__()

  @property
  def expert_width(self):
    return self.expert_mlp_dim or max(1, round(self.keep_fraction * self.mlp_dim))

  @property
  def shared_width(self):
    return self.shared_mlp_dim or max(1, round(self.keep_fraction * self.mlp_dim))

  def router_module(self, **kwargs):
    """The pre-gating router (a child named 'router', or unbound with `parent=None`)."""
    return PreGateRouter(
      self.vocab_size,
      self.num_experts,
      self.embed_dim,
      num_layers=self.router_layers,
      num_heads=self.router_num_heads,
      mlp_dim=self.router_mlp_dim,
      norm_epsilon=self.norm_epsilon,
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
      **{"name": "router", **kwargs},
    )

  def ffn_factory(self):
    return functools.partial(
      ReadMeFFN,
      num_experts=self.num_experts,
      expert_mlp_dim=self.expert_width,
      num_experts_per_tok=1,
      activation=self.mlp_activation,
      dispatch=None if self.dispatch == "auto" else self.dispatch,
      capacity_factor=self.capacity_factor or None,
      shared_mlp_dim=self.shared_width,
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
    )

  def init_cache(self, batch_size, max_length):
    """Backbone KVCaches (`num_layers`) followed by the router's (`router_layers`)."""
    router = self.router_module(parent=None)
    return super().init_cache(batch_size, max_length) + router.init_cache(batch_size, max_length)

  def route(self, tokens, positions=None):
    """The pre-gate's expert id per token, [batch, length] int32 (apply with `method="route"`)."""
    if positions is None:
      positions = default_positions(tokens, None)
    router = self.router_module(parent=None)
    logits, _ = router.apply({"params": self.variables["params"]["router"]}, tokens, positions)
    return jnp.argmax(logits, -1).astype(jnp.int32)

  @nn.compact
  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True):
    """Next-token logits, the weighted router loss and the routing metrics.

    Args:
      tokens: [batch, length] int32.
      positions: [batch, length] absolute positions (default: 0.., or continuing from the cache).
      cache: the tuple from `init_cache`, or None.
      deterministic: disables dropout.

    Returns:
      (logits [batch, length, vocab_size] float32, ModelOutput(aux_loss, metrics, cache)).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    expected = self.num_layers + self.router_layers
    if cache is not None and len(cache) != expected:
      raise ValueError(f"cache has {len(cache)} entries, expected num_layers + router_layers = {expected}")
    if positions is None:
      positions = default_positions(tokens, cache)
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    router_logits, router_cache = self.router_module()(
      tokens, positions, None if cache is None else cache[self.num_layers :]
    )
    flat_logits = router_logits.reshape(-1, self.num_experts)
    routing = pregate_routing(jax.lax.stop_gradient(flat_logits))
    sow_output(
      self,
      "expert_ids",
      lambda: jnp.broadcast_to(
        routing.expert_ids.reshape(tokens.shape + (-1,)).astype(jnp.int32),
        (self.num_layers,) + tokens.shape + routing.expert_ids.shape[-1:],
      ),
    )
    with_scores = cache is None and self.train_phase != "backbone"

    embed = Embed(self.vocab_size, self.embed_dim, dtype=dtype, param_dtype=param_dtype, name="embed")
    x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    new_cache, layer_metrics, scores = [], [], []
    for i in range(self.num_layers):
      block = self.layer_block(i)
      x, layer_cache, (metrics, layer_scores) = block(
        x,
        positions,
        None if cache is None else cache[i],
        None,
        deterministic,
        {"routing": routing, "with_scores": with_scores},
      )
      new_cache.append(layer_cache)
      layer_metrics.append(metrics)
      scores.append(layer_scores)
    logits = self.output_logits(embed, x)
    if self.train_phase == "router":
      logits = jax.lax.stop_gradient(logits)
    metrics = stack_layer_metrics(layer_metrics)
    aux_loss = jnp.zeros((), jnp.float32)
    if with_scores:
      targets = pregate_targets(jax.lax.stop_gradient(jnp.stack(scores)))
      router_loss, accuracy = pregate_loss(
        flat_logits,
        targets,
        label_smoothing=self.label_smoothing,
        hard_weight=self.hard_weight,
        soft_weight=self.soft_weight,
      )
      metrics.update(router_loss=router_loss, router_accuracy=accuracy)
      aux_loss = self.router_loss_coef * router_loss
    cache_out = None if cache is None else tuple(new_cache) + router_cache
    return logits, ModelOutput(aux_loss=aux_loss, metrics=metrics, cache=cache_out)

  def num_params(self):
    """Analytic parameter count: the dense LM's with each FFN replaced by the shared + E experts, plus the router
    (embedding, blocks with SwiGLU MLPs, final norm, head)."""
    e = self.embed_dim
    mats = 3 if ACTIVATIONS[self.mlp_activation][1] else 2
    dense_ffn = mats * e * self.mlp_dim
    moe_ffn = mats * e * (self.shared_width + self.num_experts * self.expert_width)
    router_block = 4 * e * e + 3 * e * self.router_mlp_dim + 2 * e
    router = self.vocab_size * e + self.router_layers * router_block + e + e * self.num_experts
    return super().num_params() + self.num_layers * (moe_ffn - dense_ffn) + router

  def num_active_params(self):
    """Parameters one token uses: `num_params()` minus the `num_experts - 1` domain experts it skips per layer."""
    mats = 3 if ACTIVATIONS[self.mlp_activation][1] else 2
    return self.num_params() - self.num_layers * (self.num_experts - 1) * mats * self.embed_dim * self.expert_width
