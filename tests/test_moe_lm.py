"""Tests of the MoE decoder LM (`zoo.models.moe_lm`) and its configs (`configs/moe_*.py`).

Compiling is what costs here, so every model is initialised once and its jitted functions are shared between tests
(the `functools.cache` helpers below): fields that do not change the parameters (dispatch, capacity, loss
coefficients) reuse the variables of the config's model, and one jitted loss-and-gradient of
the tiny Mixtral serves the aux-loss, causality, cached-decoding, optimizer and expert-parallel tests. Init uses the
'rbg' PRNG, whose initialisers compile about three times faster on CPU than threefry's.

Cached decoding is compared with the full forward under 'dropless' and 'dense' dispatch only: 'capacity' dispatch
drops assignments depending on the other tokens of a call, and expert-choice routing picks tokens across the batch,
so with either the cached logits may legitimately differ.
"""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from zoo.engine.sharding import make_mesh, mesh_context
from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.moe_lm import MoELM

CONFIGS = ("moe_mixtral", "moe_switch", "moe_deepseek", "moe_qwen", "moe_expert_choice")
# Shrinks a config's model; the routing fields (experts, k, router, groups, shared experts...) stay as configured.
TINY = dict(vocab_size=32, num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24)
VOCAB = TINY["vocab_size"]
# The tiny model with experts of its own (the hand-count, router-state and config-error tests): 4 experts of 8, top-2.
TINY_EXPERTS = dict(TINY, num_experts=4, num_experts_per_tok=2, expert_mlp_dim=8)


def tiny_model(config_name, **overrides):
  model_config = importlib.import_module(f"configs.{config_name}").get_config().model
  expert_mlp = max(4, model_config.expert_mlp_dim // 16)
  shared_mlp = model_config.get("shared_expert_mlp_dim", 0) // 16
  return build_model(
    model_config, **{**TINY, "expert_mlp_dim": expert_mlp, "shared_expert_mlp_dim": shared_mlp, **overrides}
  )


def tokens(batch=2, length=8, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, jnp.int32)


@functools.cache
def config_variables(name):
  """Variables of the config's tiny model (also valid for its variants that keep the same parameters)."""
  layers = OVERRIDES.get(name, {}).get("num_layers", TINY["num_layers"])
  return jax.jit(tiny_model(name, num_layers=layers).init)(jax.random.key(0, impl="rbg"), tokens())


# The DeepSeek config is tested with 'dense' dispatch (its 'auto' = 'capacity' on CPU may drop differently in
# cached decoding; the other configs cover capacity dispatch), so that its model serves the decoding tests too.
# Mixtral and DeepSeek keep two layers (DeepSeek's first is dense); the other configs, whose layers are all alike,
# are checked on one.
OVERRIDES = {
  "moe_deepseek": dict(dispatch="dense"),
  "moe_switch": dict(num_layers=1),
  "moe_qwen": dict(num_layers=1),
  "moe_expert_choice": dict(num_layers=1),
}


@functools.cache
def config_train_apply(name):
  """(model, variables, jitted training-mode apply `tokens -> ((logits, ModelOutput), routing_state)`)."""
  model = tiny_model(name, **OVERRIDES.get(name, {}))
  variables = config_variables(name)
  apply = jax.jit(
    lambda t: model.apply(
      variables, t, deterministic=False, mutable=["routing_state"], rngs={"dropout": jax.random.key(1)}
    )
  )
  return model, variables, apply


def decode(model, variables, toks, prefill):
  """Logits of `toks` [B, T] from a cached prefill of the first `prefill` tokens, then one cached call per token
  (eval mode); also the routing_state after the last call."""
  step = jax.jit(lambda t, c: model.apply(variables, t, cache=c, mutable=["routing_state"]))
  (logits, out), state = step(
    toks[:, :prefill], model.apply(variables, toks.shape[0], toks.shape[1], method="init_cache")
  )
  pieces = [logits]
  for i in range(prefill, toks.shape[1]):
    (logits, out), state = step(toks[:, i : i + 1], out.cache)
    pieces.append(logits)
  assert out.cache[0].length.tolist() == [toks.shape[1]] * toks.shape[0]
  return jnp.concatenate(pieces, axis=1), state


def mixtral_loss(model, params, toks):
  """Next-token cross-entropy + weighted aux loss of `toks` [B, T+1]; aux: (logits, ModelOutput)."""
  logits, out = model.apply({"params": params}, toks[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()
  return ce + out.aux_loss, (logits, out)


@functools.cache
def mixtral():
  """The tiny Mixtral config with dropless dispatch, nothing dropped under expert parallelism either
  (capacity_factor=0) and distinct loss coefficients; 8 sequences of 8 tokens (+1 target), so that the 64 tokens split
  over 8 devices."""
  model = tiny_model("moe_mixtral", dispatch="dropless", capacity_factor=0.0, load_balance_coef=0.3, z_loss_coef=0.05)
  params = config_variables("moe_mixtral")["params"]
  loss_and_grad = jax.jit(jax.value_and_grad(functools.partial(mixtral_loss, model), has_aux=True))
  return model, params, tokens(batch=8, length=9), loss_and_grad


@functools.cache
def deepseek_decoded():
  """(cached-decoding logits of `tokens()`: a 5-token prefill then token by token, routing_state after it)."""
  model, variables, _ = config_train_apply("moe_deepseek")
  return decode(model, variables, tokens(), prefill=5)


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_init_and_apply_shapes(name):
  model, variables, apply = config_train_apply(name)
  (logits, out), _ = apply(tokens())
  layers, experts = len(model.moe_layers), model.num_experts
  assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert out.aux_loss.shape == () and bool(jnp.isfinite(out.aux_loss))
  assert out.metrics["expert_load"].shape == (layers, experts)
  np.testing.assert_allclose(out.metrics["expert_load"].sum(-1), 1.0, rtol=1e-5)
  for key in ("dropped_fraction", "router_entropy", "router_z", "load_imbalance", "z_loss"):
    assert out.metrics[key].shape == (layers,), key
  assert "expert_ids" not in out.metrics  # a per-token output, sown into 'intermediates' (not a metric)
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
  model, params, toks, loss_and_grad = mixtral()
  (_, (_, out)), _ = loss_and_grad(params, toks)
  expected = 0.3 * out.metrics["load_balance"].sum() + 0.05 * out.metrics["z_loss"].sum()
  np.testing.assert_allclose(out.aux_loss, expected, rtol=1e-6)
  assert float(out.metrics["load_balance"].min()) >= 1.0 - 1e-5  # the Switch loss is >= 1 (uniform routing)


def test_sown_expert_ids_are_the_routing_decision():
  model, params, toks, loss_and_grad = mixtral()
  (_, (logits, _)), _ = loss_and_grad(params, toks)
  (sown_logits, out), state = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))(
    params, toks[:, :-1]
  )
  np.testing.assert_allclose(sown_logits, logits, rtol=1e-6, atol=1e-6)  # sowing changes nothing else
  assert set(state["intermediates"]) == set(model.exposes) == {"expert_ids"}
  ids = np.asarray(state["intermediates"]["expert_ids"])
  batch, length = toks.shape[0], toks.shape[1] - 1
  assert ids.dtype == np.int32 and ids.shape == (len(model.moe_layers), batch, length, model.num_experts_per_tok)
  assert ids.min() >= 0 and ids.max() < model.num_experts
  assert np.all(ids[..., 0] != ids[..., 1])  # top-2: two distinct experts per token
  # expert_load is the fraction of assignments per expert: the histogram of these ids.
  for layer in range(len(model.moe_layers)):
    counts = np.bincount(ids[layer].reshape(-1), minlength=model.num_experts)
    np.testing.assert_allclose(out.metrics["expert_load"][layer], counts / counts.sum(), rtol=1e-6)


def _causal(apply, toks):
  changed = toks.at[:, 5:].set((toks[:, 5:] + 1) % VOCAB)
  a, b = apply(toks), apply(changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
  assert not np.allclose(a[:, 5:], b[:, 5:], atol=1e-5)


def test_causal_mixtral_dropless():
  model, params, toks, loss_and_grad = mixtral()
  _causal(lambda t: loss_and_grad(params, t)[0][1][0], toks)


def test_causal_deepseek_dense():
  # (training mode without dropout or jitter computes the eval-mode logits; the bias moves only after routing)
  _, _, apply = config_train_apply("moe_deepseek")
  _causal(lambda t: apply(t)[0][0], tokens())


def test_cached_decoding_matches_full_forward_mixtral_dropless():
  model, params, toks, loss_and_grad = mixtral()
  (_, (full, _)), _ = loss_and_grad(params, toks)
  cached, _ = decode(model, {"params": params}, toks[:, :-1], prefill=1)  # token by token
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)


def test_cached_decoding_matches_full_forward_deepseek_dense():
  model, variables, apply = config_train_apply("moe_deepseek")
  toks = tokens()
  (full, _), _ = apply(toks)
  cached, _ = deepseek_decoded()
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)


def test_one_optimizer_step_lowers_the_loss():
  _, params, toks, loss_and_grad = mixtral()
  (loss0, _), grads = loss_and_grad(params, toks)
  router_grad = nn.meta.unbox(grads)["layers_0"]["ffn"]["router"]["kernel"]
  assert float(jnp.abs(router_grad).max()) > 0  # the router is trained through the combine weights
  opt = optax.adam(1e-2)
  step = jax.jit(lambda p, g: optax.apply_updates(p, opt.update(g, opt.init(p), p)[0]))
  (loss1, _), _ = loss_and_grad(step(params, grads), toks)
  assert float(loss1) < float(loss0)


def test_expert_parallel_under_the_mesh_in_context_equals_local_dispatch():
  # Under the engine's mesh context with expert=4, every MoE layer runs the all-to-all expert-parallel dispatch
  # (64 tokens split over data x expert = 8 devices, 2 experts per device). Its capacity is per device; with
  # capacity_factor=0 each device's buffers hold all its tokens, so nothing drops and the logits, loss and gradients
  # equal the unsharded dropless run.
  model, params, toks, loss_and_grad = mixtral()
  (ref_loss, (ref_logits, _)), ref_grads = loss_and_grad(params, toks)
  mesh = make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
  with mesh_context(mesh):
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    lowered = jax.jit(jax.value_and_grad(functools.partial(mixtral_loss, model), has_aux=True)).lower(replicated, toks)
    assert lowered.as_text().count("all_to_all") >= 2 * len(model.moe_layers)  # dispatch and return, every layer
    (loss, (logits, out)), grads = lowered.compile()(replicated, toks)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_array_equal(out.metrics["dropped_fraction"], 0.0)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)


def test_balance_bias_moves_in_training_and_stays_fixed_in_eval():
  model, variables, apply = config_train_apply("moe_deepseek")
  _, train_state = apply(tokens())
  u = model.bias_update_rate
  assert model.router_bias and u > 0
  assert "bias" not in str(jax.tree_util.tree_structure(variables["params"]))  # not trained by the optimizer
  bias0 = nn.meta.unbox(variables["routing_state"])
  bias1 = nn.meta.unbox(train_state["routing_state"])
  for layer in model.moe_layers:
    b0, b1 = bias0[f"layers_{layer}"]["ffn"]["router"]["bias"], bias1[f"layers_{layer}"]["ffn"]["router"]["bias"]
    assert b0.shape == (model.num_experts,)
    # Each expert moves by exactly +-u (the sign update), unless it is exactly at the mean load.
    steps = np.abs(np.asarray(b1 - b0))
    assert np.all(np.isclose(steps, u) | np.isclose(steps, 0.0)) and steps.max() > 0
  _, eval_state = deepseek_decoded()
  jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(eval_state["routing_state"]), bias0)


def test_router_bias_is_state_only_when_asked_for():
  def state(**overrides):
    model = MoELM(**TINY_EXPERTS, router="sigmoid_topk", **overrides)
    return jax.eval_shape(model.init, jax.random.key(0), tokens()).get("routing_state")

  assert state() is None
  fixed = nn.meta.unbox(state(router_bias=True))  # a loaded score-correction bias, not updated (rate 0)
  assert [fixed[f"layers_{i}"]["ffn"]["router"]["bias"].shape for i in range(2)] == [(4,), (4,)]


def test_param_counts_against_a_hand_count():
  # d=16, vocab 32, 3 layers, 2 heads x 8 (1 kv head), dense mlp 24, 4 experts of 8, top-2, 1 shared expert of 8 with
  # its gate, first layer dense, tied embeddings, swiglu.
  model = MoELM(
    **{**TINY_EXPERTS, "num_layers": 3},
    num_shared_experts=1,
    shared_expert_mlp_dim=8,
    shared_expert_gate=True,
    first_dense_layers=1,
  )
  d = 16
  attention = d * 2 * 8 + 2 * d * 1 * 8 + 2 * 8 * d  # q, k, v, out
  norms = 2 * d
  dense_ffn = 3 * d * 24
  moe_ffn = d * 4 + 4 * 3 * d * 8 + 3 * d * 8 + d  # router, experts, shared expert, shared gate
  total = 32 * d + 3 * (attention + norms) + dense_ffn + 2 * moe_ffn + d  # + final norm
  active = total - 2 * (4 - 2) * 3 * d * 8
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens())
  assert count_params(variables["params"]) == model.num_params() == total
  assert model.num_active_params() == active


def test_mixtral_config_matches_dense_active_params():
  dense = build_model(importlib.import_module("configs.dense_lm").get_config().model)
  moe = build_model(importlib.import_module("configs.moe_mixtral").get_config().model)
  assert moe.num_experts == 8 and moe.num_experts_per_tok == 2
  assert abs(moe.num_active_params() - dense.num_params()) / dense.num_params() < 0.01
  assert moe.num_params() > 2.5 * dense.num_params()
  # Training FLOPs follow the active parameters: the routed experts a token skips cost nothing.
  skipped = len(moe.moe_layers) * (8 - 2) * 3 * moe.embed_dim * moe.expert_mlp_dim
  assert moe.num_params() - moe.num_active_params() == skipped
  routers = len(moe.moe_layers) * moe.embed_dim * 8
  assert moe.train_flops_per_token(128) - dense.train_flops_per_token(128) == pytest.approx(6 * routers)


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(router="top2"), "config.model.router"),
    (dict(dispatch="magic"), "config.model.dispatch"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(bias_update_rate=1e-3), "bias_update_rate"),
    (dict(router="sigmoid_topk", bias_update_rate=1e-3), "needs router='sigmoid_topk' and router_bias=True"),
    (dict(router_bias=True), "router_bias=True needs router='sigmoid_topk'"),
    (dict(n_group=3), "n_group"),
    (dict(first_dense_layers=3), "no MoE layer"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
  ],
)
def test_bad_config_raises(overrides, match):
  with pytest.raises(ConfigError, match=match):
    MoELM(**{**TINY_EXPERTS, **overrides})
