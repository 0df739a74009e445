"""MoFME (papers.md E): the FME formula, top-k routing through the layer, the one-expert case, the Monte-Carlo router,
parameter counts (FME vs conventional MoE), a few training steps on digits, and the start-up errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo.models import ConfigError, build_model
from zoo.models.mofme import MoFMELayer, feature_modulated_experts, mc_topk_routing

DIGITS = dict(name="mofme", num_classes=10, channels=1, patch_size=2, embed_dim=16, depth=1, num_heads=2, hidden_dim=32)


def _layer(num_experts=3, k=2, modulation="dense", **kwargs):
  """A MoFME layer (embed 4 -> f 4 -> hidden 6) initialised on h [2, 3, 4]; returns (layer, params, h)."""
  layer = MoFMELayer(num_experts, k, 6, modulation=modulation, **kwargs)
  h = jax.random.normal(jax.random.key(0), (2, 3, 4))
  params = nn.meta.unbox(layer.init(jax.random.key(1), h)["params"])
  if modulation == "dense":  # non-zero biases, so that the reference checks them too
    for i, name in enumerate(("fme_a_bias", "fme_b_bias")):
      params[name] = 0.1 * jax.random.normal(jax.random.key(10 + i), params[name].shape)
  return layer, params, h


def _reference(params, h, combine):
  """Adaptor(sum_i combine_i FME_i(u)) from the parameters, one expert at a time; h [..., embed], combine [T, E]."""
  p = params
  gelu = lambda x: jax.nn.gelu(x, approximate=False)
  linear = lambda name, x: x @ p[name]["kernel"] + p[name].get("bias", 0.0)
  tokens = h.reshape(-1, h.shape[-1])
  u = gelu(linear("w1", tokens)) * linear("w2", tokens)
  mixed = 0.0
  for i in range(combine.shape[-1]):
    if p["fme_a"].ndim == 3:
      fme = (u @ p["fme_a"][i] + p["fme_a_bias"][i]) * u + u @ p["fme_b"][i] + p["fme_b_bias"][i]
    else:
      fme = p["fme_a"][i] * u * u + p["fme_b"][i] * u
    mixed = mixed + combine[:, i : i + 1] * fme
  return linear("adaptor_down", gelu(linear("adaptor_up", mixed))).reshape(h.shape)


def _apply(layer, params, h, **kwargs):
  """(y, aux, metrics, intermediates of the router) of the layer."""
  (y, (aux, metrics)), state = layer.apply({"params": params}, h, mutable=["intermediates"], **kwargs)
  return y, aux, metrics, state["intermediates"]["router"]


def test_fme_on_hand_written_vectors():
  u = jnp.array([[1.0, 2.0]])
  # Dense (the authors' code): A u = u @ A = [1, 4], + a_bias -> [1.5, 3]; * u -> [1.5, 6]; B u = [2, 1], + b -> [3, 2].
  a = jnp.array([[[1.0, 2.0], [0.0, 1.0]]])
  b = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])
  out = feature_modulated_experts(u, a, b, jnp.array([[0.5, -1.0]]), jnp.array([[1.0, 1.0]]))
  np.testing.assert_allclose(out, [[[4.5, 8.0]]])
  # Diagonal: a * u * u + b * u = [2 * 1 + 1 * 1, -1 * 4 + 3 * 2] = [3, 2]; two experts -> [tokens, E, f].
  out = feature_modulated_experts(u, jnp.array([[2.0, -1.0], [0.0, 0.0]]), jnp.array([[1.0, 3.0], [1.0, 1.0]]))
  np.testing.assert_allclose(out, [[[3.0, 2.0], [1.0, 2.0]]])


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_routing_through_the_layer(k):
  layer, params, h = _layer(num_experts=3, k=k)
  logits = jnp.array([[2.0, 0.0, 1.0], [0.0, 1.0, np.log(3.0)], [5.0, 0.0, -1.0]] * 2).reshape(2, 3, 3)
  e = np.e
  if k == 2:  # softmax over the two kept logits, 0 for the dropped one
    row = [[e / (e + 1), 0.0, 1 / (e + 1)], [0.0, e / (e + 3), 3 / (e + 3)], [e**5 / (e**5 + 1), 1 / (e**5 + 1), 0.0]]
  else:  # the best expert with weight 1 (token 2: ln 3 > 1)
    row = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
  expected = jnp.array(row * 2)
  y, _, metrics, router = _apply(layer, params, h, router_logits=logits)
  np.testing.assert_allclose(router["combine_weights"], expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(y, _reference(params, h, expected), rtol=1e-5, atol=1e-6)
  assert float(metrics["active_experts"]) == k and float(metrics["router_uncertainty"]) == 0.0


@pytest.mark.parametrize("modulation", ["dense", "diagonal"])
def test_one_expert_top_1_is_adaptor_of_fme(modulation):
  layer, params, h = _layer(num_experts=1, k=1, modulation=modulation)
  y, _, _, _ = _apply(layer, params, h)
  np.testing.assert_allclose(y, _reference(params, h, jnp.ones((6, 1))), rtol=1e-5, atol=1e-6)


def test_mc_router_without_dropout_equals_one_sample():
  layer, params, h = _layer(num_experts=4, k=2, mc_samples=5, router_dropout=0.0)
  y, aux, _, router = _apply(layer, params, h, deterministic=False)
  samples = router["sample_weights"]
  assert samples.shape == (5, 6, 4)
  np.testing.assert_array_equal(samples, jnp.broadcast_to(samples[0], samples.shape))  # T identical samples
  one = MoFMELayer(4, 2, 6, mc_samples=1)  # same parameters: T only changes the sampling
  y1, aux1, _, router1 = _apply(one, params, h, deterministic=False)
  np.testing.assert_allclose(y, y1, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(router["combine_weights"], router1["combine_weights"], rtol=1e-6)
  np.testing.assert_allclose(aux["load_balance"], aux1["load_balance"], rtol=1e-6)


def test_mc_router_with_dropout_averages_distinct_samples():
  layer, params, h = _layer(num_experts=4, k=1, mc_samples=5, router_dropout=0.5)
  y, _, metrics, router = _apply(layer, params, h, deterministic=False, rngs={"dropout": jax.random.key(3)})
  samples, combine = router["sample_weights"], router["combine_weights"]
  assert not np.allclose(samples[0], samples[1])  # dropout on the router input: the samples differ
  np.testing.assert_allclose(combine, samples.mean(0), rtol=1e-6)  # ... and their average is what the layer uses
  np.testing.assert_allclose(y, _reference(params, h, combine), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(combine.sum(-1), 1.0, rtol=1e-6)
  assert float(metrics["active_experts"]) > 1.0 and float(metrics["router_uncertainty"]) > 0.0


def test_deterministic_eval_uses_no_dropout():
  layer, params, h = _layer(num_experts=4, k=2, mc_samples=5, router_dropout=0.5)
  y, _, metrics, router = _apply(layer, params, h)  # no 'dropout' RNG is needed
  assert router["sample_weights"].shape == (1, 6, 4)
  plain = h.reshape(-1, 4) @ params["router"]["kernel"]
  y_plain, _, _, _ = _apply(layer, params, h, router_logits=plain)
  np.testing.assert_allclose(y, y_plain, rtol=1e-6, atol=1e-7)
  assert float(metrics["active_experts"]) == 2.0


def test_mc_topk_routing_losses_are_sample_averages():
  logits = jax.random.normal(jax.random.key(0), (3, 8, 4))
  routing, weights = mc_topk_routing(logits, 2)
  singles = [mc_topk_routing(logits[t : t + 1], 2)[0] for t in range(3)]
  for name in ("load_balance", "z_loss"):
    np.testing.assert_allclose(routing.aux[name], np.mean([s.aux[name] for s in singles]), rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["expert_load"].sum(), 1.0, rtol=1e-6)
  dense = jnp.zeros((8, 4)).at[jnp.arange(8)[:, None], jnp.maximum(routing.expert_ids, 0)].add(routing.weights)
  np.testing.assert_allclose(dense, weights.mean(0), rtol=1e-6)
  assert singles[0].expert_ids.shape == (8, 2) and routing.expert_ids.shape == (8, 4)


def _params_of(config):
  model = build_model(config)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, config.get("channels", 3))))
  params = variables["params"]
  layer = sum(x.size for x in jax.tree.leaves(params["layers_0"]["ffn"]))
  return model, sum(x.size for x in jax.tree.leaves(params)), layer


@pytest.mark.parametrize(
  "extra",
  [
    dict(ffn="mofme"),
    dict(ffn="mofme", modulation="diagonal"),
    dict(ffn="mofme", fme_dim=24, use_bias=False),
    dict(ffn="moe"),
  ],
)
def test_num_params_is_the_real_count(extra):
  model, total, layer = _params_of({**DIGITS, "depth": 2, "num_experts": 3, **extra})
  assert model.num_params() == total and model.ffn_params() == layer
  assert 0 < model.num_active_params() < model.num_params()


# One layer (router included) at embed 64, hidden 256 (the paper's 4x), FME width = embed (authors' code), E experts;
# fewer parameters than the conventional MoE with E experts of hidden 256:
#   dense FME (authors' code): E=4 43%, E=8 59%, E=16 67% fewer;  diagonal FME: E=4 68%, E=8 84%, E=16 92% fewer.
# The paper claims > 72% fewer (whole networks; its table's configuration is not in the released scripts).
@pytest.mark.parametrize(
  "modulation, num_experts, fewer",
  [("dense", 4, 0.4293), ("dense", 16, 0.6658), ("diagonal", 4, 0.6788), ("diagonal", 16, 0.9153)],
)
def test_fme_layer_has_far_fewer_params_than_conventional_moe(modulation, num_experts, fewer):
  sizes = dict(DIGITS, embed_dim=64, hidden_dim=256, num_heads=4, num_experts=num_experts)
  fme, _, fme_layer = _params_of({**sizes, "modulation": modulation})
  moe, _, moe_layer = _params_of({**sizes, "ffn": "moe"})
  assert fme_layer == fme.ffn_params() and moe_layer == moe.ffn_params() == 64 * num_experts * (1 + 2 * 256)
  assert 1 - fme_layer / moe_layer == pytest.approx(fewer, abs=1e-4)
  assert fme_layer < 0.6 * moe_layer


@pytest.mark.parametrize("ffn", ["mofme", "moe"])
def test_a_few_steps_on_digits_lower_the_loss(ffn):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  images = jnp.asarray(digits.images[:64, :, :, None] / 16.0, jnp.float32)
  labels = jnp.asarray(digits.target[:64], jnp.int32)
  model = build_model({**DIGITS, "ffn": ffn, "num_experts": 4, "top_k": 2, "mc_samples": 5, "router_dropout": 0.1})
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images)["params"])
  opt = optax.adam(3e-3)

  def loss_fn(params, rng):
    logits, out = model.apply(
      {"params": params}, images, deterministic=rng is None, rngs=None if rng is None else {"dropout": rng}
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() + out.aux_loss

  @jax.jit
  def step(params, opt_state, rng):
    grads = jax.grad(loss_fn)(params, rng)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  evaluate = jax.jit(lambda params: loss_fn(params, None))
  before = float(evaluate(params))
  opt_state = opt.init(params)
  for i in range(15):
    params, opt_state = step(params, opt_state, jax.random.key(100 + i))
  after = float(evaluate(params))
  assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(ffn="dense"), "config.model.ffn='dense' is invalid; choose one of \\('mofme', 'moe'\\)"),
    (dict(modulation="full"), "config.model.modulation='full' is invalid"),
    (dict(top_k=5, num_experts=4), "config.model.top_k=5 is invalid; allowed 1..num_experts=4"),
    (dict(router_dropout=1.0), "config.model.router_dropout=1.0 must be in \\[0, 1\\)"),
    (dict(mc_samples=0), "config.model.mc_samples=0 must be a positive integer"),
    (dict(embed_dim=18), "config.model.embed_dim=18 must be a multiple of config.model.num_heads=2|multiple of 4"),
    (dict(embed_dim=6, num_heads=3), "multiple of 4"),
    (dict(dispatch="sparse"), "config.model.dispatch='sparse' is invalid"),
    (dict(fme_dim=0), "config.model.fme_dim=0 must be a positive integer or None"),
  ],
)
def test_bad_config_raises(bad, match):
  with pytest.raises(ConfigError, match=match):
    build_model({**DIGITS, **bad})


@pytest.mark.parametrize(
  "shape, match",
  [
    ((1, 7, 8, 1), "image size 7x8 is not divisible by config.model.patch_size=2"),
    ((1, 8, 8, 3), "images have 3 channels but the model takes config.model.channels=1"),
    ((8, 8, 1), "images must be float \\[batch, height, width, channels\\]"),
  ],
)
def test_bad_images_raise(shape, match):
  model = build_model(DIGITS)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
