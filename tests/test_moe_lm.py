"""Tests of the MoE decoder LM (`zoo.models.moe_lm`) and its configs (`configs/moe_*.py`).

Cached decoding is compared with the full forward under 'dropless' and 'dense' dispatch only: 'capacity' dispatch
drops assignments depending on the other tokens of a call, and expert-choice routing picks tokens across the batch,
so with either the cached logits may legitimately differ.
"""
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.moe_lm import MoELM

CONFIGS = ("moe_mixtral", "moe_switch", "moe_deepseek", "moe_qwen", "moe_expert_choice")
# Shrinks a config's model; the routing fields (experts, k, router, groups, shared experts...) stay as configured.
TINY = dict(vocab_size=32, num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24)
VOCAB = TINY["vocab_size"]


def tiny_model(config_name, **overrides):
  model_config = importlib.import_module(f"configs.{config_name}").get_config().model
  expert_mlp = max(4, model_config.expert_mlp_dim // 16)
  shared_mlp = model_config.get("shared_expert_mlp_dim", 0) // 16
  return build_model(model_config, **{**TINY, "expert_mlp_dim": expert_mlp, "shared_expert_mlp_dim": shared_mlp,
                                      **overrides})


def tokens(batch=2, length=8, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, jnp.int32)


def init(model, toks):
  return jax.jit(model.init)(jax.random.key(0), toks)


def mixtral(**overrides):
  return MoELM(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2, "expert_mlp_dim": 8, **overrides})


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_init_and_apply_shapes(name):
  model = tiny_model(name)
  toks = tokens()
  variables = init(model, toks)
  (logits, out), _ = jax.jit(lambda v, t: model.apply(v, t, deterministic=False, mutable=["routing_state"],
                                                      rngs={"dropout": jax.random.key(1)}))(variables, toks)
  layers, experts = len(model.moe_layers), model.num_experts
  assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert out.aux_loss.shape == () and bool(jnp.isfinite(out.aux_loss))
  assert out.metrics["expert_load"].shape == (layers, experts)
  np.testing.assert_allclose(out.metrics["expert_load"].sum(-1), 1.0, rtol=1e-5)
  for key in ("dropped_fraction", "router_entropy", "router_z", "load_imbalance", "z_loss"):
    assert out.metrics[key].shape == (layers,), key
  # load_imbalance is max/mean of expert_load.
  np.testing.assert_allclose(out.metrics["load_imbalance"], experts * out.metrics["expert_load"].max(-1), rtol=1e-5)
  # Dense layers have a plain MLP, MoE layers a router and stacked experts.
  params = nn.meta.unbox(variables["params"])
  for i in range(model.num_layers):
    ffn = params[f"layers_{i}"]["ffn"]
    if i in model.moe_layers:
      assert ffn["up"].shape == (experts, model.embed_dim, model.expert_mlp_dim)
    else:
      assert ffn["up"]["kernel"].shape == (model.embed_dim, model.mlp_dim)


def test_aux_loss_is_the_weighted_sum_of_layer_losses():
  model = mixtral(load_balance_coef=0.3, z_loss_coef=0.05)
  toks = tokens()
  variables = init(model, toks)
  _, out = jax.jit(model.apply)(variables, toks)
  expected = 0.3 * out.metrics["load_balance"].sum() + 0.05 * out.metrics["z_loss"].sum()
  np.testing.assert_allclose(out.aux_loss, expected, rtol=1e-6)
  assert float(out.metrics["load_balance"].min()) >= 1.0 - 1e-5  # the Switch loss is >= 1 (uniform routing)


@pytest.mark.parametrize("name", ["moe_mixtral", "moe_deepseek"])
def test_causal(name):
  model = tiny_model(name, dispatch="dropless")
  toks = tokens()
  variables = init(model, toks)
  apply = jax.jit(lambda t: model.apply(variables, t)[0])
  changed = toks.at[:, 5:].set((toks[:, 5:] + 1) % VOCAB)
  a, b = apply(toks), apply(changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
  assert not np.allclose(a[:, 5:], b[:, 5:], atol=1e-5)


@pytest.mark.parametrize("name,dispatch", [("moe_mixtral", "dropless"), ("moe_deepseek", "dense")])
def test_cached_decoding_matches_full_forward(name, dispatch):
  model = tiny_model(name, dispatch=dispatch)
  toks = tokens(length=7)
  variables = init(model, toks)
  full, _ = jax.jit(model.apply)(variables, toks)
  cache = model.apply(variables, 2, 10, method="init_cache")
  step = jax.jit(lambda t, c: model.apply(variables, t, cache=c))
  logits, out = step(toks[:, :4], cache)  # prefill
  pieces = [logits]
  cache = out.cache
  for i in range(4, 7):
    logits, out = step(toks[:, i:i + 1], cache)
    pieces.append(logits)
    cache = out.cache
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-4, rtol=1e-4)
  assert cache[0].length.tolist() == [7, 7]


def test_one_optimizer_step_lowers_the_loss():
  model = mixtral(dispatch="dropless")
  toks = tokens(batch=4, length=16)
  variables = init(model, toks)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(p):
    (logits, out), _ = model.apply({"params": p, **state}, toks[:, :-1], deterministic=False,
                                   mutable=["routing_state"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()
    return ce + out.aux_loss

  opt = optax.adam(1e-2)
  loss_fn = jax.jit(loss_fn)
  loss0, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  router_grad = nn.meta.unbox(grads)["layers_0"]["ffn"]["router"]["kernel"]
  assert float(jnp.abs(router_grad).max()) > 0  # the router is trained through the combine weights
  updates, _ = opt.update(grads, opt.init(params), params)
  loss1 = loss_fn(optax.apply_updates(params, updates))
  assert float(loss1) < float(loss0)


def test_balance_bias_moves_in_training_and_stays_fixed_in_eval():
  model = tiny_model("moe_deepseek", bias_update_rate=0.1)
  toks = tokens(batch=4)
  variables = init(model, toks)
  assert "bias" not in str(jax.tree_util.tree_structure(variables["params"]))  # not trained by the optimizer
  bias0 = nn.meta.unbox(variables["routing_state"])
  apply = jax.jit(model.apply, static_argnames=("deterministic", "mutable"))
  _, train_state = apply(variables, toks, deterministic=False, mutable=("routing_state",))
  bias1 = nn.meta.unbox(train_state["routing_state"])
  for layer in model.moe_layers:
    b0, b1 = bias0[f"layers_{layer}"]["ffn"]["router"]["bias"], bias1[f"layers_{layer}"]["ffn"]["router"]["bias"]
    assert b0.shape == (model.num_experts,)
    # Each expert moves by exactly +-u (the sign update), unless it is exactly at the mean load.
    steps = np.abs(np.asarray(b1 - b0))
    assert np.all(np.isclose(steps, 0.1) | np.isclose(steps, 0.0)) and steps.max() > 0
  _, eval_state = apply(variables, toks, deterministic=True, mutable=("routing_state",))
  jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(eval_state["routing_state"]), bias0)


def test_param_counts_against_a_hand_count():
  # d=16, vocab 32, 3 layers, 2 heads x 8 (1 kv head), dense mlp 24, 4 experts of 8, top-2, 1 shared expert of 8 with
  # its gate, first layer dense, tied embeddings, swiglu.
  model = MoELM(**{**TINY, "num_layers": 3}, num_experts=4, num_experts_per_tok=2, expert_mlp_dim=8, num_shared_experts=1,
                shared_expert_mlp_dim=8, shared_expert_gate=True, first_dense_layers=1)
  d = 16
  attention = d * 2 * 8 + 2 * d * 1 * 8 + 2 * 8 * d  # q, k, v, out
  norms = 2 * d
  dense_ffn = 3 * d * 24
  moe_ffn = d * 4 + 4 * 3 * d * 8 + 3 * d * 8 + d  # router, experts, shared expert, shared gate
  total = 32 * d + 3 * (attention + norms) + dense_ffn + 2 * moe_ffn + d  # + final norm
  active = total - 2 * (4 - 2) * 3 * d * 8
  variables = init(model, tokens())
  assert count_params(variables["params"]) == model.num_params() == total
  assert model.num_active_params() == active


def test_mixtral_config_matches_dense_active_params():
  dense = build_model(importlib.import_module("configs.dense_lm").get_config().model)
  moe = build_model(importlib.import_module("configs.moe_mixtral").get_config().model)
  assert moe.num_experts == 8 and moe.num_experts_per_tok == 2
  assert abs(moe.num_active_params() - dense.num_params()) / dense.num_params() < 0.01
  assert moe.num_params() > 2.5 * dense.num_params()


@pytest.mark.parametrize("overrides,match", [
    (dict(router="top2"), "config.model.router"),
    (dict(dispatch="magic"), "config.model.dispatch"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(bias_update_rate=1e-3), "bias_update_rate"),
    (dict(n_group=3), "n_group"),
    (dict(first_dense_layers=3), "no MoE layer"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
])
def test_bad_config_raises(overrides, match):
  with pytest.raises(ConfigError, match=match):
    mixtral(**overrides)
