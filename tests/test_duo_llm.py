"""Duo-LLM: route semantics (skip / small / big), random routes in training, the router with its budget, gradients to
the routers, budget route sampling, the oracle search and cached decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.duo_llm import DuoFFN, oracle_routes, sample_budget_routes

TINY = dict(name="duo_llm", vocab_size=32, num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=16)


@pytest.fixture(scope="module")
def tiny():
  model = build_model(TINY)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  apply = jax.jit(lambda v, routes: model.apply(v, tokens, routes=routes))
  return model, tokens, variables, apply


def test_sample_budget_routes():
  routes = sample_budget_routes(jax.random.key(0), (3, 5), 4, 1)
  assert routes.shape == (3, 5, 4) and set(np.unique(routes)) <= {0, 1, 2}
  np.testing.assert_array_equal(np.sum(routes == 2, axis=-1), 1)
  assert {0, 1} <= set(np.unique(routes))
  with pytest.raises(ValueError, match="big_layers=5"):
    sample_budget_routes(jax.random.key(0), (1,), 4, 5)


def test_routes_choose_skip_small_or_big(tiny):
  model, tokens, variables, apply = tiny
  params = nn.meta.unbox(variables["params"])
  assert count_params(params) == model.num_params()
  assert params["layers_0"]["ffn"]["small"]["up"]["kernel"].shape == (16, 4)  # mlp_dim // 4

  def moved(module):
    p = jax.tree.map(lambda x: x, params)
    for i in range(2):
      p[f"layers_{i}"]["ffn"][module]["down"]["kernel"] += 1.0
    return {"params": p}

  for route, unused, used in [(0, ("small", "big"), ()), (1, ("big",), ("small",)), (2, ("small",), ("big",))]:
    routes = jnp.full((2, 8, 2), route, jnp.int32)
    base, out = apply(variables, routes)
    np.testing.assert_allclose(out.metrics["route_fraction"][:, route], 1.0)
    for module in unused:
      np.testing.assert_allclose(apply(moved(module), routes)[0], base, atol=1e-6)
    for module in used:
      assert not np.allclose(apply(moved(module), routes)[0], base, atol=1e-3)
  # Evaluation of a random-route model runs every layer big.
  _, out = jax.jit(model.apply)(variables, tokens)
  np.testing.assert_allclose(out.metrics["route_fraction"][:, 2], 1.0)
  # Training draws routes from the 'dropout' RNG.
  train = jax.jit(lambda key: model.apply(variables, tokens, deterministic=False, rngs={"dropout": key})[1])
  fractions = train(jax.random.key(5)).metrics["route_fraction"]
  assert bool(jnp.all(fractions > 0)) and bool(jnp.all(fractions < 1))
  assert not np.allclose(fractions, train(jax.random.key(6)).metrics["route_fraction"])


def test_router_takes_the_argmax_route_within_the_budget():
  x = jnp.abs(jax.random.normal(jax.random.key(0), (2, 3, 4)))  # positive inputs: the 'big' logit sum(x) wins
  ffn = DuoFFN(8, 2, route_mode="router")
  variables = ffn.init(jax.random.key(1), x)
  variables = {"params": {**variables["params"], "router": jnp.zeros((4, 3)).at[:, 2].set(1.0)}}
  apply = jax.jit(lambda left: ffn.apply(variables, x, big_left=left)[1][0])
  np.testing.assert_array_equal(apply(jnp.ones((2, 3), jnp.int32)), 2)
  # A token whose budget is spent runs small instead.
  np.testing.assert_array_equal(apply(jnp.array([[0, 1, 0], [1, 1, 0]])), [[1, 2, 1], [2, 2, 1]])


def test_router_gradients_and_cached_decoding(tiny):
  _, tokens, variables, _ = tiny
  model = build_model({**TINY, "route_mode": "router", "big_budget": 1, "budget_coef": 0.5})
  params = variables["params"]

  def loss_fn(params):
    logits, out = model.apply({"params": params}, tokens)
    return jnp.mean(logits**2) + out.aux_loss, out

  grads, out = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
  for i in range(2):
    assert float(jnp.abs(nn.meta.unbox(grads[f"layers_{i}"]["ffn"]["router"])).max()) > 0, i
  assert float(out.metrics["big_layers"]) <= 1.0
  assert out.metrics["router_entropy"].shape == (2,)

  full, _ = jax.jit(model.apply)(variables, tokens)
  cache = model.init_cache(2, 8)
  decode = jax.jit(lambda token, cache: model.apply(variables, token, cache=cache))
  steps = []
  for t in range(8):
    logits, step = decode(tokens[:, t : t + 1], cache)
    steps.append(logits)
    cache = step.cache
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_oracle_keeps_each_tokens_best_sample(tiny):
  model, tokens, variables, _ = tiny
  result = oracle_routes(
    model, variables, tokens[:, :-1], tokens[:, 1:], big_layers=1, num_samples=3, rng=jax.random.key(2)
  )
  losses, samples = np.asarray(result["sample_losses"]), np.asarray(result["sample_routes"])
  assert losses.shape == (3, 2, 7) and samples.shape == (3, 2, 7, 2)
  best = losses.argmin(0)
  expected = np.take_along_axis(samples, best[None, ..., None], axis=0)[0]
  np.testing.assert_array_equal(result["routes"], expected)
  np.testing.assert_array_equal(np.sum(np.asarray(result["routes"]) == 2, axis=-1), 1)
  np.testing.assert_allclose(result["best_of_n_loss"], losses.min(0).mean(), rtol=1e-6)
  np.testing.assert_allclose(result["random_loss"], losses.mean(), rtol=1e-6)
  assert np.isfinite(float(result["oracle_loss"]))


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(route_mode="greedy"), "route_mode='greedy'"),
    (dict(big_budget=3), "big_budget=3"),
  ],
)
def test_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    build_model({**TINY, **overrides})
