"""Every dispatch mode against a per-token, per-slot Python loop: forward and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import routing
from zoo.routing import dispatch

TOKENS, EXPERTS, EMBED, MLP = 12, 4, 8, 6


def _weights(activation, key=0, experts=EXPERTS):
  ks = jax.random.split(jax.random.PRNGKey(key), 3)
  w = {
    "up": jax.random.normal(ks[0], (experts, EMBED, MLP)) * 0.4,
    "down": jax.random.normal(ks[1], (experts, MLP, EMBED)) * 0.4,
  }
  if activation in dispatch.GATED_ACTIVATIONS:
    w["gate"] = jax.random.normal(ks[2], (experts, EMBED, MLP)) * 0.4
  return w


def _inputs(key=1):
  kx, kl = jax.random.split(jax.random.PRNGKey(key))
  return jax.random.normal(kx, (TOKENS, EMBED)), jax.random.normal(kl, (TOKENS, EXPERTS))


def _expert(x, w, e, activation):
  """Expert e on tokens x [tokens, embed], written out."""
  up = x @ w["up"][e]
  if activation in dispatch.GATED_ACTIVATIONS:
    h = dispatch.GATED_ACTIVATIONS[activation](x @ w["gate"][e]) * up
  else:
    h = dispatch.PLAIN_ACTIVATIONS[activation](up)
  return h @ w["down"][e]


@functools.partial(jax.jit, static_argnames="activation")
def _loop(x, expert_ids, weights, w, activation, kept=None):
  """Per-expert, per-slot loop: y_t = sum over (kept) slots s with ids[t, s] == e of weights[t, s] * expert_e(x_t)."""
  kept = jnp.ones(expert_ids.shape, bool) if kept is None else kept
  y = jnp.zeros_like(x)
  for e in range(w["up"].shape[0]):
    for s in range(expert_ids.shape[1]):
      coef = jnp.where((expert_ids[:, s] == e) & kept[:, s], weights[:, s], 0.0)
      y = y + coef[:, None] * _expert(x, w, e, activation)
  return y


ROUTERS = {
  "softmax_top2": lambda logits: routing.softmax_topk(logits, 2),
  "sigmoid_top3_grouped": lambda logits: routing.sigmoid_topk(
    logits, 3, n_group=2, topk_group=2, routed_scaling_factor=1.5
  ),
  "expert_choice": lambda logits: routing.expert_choice(logits, 1.0),
}


# (dispatch mode, dropless permutation): every mode, and dropless both gather-fused and with a permuted copy.
VARIANTS = [pytest.param("dense", "fused", id="dense"), pytest.param("capacity", "fused", id="capacity")] + [
  pytest.param("dropless", p, id=f"dropless-{p}") for p in dispatch.PERMUTES
]


@functools.cache
def _loop_reference(router):
  """(gradients wrt x, w, logits; y) of sum(sin(y)) for the loop, computed once per router."""
  route = ROUTERS[router]

  def loop_loss(x, w, logits):
    r = route(logits)
    y = _loop(x, r.expert_ids, r.weights, w, "swiglu")
    return jnp.sum(jnp.sin(y)), y

  x, logits = _inputs()
  return jax.jit(jax.grad(loop_loss, (0, 1, 2), has_aux=True))(x, _weights("swiglu"), logits)


@pytest.mark.parametrize("mode,permute", VARIANTS)
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_dispatch_matches_loop_forward_and_gradients(mode, permute, router):
  x, logits = _inputs()
  w = _weights("swiglu")
  route = ROUTERS[router]

  def loss(x, w, logits):
    y, _ = routing.moe_ffn(x, route(logits), w, dispatch=mode, activation="swiglu", permute=permute)
    return jnp.sum(jnp.sin(y)), y

  grads, y = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(x, w, logits)
  ref_grads, ref_y = _loop_reference(router)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(ref_grads[2]).max()) > 0  # the router receives a gradient through the combine weights


@pytest.mark.parametrize("activation", ["reglu", "geglu", "silu", "relu", "gelu"])
def test_activations_match_loop(activation):
  x, logits = _inputs(2)
  w = _weights(activation, key=3)
  r = routing.softmax_topk(logits, 2)
  ref = _loop(x, r.expert_ids, r.weights, w, activation)
  for mode, permute in (("capacity", "fused"), ("dropless", "fused"), ("dropless", "custom_vjp")):
    y, _ = routing.moe_ffn(x, r, w, dispatch=mode, activation=activation, permute=permute)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_capacity_drops_in_priority_order():
  x, _ = _inputs(5)
  w = _weights("swiglu")
  # Skewed routing: expert 0 is every token's first choice.
  logits = jnp.tile(jnp.array([[3.0, 1.0, 0.5, 0.0]]), (TOKENS, 1)) + 0.1 * _inputs(6)[1]
  r = routing.softmax_topk(logits, 2)
  cap = routing.capacity(TOKENS, 2, EXPERTS, 1.0)  # ceil(12 * 2 / 4) = 6
  assert cap == 6
  y, metrics = routing.moe_ffn(x, r, w, dispatch="capacity", capacity_factor=1.0)
  # Reference: fill buffers first with every token's slot 0, then slot 1, token order within a slot.
  ids = np.asarray(r.expert_ids)
  counts = np.zeros(EXPERTS, int)
  kept = np.zeros(ids.shape, bool)
  for s in range(ids.shape[1]):
    for t in range(ids.shape[0]):
      if counts[ids[t, s]] < cap:
        counts[ids[t, s]] += 1
        kept[t, s] = True
  assert 0 < kept.mean() < 1
  ref = _loop(x, r.expert_ids, r.weights, w, "swiglu", jnp.asarray(kept))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["dropped_fraction"], 1 - kept.mean(), rtol=1e-6)


def test_unlimited_capacity_equals_dropless():
  x, logits = _inputs(7)
  w = _weights("swiglu")
  r = routing.softmax_topk(logits, 3)
  y_cap, metrics = routing.moe_ffn(x, r, w, dispatch="capacity", capacity_factor=None)
  y_drop, _ = routing.moe_ffn(x, r, w, dispatch="dropless")
  np.testing.assert_allclose(y_cap, y_drop, rtol=1e-5, atol=1e-6)
  assert float(metrics["dropped_fraction"]) == 0.0


def test_dense_weight_matrix_routing():
  x, logits = _inputs(8)
  w = _weights("relu")
  combine = jax.nn.relu(logits)  # ReLU routing: a variable number of experts per token
  ref = _loop(x, jnp.where(combine != 0, jnp.arange(EXPERTS), -1), combine, w, "relu")
  for mode, permute in [v.values for v in VARIANTS]:  # many empty slots: every token has E slots
    y, _ = routing.moe_ffn(x, combine, w, dispatch=mode, activation="relu", permute=permute)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
  x, logits = _inputs()
  r = routing.softmax_topk(logits, 2)
  with pytest.raises(ValueError, match="dispatch='sorted'"):
    routing.moe_ffn(x, r, _weights("swiglu"), dispatch="sorted")
  with pytest.raises(ValueError, match="activation='tanh'"):
    routing.moe_ffn(x, r, _weights("swiglu"), activation="tanh")
  with pytest.raises(ValueError, match="needs expert weights"):
    routing.moe_ffn(x, r, _weights("relu"), activation="swiglu")
  with pytest.raises(ValueError, match="capacity_factor=0"):
    routing.moe_ffn(x, r, _weights("swiglu"), dispatch="capacity", capacity_factor=0)
  with pytest.raises(ValueError, match="permute='scatter' is unknown"):
    routing.moe_ffn(x, r, _weights("swiglu"), dispatch="dropless", permute="scatter")
  with pytest.raises(ValueError, match="routing has 12 tokens but x has 11"):
    routing.moe_ffn(x[:11], r, _weights("swiglu"))


def test_default_dispatch_per_backend():
  assert routing.default_dispatch("cpu") == "capacity"
  assert routing.default_dispatch("gpu") == "dropless"
  assert routing.default_dispatch("tpu") == "dropless"


def test_moe_ffn_module_matches_functional_path():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, EMBED))
  module = routing.MoEFFN(EXPERTS, MLP, num_experts_per_tok=2, dispatch="dropless", shared_mlp_dim=5, shared_gate=True)
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), x)
  params = nn.meta.unbox(variables)["params"]
  assert variables["params"]["gate"].names == ("expert", "embed", "expert_mlp")
  assert variables["params"]["down"].names == ("expert", "expert_mlp", "embed")
  y, aux, metrics = jax.jit(module.apply)(variables, x)
  assert y.shape == x.shape
  assert set(aux) == {"load_balance", "z_loss"}
  assert metrics["expert_load"].shape == (EXPERTS,)
  tokens = x.reshape(-1, EMBED)
  r = routing.softmax_topk(tokens @ params["router"]["kernel"], 2)
  expert_weights = {n: params[n] for n in ("gate", "up", "down")}
  routed = _loop(tokens, r.expert_ids, r.weights, expert_weights, "swiglu")
  shared = (jax.nn.silu(tokens @ params["shared_gate"]) * (tokens @ params["shared_up"])) @ params["shared_down"]
  shared = shared * jax.nn.sigmoid(tokens @ params["shared_gate_kernel"])
  np.testing.assert_allclose(y.reshape(-1, EMBED), routed + shared, rtol=1e-5, atol=1e-5)


def test_moe_ffn_module_precomputed_routing_and_custom_router():
  x = jax.random.normal(jax.random.PRNGKey(0), (10, EMBED))
  module = routing.MoEFFN(
    EXPERTS, MLP, activation="reglu", router=routing.Router(EXPERTS, score="expert_choice", capacity_factor=2.0)
  )
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), x)
  apply = jax.jit(module.apply)
  y, aux, _ = apply(variables, x)
  assert set(aux) == {"z_loss"}
  fixed = routing.softmax_topk(jnp.zeros((10, EXPERTS)).at[:, 1].set(5.0), 1)
  y_fixed, _, metrics = apply(variables, x, routing=fixed)
  np.testing.assert_allclose(metrics["expert_load"], [0, 1, 0, 0])
  assert not np.allclose(y, y_fixed)
  with pytest.raises(ValueError, match="router.num_experts=3"):
    routing.MoEFFN(EXPERTS, MLP, router=routing.Router(3)).init(jax.random.PRNGKey(1), x)


@functools.partial(jax.jit, static_argnames="mode")
def _bf16_forward(x, w, logits, mode):
  return routing.moe_ffn(x, routing.softmax_topk(logits, 2), w, dispatch=mode)[0]


def test_bfloat16_experts_keep_dtype_and_float32_routing():
  x, logits = _inputs(9)
  w = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _weights("swiglu"))
  ref = _bf16_forward(x, _weights("swiglu"), logits, "dense")
  for mode in ("capacity", "dropless"):  # dropless: gather-fused
    y = _bf16_forward(x.astype(jnp.bfloat16), w, logits.astype(jnp.bfloat16), mode)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=0.1, atol=0.1)
