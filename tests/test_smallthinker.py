"""SmallThinker: the router by hand, the NoPE-global / RoPE-sliding layer pattern, routing computed before attention
is the routing the FFN uses (prefetch), cached decoding, gradients to the routers and config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_testing
from configs.smallthinker import get_config
from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.routing import sigmoid_topk

TINY = dict(
  model_testing.TINY_MOE, name="smallthinker", num_kv_heads=1, mlp_dim=24, num_experts_per_tok=2, sliding_window=4
)


def test_router_top_k_of_logits_then_normalised_sigmoid():
  r = sigmoid_topk(jnp.array([[2.0, -1.0, 0.5, 3.0]]), 2)
  np.testing.assert_array_equal(r.expert_ids, [[3, 0]])
  s3, s2 = 1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(-2.0))
  np.testing.assert_allclose(r.weights, [[s3 / (s3 + s2), s2 / (s3 + s2)]], rtol=1e-6)


def test_layer_pattern_and_config():
  model = build_model(get_config().model)
  assert [model.is_nope_global(i) for i in range(model.num_layers)] == [True, False, False, False, True]
  for i in range(model.num_layers):
    attention = model.layer_attention_factory(i).keywords
    assert attention["use_rope"] != model.is_nope_global(i)
    assert attention["sliding_window"] == (None if model.is_nope_global(i) else 32)
  assert model.mlp_activation == "reglu" and model.router == "sigmoid_topk"


tiny = model_testing.tiny_fixture(TINY)


def test_shapes_params_and_gradients_reach_the_routers(tiny):
  model, tokens, variables = tiny
  params = variables["params"]
  assert count_params(params) == model.num_params()

  def loss_fn(params):
    logits, out = model.apply({**variables, "params": params}, tokens)
    return jnp.mean(logits**2) + out.aux_loss, (logits, out)

  grads, (logits, out) = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
  assert logits.shape == (2, 8, 32) and out.metrics["expert_load"].shape == (2, 4)
  np.testing.assert_allclose(
    out.aux_loss, 1e-2 * out.metrics["load_balance"].sum() + 1e-3 * out.metrics["z_loss"].sum(), rtol=1e-6
  )
  grads = nn.meta.unbox(grads)
  for i in range(2):
    assert float(jnp.abs(grads[f"layers_{i}"]["router"]["kernel"]).max()) > 0, i


def test_routing_before_attention_is_what_the_ffn_uses(tiny):
  model, tokens, variables = tiny
  params = nn.meta.unbox(variables["params"])
  cache = model.init_cache(1, 8)
  prefill = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))
  decode = jax.jit(lambda v, t, c: model.apply(v, t, cache=c, mutable=["intermediates"]))
  _, out = prefill(variables, tokens[:1, :7], cache)
  (logits, _), state = decode(variables, tokens[:1, 7:], out.cache)
  prefetched = [np.asarray(state["intermediates"][f"layers_{i}"]["prefetch_expert_ids"])[0, 0] for i in range(2)]
  # The model's per-token output is the same routing, stacked over the MoE layers.
  np.testing.assert_array_equal(state["intermediates"]["expert_ids"][:, 0, 0], prefetched)
  assert state["intermediates"]["expert_ids"].shape == (2, 1, 1, model.num_experts_per_tok)
  # Layer 0's routing comes from its block input, the raw embedding (before the attention norm and attention).
  embedding = params["embed"]["embedding"][tokens[0, 7]]
  top = np.argsort(-np.asarray(embedding @ params["layers_0"]["router"]["kernel"]))[:2]
  np.testing.assert_array_equal(np.sort(prefetched[0]), np.sort(top))

  # The FFN computes exactly the prefetched experts: changing any other expert leaves the logits unchanged, changing a
  # prefetched one does not.
  def with_experts_moved(pick):
    moved = jax.tree.map(lambda x: x, params)
    for i in range(2):
      experts = np.array([pick(e in prefetched[i]) for e in range(4)])
      ffn = moved[f"layers_{i}"]["ffn"]
      ffn["down"] = ffn["down"] + 1.0 * experts[:, None, None]
    return decode({**variables, "params": moved}, tokens[:1, 7:], out.cache)[0][0]

  np.testing.assert_allclose(with_experts_moved(lambda used: not used), logits, atol=1e-6)
  assert not np.allclose(with_experts_moved(lambda used: used), logits, atol=1e-3)


@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      dict(router="expert_choice"),
      r"router='expert_choice' is invalid; choose one of \('sigmoid_topk', 'softmax_topk'\)",
    ),
    (dict(nope_every=0), "nope_every=0"),
  ],
)
def test_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    build_model({**TINY, **overrides})
