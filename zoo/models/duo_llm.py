"""Duo-LLM: every FFN layer has a big and a small module plus skip; per-token, per-layer routes (papers.md A6).

Alizadeh et al. 2024, "Duo-LLM: A Framework for Studying Adaptive Computation in Large Language Models" (no code
released):
- each layer's FFN is one of three routes per token: 0 = skip (no FFN), 1 = the small FFN, 2 = the big FFN (Sec. 3);
  the small FFN is `small_mlp_dim` wide [guess: mlp_dim / 4];
- training with random routes (Sec. 3.1, `route_mode='random'`): each token draws its route in every layer
  uniformly from {skip, small, big} [guess: uniform] from the 'dropout' RNG; at evaluation a random-route model runs
  every layer big [guess];
- oracle (Sec. 4, `oracle_routes`): per-token routes that minimise the loss under a budget of k big layers
  [guess: best of N sampled routes per token by that token's loss; a sampled route has exactly k big layers and
  skip/small uniformly elsewhere];
- practical router (Sec. 5, `route_mode='router'`): per layer a linear map of the FFN input to 3 logits, route =
  argmax; the route's softmax probability p multiplies the FFN output by `1 + p - stop_gradient(p)` (= 1 in the forward
  pass) so the router gets a gradient [guess]; the loss adds `budget_coef * mean_t max(0, sum_l p_big - big_budget)`
  [guess], and at most `big_budget` layers per token run big: once a token has used its budget, later big choices
  run small [guess]. The paper compares such routers with the oracle and with random routes at the same budget.

Both FFNs are computed for every token (this model studies route quality, not speed). The router kernels always exist
(they get no gradient in 'random' mode), so a random-route checkpoint loads into the router model. Routes depend
only on the token's own hidden state, so cached decoding equals the full forward in 'router' mode and with given
routes.

Outputs: `metrics['route_fraction']` [layers, 3] (fraction of tokens on skip / small / big per layer),
`metrics['big_layers']` (mean big layers per token) and, in 'router' mode, `metrics['router_entropy']` [layers].
Per-token output (`exposes`, the `zoo.models` contract): with `apply(..., mutable=['intermediates'])`,
`intermediates['routes']` int32 [batch, length, num_layers], the route each token ran in each layer (0 skip, 1 small,
2 big; the layout of the `routes` argument, so they can be fed back).
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from zoo.layers import ACTIVATIONS, MLP
from zoo.models.dense_lm import DenseLM
from zoo.models.output import ModelOutput, sow_output
from zoo.models.registry import ConfigError, check_config, register_model
from zoo.routing import stack_layer_metrics

ROUTES = ("skip", "small", "big")
SKIP, SMALL, BIG = 0, 1, 2
ROUTE_MODES = ("random", "router")


class DuoFFN(nn.Module):
  """One Duo-LLM FFN layer: big FFN, small FFN and a 3-way router (skip / small / big).

  Attributes:
    mlp_dim: width of the big FFN.
    small_mlp_dim: width of the small FFN.
    activation: FFN activation (`zoo.layers.ACTIVATIONS`).
    route_mode: 'random' | 'router' (used when no routes are given).
  """

  mlp_dim: int
  small_mlp_dim: int
  activation: str = "swiglu"
  route_mode: str = "random"
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic=True, routes=None, big_left=None):
    """Runs each token's route.

    Args:
      x: [batch, length, embed] FFN input.
      deterministic: False in training (random routes draw from the 'dropout' RNG).
      routes: optional [batch, length] int routes in {0, 1, 2} that override the route mode.
      big_left: [batch, length] int big layers each token may still use ('router' mode).

    Returns:
      (y [batch, length, embed], (routes [batch, length] int32, probs [batch, length, 3] float32 or None)).
    """
    mlp = dict(activation=self.activation, dtype=self.dtype, param_dtype=self.param_dtype)
    big = MLP(self.mlp_dim, name="big", **mlp)(x)
    small = MLP(self.small_mlp_dim, name="small", **mlp)(x)
    kernel = self.param(
      "router",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
      (x.shape[-1], len(ROUTES)),
      jnp.float32,
    )
    weight, probs = jnp.ones(x.shape[:2], jnp.float32), None
    if routes is None and self.route_mode == "router":
      probs = jax.nn.softmax(x.astype(jnp.float32) @ kernel, axis=-1)
      routes = jnp.argmax(probs, axis=-1)
      if big_left is not None:
        routes = jnp.where((routes == BIG) & (big_left <= 0), SMALL, routes)
      chosen = jnp.take_along_axis(probs, routes[..., None], axis=-1)[..., 0]
      weight = 1.0 + chosen - jax.lax.stop_gradient(chosen)
    elif routes is None:
      if deterministic:
        routes = jnp.full(x.shape[:2], BIG, jnp.int32)
      else:
        routes = jax.random.randint(self.make_rng("dropout"), x.shape[:2], 0, len(ROUTES))
    routes = routes.astype(jnp.int32)
    y = jnp.where((routes == BIG)[..., None], big, jnp.where((routes == SMALL)[..., None], small, 0.0))
    return (y * weight[..., None].astype(y.dtype)).astype(x.dtype), (routes, probs)


@register_model("duo_llm")
class DuoLM(DenseLM):
  """Dense decoder LM whose FFNs are Duo-LLM layers (see the module docstring).

  Inherits every field of `DenseLM`; `mlp_dim` is the big FFN's width.

  Attributes:
    small_mlp_dim: width of the small FFN (0 = mlp_dim // 4).
    route_mode: 'random' (training with random routes; all big at evaluation) | 'router' (trained linear routers).
    big_budget: 'router' mode: at most this many big layers per token (0 = no limit) and the budget of the penalty.
    budget_coef: weight of the budget penalty ('router' mode).
  """

  exposes: ClassVar[tuple[str, ...]] = ("routes",)
  small_mlp_dim: int = 0
  route_mode: str = "random"
  big_budget: int = 1
  budget_coef: float = 0.1

  def __post_init__(self):
    check_config(self, choices={"route_mode": ROUTE_MODES}, non_negative=("small_mlp_dim", "budget_coef"))
    if not 0 <= self.big_budget <= self.num_layers:
      raise ConfigError(
        f"config.model.big_budget={self.big_budget} is invalid; allowed 0 (no limit) .. num_layers={self.num_layers}"
      )
    super().__post_init__()

  @property
  def resolved_small_mlp_dim(self):
    return self.small_mlp_dim or max(1, self.mlp_dim // 4)

  @nn.compact
  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True, routes=None):
    """Next-token logits with each token's per-layer routes.

    Args:
      tokens: [batch, length] int32.
      positions: [batch, length] absolute positions (default: 0.., or continuing from the cache).
      cache: the tuple from `init_cache`, or None.
      deterministic: False in training.
      routes: optional [batch, length, num_layers] int routes in {0: skip, 1: small, 2: big} (e.g. from
        `oracle_routes`); they override `route_mode`.

    Returns:
      (logits [batch, length, vocab_size] float32, ModelOutput(aux_loss, metrics, cache)).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if routes is not None and routes.shape != tokens.shape + (self.num_layers,):
      raise ValueError(
        f"routes must be [batch, length, num_layers]={tokens.shape + (self.num_layers,)}, got {routes.shape}"
      )
    embed, x, positions = self.embed_tokens(tokens, positions, cache, deterministic)
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    ffn = lambda name: DuoFFN(
      self.mlp_dim,
      self.resolved_small_mlp_dim,
      activation=self.mlp_activation,
      route_mode=self.route_mode,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
    )
    big_used = jnp.zeros(tokens.shape, jnp.int32)
    expected_big = jnp.zeros(tokens.shape, jnp.float32)
    new_cache, layer_metrics, layer_routes_all = [], [], []
    for i in range(self.num_layers):
      ffn_kwargs = {
        "routes": None if routes is None else routes[..., i],
        "big_left": self.big_budget - big_used if self.big_budget else None,
      }
      block = self.layer_block(i, ffn)
      x, layer_cache, (layer_routes, probs) = block(
        x, positions, None if cache is None else cache[i], None, deterministic, ffn_kwargs
      )
      new_cache.append(layer_cache)
      layer_routes_all.append(layer_routes)
      big_used = big_used + (layer_routes == BIG)
      metrics = {"route_fraction": jnp.mean(jax.nn.one_hot(layer_routes, len(ROUTES)), axis=(0, 1))}
      if probs is not None:
        expected_big = expected_big + probs[..., BIG]
        metrics["router_entropy"] = jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))
      layer_metrics.append(metrics)
    sow_output(self, "routes", lambda: jnp.stack(layer_routes_all, axis=-1))
    logits = self.output_logits(embed, x)
    aux = jnp.zeros((), jnp.float32)
    if self.route_mode == "router" and routes is None:
      aux = self.budget_coef * jnp.mean(jax.nn.relu(expected_big - self.big_budget))
    metrics = {**stack_layer_metrics(layer_metrics), "big_layers": jnp.mean(big_used.astype(jnp.float32))}
    return logits, ModelOutput(aux_loss=aux, metrics=metrics, cache=None if cache is None else tuple(new_cache))

  def num_params(self):
    """Analytic parameter count: the dense LM plus each layer's small FFN and 3-way router."""
    small = (3 if ACTIVATIONS[self.mlp_activation][1] else 2) * self.embed_dim * self.resolved_small_mlp_dim
    return super().num_params() + self.num_layers * (small + 3 * self.embed_dim)


def sample_budget_routes(rng, shape, num_layers, big_layers):
  """Random routes with exactly `big_layers` big layers per token (uniform), skip or small uniformly elsewhere [guess].

  Args:
    rng: PRNG key.
    shape: leading shape, e.g. (batch, length).
    num_layers: L.
    big_layers: k, 0..L.

  Returns:
    [*shape, L] int32 routes in {0: skip, 1: small, 2: big}.
  """
  if not 0 <= big_layers <= num_layers:
    raise ValueError(f"big_layers={big_layers} is invalid; allowed 0..num_layers={num_layers}")
  rank_key, other_key = jax.random.split(rng)
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(rank_key, tuple(shape) + (num_layers,)), axis=-1), axis=-1)
  other = jax.random.randint(other_key, tuple(shape) + (num_layers,), SKIP, BIG)
  return jnp.where(rank < big_layers, BIG, other).astype(jnp.int32)


def token_losses(model, variables, tokens, targets, routes=None):
  """Per-token next-token cross-entropy [batch, length] of `model` (routes as in `DuoLM.__call__`)."""
  logits, _ = model.apply(variables, tokens, routes=routes)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def oracle_routes(model, variables, tokens, targets, *, big_layers, num_samples, rng):
  """Oracle search (Sec. 4) [guess: best of N]: for each token, the best of `num_samples` sampled budget routes.

  Each sample gives every token routes with exactly `big_layers` big layers (`sample_budget_routes`); the oracle keeps,
  per token, the routes of the sample with that token's lowest loss. A token's loss also depends on the routes of the
  tokens before it (through attention), so the combined routes are evaluated again ('oracle_loss'); 'best_of_n_loss'
  is the per-token minimum itself.

  Args:
    model: a `DuoLM`.
    variables: its variables.
    tokens, targets: [batch, length] int32.
    big_layers: k, the budget of big layers per token.
    num_samples: N.
    rng: PRNG key.

  Returns:
    dict with 'routes' [batch, length, layers], 'sample_routes' [N, batch, length, layers], 'sample_losses'
    [N, batch, length], and scalar means 'oracle_loss', 'best_of_n_loss', 'random_loss' (mean over the samples).
  """
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1")
  losses_fn = jax.jit(lambda r: token_losses(model, variables, tokens, targets, r))
  sample_routes = jnp.stack(
    [
      sample_budget_routes(key, tokens.shape, model.num_layers, big_layers)
      for key in jax.random.split(rng, num_samples)
    ]
  )
  sample_losses = jnp.stack([losses_fn(r) for r in sample_routes])
  best = jnp.argmin(sample_losses, axis=0)  # [batch, length]
  routes = jnp.take_along_axis(sample_routes, best[None, ..., None], axis=0)[0]
  return {
    "routes": routes,
    "sample_routes": sample_routes,
    "sample_losses": sample_losses,
    "oracle_loss": jnp.mean(losses_fn(routes)),
    "best_of_n_loss": jnp.mean(jnp.min(sample_losses, axis=0)),
    "random_loss": jnp.mean(sample_losses),
  }
