"""RMoE: the GRU cell by hand and against a numpy reference, depth-only recurrence, shared cell, the load-balance
loss pooled over layers (by hand and as the authors' code computes it), gradients to the routers, cached decoding,
the linear baseline, the shared-expert mix and config errors."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model_testing
from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.rmoe import RMoEFFN
from zoo.routing import Router, losses
from zoo.routing.recurrent import gru_cell, pooled_load_balance_loss

TINY = dict(model_testing.TINY_MOE, name="rmoe", num_kv_heads=1, mlp_dim=24, num_experts_per_tok=2, router_hidden_dim=8)


def _sigmoid(a):
  return 1.0 / (1.0 + np.exp(-a))


def test_gru_cell_by_hand_and_against_numpy():
  zeros = {
    "input_kernel": jnp.zeros((3, 3, 2)),
    "hidden_kernel": jnp.zeros((2, 3, 2)),
    "input_bias": jnp.zeros((3, 2)),
    "hidden_bias": jnp.zeros((3, 2)),
  }
  # All-zero weights: r = z = 1/2, n = tanh(0) = 0, so h' = h / 2.
  h = jnp.array([[1.0, -4.0]])
  np.testing.assert_allclose(gru_cell(zeros, jnp.ones((1, 3)), h), [[0.5, -2.0]], rtol=1e-6)

  keys = jax.random.split(jax.random.key(0), 6)
  params = {
    "input_kernel": jax.random.normal(keys[0], (3, 3, 2)),
    "hidden_kernel": jax.random.normal(keys[1], (2, 3, 2)),
    "input_bias": jax.random.normal(keys[2], (3, 2)),
    "hidden_bias": jax.random.normal(keys[3], (3, 2)),
  }
  x, h = jax.random.normal(keys[4], (5, 3)), jax.random.normal(keys[5], (5, 2))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  xn, hn = np.asarray(x, np.float64), np.asarray(h, np.float64)
  gate = lambda g: (
    xn @ p["input_kernel"][:, g] + p["input_bias"][g],
    hn @ p["hidden_kernel"][:, g] + p["hidden_bias"][g],
  )
  r = _sigmoid(sum(gate(0)))
  z = _sigmoid(sum(gate(1)))
  n = np.tanh(gate(2)[0] + r * gate(2)[1])
  np.testing.assert_allclose(gru_cell(params, x, h), (1 - z) * n + z * hn, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="GRU state must be"):
    gru_cell(params, x, h[:, :1])


def _authors_balance_loss(layer_logits, num_experts, k):
  """The authors' `load_balancing_loss_func` (qiuzh20/RMoE, llama_moe_rnn/llama_moe_modeling.py) in numpy: the
  router logits of all layers concatenated, softmax, top-k, `E * sum(mean_t one_hot(top-k) [k, E] * mean_t p [E])`."""
  logits = np.concatenate(layer_logits, axis=0).astype(np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
  tokens_per_expert = np.eye(num_experts)[top].mean(0)  # [k, E]
  return float(np.sum(tokens_per_expert * p.mean(0)[None]) * num_experts)


def _route(layer_logits, k):
  """(probs [layers, tokens, E], top-k ids [layers, tokens, k]) of hand-written logits."""
  probs = jax.nn.softmax(jnp.asarray(layer_logits, jnp.float32), axis=-1)
  return probs, jax.lax.top_k(probs, k)[1]


def test_pooled_balance_loss_by_hand():
  # Two layers, two tokens, E=2, k=1. Layer 0 sends both tokens to expert 0 with p = (3/4, 1/4), layer 1 both to
  # expert 1 with p = (1/4, 3/4). Per layer: f = (1, 0), P = (3/4, 1/4) -> 2 * 3/4 = 1.5, so the old per-layer sum
  # was 3.0. Pooled: f = (1/2, 1/2), P = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1.0 (the balanced minimum, k = 1).
  ln3 = np.log(3.0)
  logits = [[[ln3, 0.0], [ln3, 0.0]], [[0.0, ln3], [0.0, ln3]]]
  probs, ids = _route(logits, 1)
  np.testing.assert_allclose(pooled_load_balance_loss(probs, ids, 2, 1), 1.0, rtol=1e-6)
  per_layer = sum(float(losses.load_balance_loss(probs[i], ids[i], 2)) for i in range(2))
  np.testing.assert_allclose(per_layer, 3.0, rtol=1e-6)
  np.testing.assert_allclose(_authors_balance_loss(logits, 2, 1), 1.0, rtol=1e-12)


def test_pooled_balance_loss_matches_the_authors_formula():
  # E=4, k=2: the authors count each of a token's k selections (minimum k, not 1), and pool the 3 layers.
  logits = np.asarray(jax.random.normal(jax.random.key(3), (3, 5, 4))) * 2.0
  probs, ids = _route(logits, 2)
  want = _authors_balance_loss(list(logits), 4, 2)
  np.testing.assert_allclose(pooled_load_balance_loss(probs, ids, 4, 2), want, rtol=1e-5)
  # Uniform routing: minimum k.
  uniform = jnp.full((2, 4, 4), 0.25)
  spread = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 2)
  np.testing.assert_allclose(pooled_load_balance_loss(uniform, spread, 4, 2), 2.0, rtol=1e-6)
  # Per sequence (2 sequences of 2 tokens): each sequence pooled over the layers, then averaged.
  seq = pooled_load_balance_loss(probs[:, :4], ids[:, :4], 4, 2, sequence_length=2)
  halves = [_authors_balance_loss(list(logits[:, s : s + 2]), 4, 2) for s in (0, 2)]
  np.testing.assert_allclose(seq, np.mean(halves), rtol=1e-5)
  with pytest.raises(ValueError, match="sequence_length=3"):
    pooled_load_balance_loss(probs, ids, 4, 2, sequence_length=3)


@pytest.fixture(scope="module")
def tiny():
  model = build_model(TINY)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  return model, tokens, jax.jit(model.init)(jax.random.key(1), tokens), jax.jit(model.apply)


def test_shapes_params_aux_and_one_shared_cell(tiny):
  model, tokens, variables, apply = tiny
  logits, out = apply(variables, tokens)
  assert logits.shape == (2, 8, 32) and bool(jnp.all(jnp.isfinite(logits)))
  assert out.metrics["expert_load"].shape == (2, 4)
  np.testing.assert_allclose(out.metrics["expert_load"].sum(-1), 1.0, rtol=1e-5)
  assert "router_probs" not in out.metrics and "router_expert_ids" not in out.metrics
  params = nn.meta.unbox(variables["params"])
  assert count_params(params) == model.num_params()
  # One GRU at the model level; each layer has its own projections W1_i [embed, 8] and W2_i [8, experts].
  assert params["router_gru"]["hidden_kernel"].shape == (8, 3, 8)
  for i in range(2):
    router = params[f"layers_{i}"]["ffn"]["router"]
    assert set(router) == {"input_proj", "output_proj"}
    assert router["input_proj"].shape == (16, 8) and router["output_proj"].shape == (8, 4)


@pytest.mark.parametrize("router_type", ["gru", "linear"])
def test_aux_loss_is_the_pooled_balance_loss(router_type):
  # The model's aux loss is 1e-3 x the authors' pooled loss of the router logits its layers computed (captured), not
  # 1e-3 x the sum of the per-layer losses it still reports in the metrics.
  # k=1 over 2 layers: near-uniform routing gives about 1 pooled against about 2 summed.
  model = build_model({**TINY, "router_type": router_type, "num_experts_per_tok": 1})
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  variables = model.init(jax.random.key(1), tokens)
  (_, out), state = model.apply(variables, tokens, capture_intermediates=True, mutable=["intermediates"])
  routers = [state["intermediates"][f"layers_{i}"]["ffn"]["router"]["__call__"][0] for i in range(2)]
  routing = [r[0] if router_type == "gru" else r for r in routers]
  logits = [np.log(np.asarray(r.probs, np.float64)) for r in routing]  # softmax(log p) = p
  np.testing.assert_allclose(out.aux_loss, 1e-3 * _authors_balance_loss(logits, 4, 1), rtol=1e-5)
  assert not np.isclose(float(out.aux_loss), 1e-3 * float(out.metrics["load_balance"].sum()), rtol=0.05)
  # A z-loss weight adds z_loss_coef x the per-layer z-losses summed.
  with_z = build_model({**TINY, "router_type": router_type, "num_experts_per_tok": 1, "z_loss_coef": 1e-2})
  _, out_z = with_z.apply(variables, tokens)
  np.testing.assert_allclose(out_z.aux_loss - out.aux_loss, 1e-2 * out.metrics["z_loss"].sum(), rtol=1e-5)


def test_state_is_carried_along_depth(tiny):
  _, tokens, variables, apply = tiny
  # The first MoE layer starts from g = 0, so the GRU's hidden kernel cannot change its routing; later layers read
  # the state of the layer before and do change.
  params = jax.tree.map(lambda x: x, nn.meta.unbox(variables["params"]))
  for i in range(2):  # sharper routers, so that the logits move visibly
    params[f"layers_{i}"]["ffn"]["router"]["output_proj"] *= 100.0
  moved = jax.tree.map(lambda x: x, params)
  moved["router_gru"]["hidden_kernel"] = moved["router_gru"]["hidden_kernel"] + 0.5
  _, base = apply({"params": params}, tokens)
  _, moved = apply({"params": moved}, tokens)
  np.testing.assert_allclose(moved.metrics["router_z"][0], base.metrics["router_z"][0], rtol=1e-6)
  assert not np.allclose(moved.metrics["router_z"][1:], base.metrics["router_z"][1:], rtol=1e-3)


def test_gradients_reach_every_router_and_the_loss_falls(tiny):
  model, tokens, variables, _ = tiny
  params = variables["params"]
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  def loss_fn(params):
    logits, out = model.apply({"params": params}, tokens[:, :-1], deterministic=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + out.aux_loss, ce

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (_, ce0), grads = grad_fn(params)
  grads = nn.meta.unbox(grads)
  for name, g in grads["router_gru"].items():
    assert float(jnp.abs(g).max()) > 0, name
  for i in range(2):
    for name, g in grads[f"layers_{i}"]["ffn"]["router"].items():
      assert float(jnp.abs(g).max()) > 0, (i, name)
  for _ in range(4):
    (_, ce), grads = grad_fn(params)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
  (_, ce), _ = grad_fn(params)
  assert float(ce) < float(ce0)


def test_linear_baseline_params():
  linear = build_model({**TINY, "router_type": "linear", "num_shared_experts": 1})
  shapes = jax.eval_shape(linear.init, jax.random.key(1), jnp.zeros((2, 8), jnp.int32))["params"]
  assert "router_gru" not in shapes and set(shapes["layers_0"]["ffn"]["router"]) == {"kernel"}
  assert count_params(shapes) == linear.num_params()


def test_shared_expert_mix():
  x = jax.random.normal(jax.random.key(0), (2, 4, 16))
  ffn = lambda mix: RMoEFFN(
    Router(4, 2), num_experts=4, expert_mlp_dim=8, shared_mlp_dim=8, shared_mix=mix, dispatch="dense"
  )
  variables = ffn(0.5).init(jax.random.key(1), x)
  apply = jax.jit(lambda mix: ffn(mix).apply(variables, x)[0], static_argnums=0)
  routed, shared = apply(0.0), apply(1.0)
  assert not np.allclose(routed, shared, atol=1e-3)
  np.testing.assert_allclose(apply(0.3), 0.7 * routed + 0.3 * shared, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["rmoe", "rmoe_linear"])
def test_configs_build(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  model = build_model(config.model)
  assert model.num_experts == 8 and model.num_experts_per_tok == 2 and model.load_balance_coef == 1e-3
  assert model.router_type == ("gru" if name == "rmoe" else "linear")


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(router_type="lstm"), "router_type='lstm'"),
    (dict(router="sigmoid_topk"), "RMoE routes with 'softmax_topk'"),
    (dict(shared_mix=1.5), "shared_mix=1.5"),
    (dict(router_hidden_dim=0), "router_hidden_dim=0"),
    (dict(router_jitter=0.01), "router_type='linear' only"),
  ],
)
def test_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    build_model({**TINY, **overrides})
