"""Read-ME (papers.md A4): expert extraction, pre-gate losses, the model's phases and cached decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.layers import count_params
from zoo.models import ConfigError
from zoo.models.dense_lm import DenseLM
from zoo.models.readme_moe import ReadMeFFN, ReadMeLM
from zoo.routing.pregate import (
  down_proj_inputs,
  expert_masks,
  extracted_widths,
  neuron_importance,
  pregate_loss,
  pregate_routing,
  pregate_targets,
  readme_params_from_dense,
)

DIMS = dict(vocab_size=48, num_layers=1, embed_dim=16, num_heads=2, mlp_dim=8)


def _tokens(b=2, t=6, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, DIMS["vocab_size"])


def test_expert_masks_hand_made():
  # 2 domains, 4 neurons, keep 2 each: domain 0 keeps {0, 1}, domain 1 keeps {1, 2};
  # shared = {1}, expert 0 = {0}, expert 1 = {2}; neuron 3 is dropped.
  importance = np.array([[4.0, 3.0, 1.0, 0.0], [0.0, 5.0, 2.0, 1.0]])
  shared, experts = expert_masks(importance, 0.5)
  np.testing.assert_array_equal(shared, [False, True, False, False])
  np.testing.assert_array_equal(experts, [[True, False, False, False], [False, False, True, False]])
  shared3, experts3 = expert_masks(np.stack([importance, importance[::-1]]), 0.5)
  np.testing.assert_array_equal(shared3[1], [False, True, False, False])
  np.testing.assert_array_equal(experts3[1], [[False, False, True, False], [True, False, False, False]])
  assert extracted_widths(shared3, experts3) == (1, 1)
  with pytest.raises(ValueError, match="domains"):
    expert_masks(importance[:1], 0.5)
  with pytest.raises(ValueError, match="keep_fraction"):
    expert_masks(importance, 0.0)


def test_neuron_importance_masks_padding():
  hidden = np.zeros((1, 1, 3, 2))
  hidden[0, 0] = [[1.0, -2.0], [3.0, 0.0], [100.0, 100.0]]
  mask = np.array([[1.0, 1.0, 0.0]])  # the third token is padding
  np.testing.assert_allclose(neuron_importance(hidden, mask), [[2.0, 1.0]])
  with pytest.raises(ValueError, match="no token"):
    neuron_importance(hidden, np.zeros((1, 3)))


def test_down_proj_inputs_are_the_mlp_activations():
  model = DenseLM(**DIMS)
  tokens = _tokens()
  params = model.init(jax.random.key(0), tokens)["params"]
  hidden = down_proj_inputs(model, params, tokens)
  assert hidden.shape == (1, 2, 6, DIMS["mlp_dim"])
  # The captured arrays are the inputs of `down`: times its kernel they give its outputs.
  _, state = model.apply({"params": params}, tokens, capture_intermediates=True)
  p = nn.meta.unbox(params)
  for i in range(DIMS["num_layers"]):
    out = state["intermediates"][f"layers_{i}"]["ffn"]["down"]["__call__"][0]
    np.testing.assert_allclose(hidden[i] @ p[f"layers_{i}"]["ffn"]["down"]["kernel"], out, atol=1e-5)


def _converted(keep_fraction, stats_seed=0):
  dense = DenseLM(**DIMS)
  readme = ReadMeLM(**DIMS, num_experts=2, keep_fraction=keep_fraction, router_mlp_dim=16, dispatch="dense")
  tokens = _tokens()
  dense_params = nn.meta.unbox(dense.init(jax.random.key(1), tokens)["params"])
  readme_params = nn.meta.unbox(readme.init(jax.random.key(2), tokens)["params"])
  importance = np.random.default_rng(stats_seed).random((DIMS["num_layers"], 2, DIMS["mlp_dim"]))
  shared, experts = expert_masks(importance, keep_fraction)
  params = readme_params_from_dense(dense_params, shared, experts, readme_params)
  return dense, readme, dense_params, params, shared, experts, tokens


def test_keep_all_neurons_reproduces_the_dense_lm():
  # keep_fraction=1: every neuron is shared, the experts are all padding, so Read-ME == the dense LM.
  dense, readme, dense_params, params, shared, experts, tokens = _converted(1.0)
  assert shared.all() and not experts.any()
  dense_logits, _ = dense.apply({"params": dense_params}, tokens)
  logits, _ = readme.apply({"params": params}, tokens)
  np.testing.assert_allclose(logits, dense_logits, atol=1e-5)
  np.testing.assert_array_equal(params["router"]["embed"]["embedding"], dense_params["embed"]["embedding"])


def test_extracted_ffn_is_the_dense_ffn_on_shared_plus_expert_neurons():
  dense, readme, dense_params, params, shared, experts, _ = _converted(0.5)
  x = jax.random.normal(jax.random.key(3), (5, DIMS["embed_dim"]))
  layer, expert = 0, 1
  ffn = dense_params[f"layers_{layer}"]["ffn"]
  keep = shared[layer] | experts[layer, expert]
  h = jax.nn.silu(x @ ffn["gate"]["kernel"]) * (x @ ffn["up"]["kernel"])
  expected = (h * keep) @ ffn["down"]["kernel"]
  logits = jnp.zeros((5, 2)).at[:, expert].set(1.0)
  y, _ = readme.ffn_factory()(parent=None).apply(
    {"params": params[f"layers_{layer}"]["ffn"]}, x, routing=pregate_routing(logits)
  )
  np.testing.assert_allclose(y, expected, atol=1e-5)


def test_pregate_loss_and_targets_by_hand():
  # Uniform logits: log p = -log E for every expert, and both targets sum to 1, so the loss is (0.75 + 0.25) log E.
  targets = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
  loss, accuracy = pregate_loss(jnp.zeros((2, 3)), targets)
  np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)
  _, accuracy = pregate_loss(jnp.array([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), targets)
  np.testing.assert_allclose(accuracy, 0.5)
  # A confident right router has a lower loss than a confident wrong one.
  right, _ = pregate_loss(jnp.array([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]), targets)
  wrong, _ = pregate_loss(jnp.array([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0]]), targets)
  assert right < wrong
  # Layer 0 scores [1, 3] -> [0.25, 0.75]; layer 1 scores [2, 2] -> [0.5, 0.5]; mean [0.375, 0.625].
  np.testing.assert_allclose(pregate_targets(jnp.array([[[1.0, 3.0]], [[2.0, 2.0]]])), [[0.375, 0.625]])


def test_model_shapes_params_and_one_route_for_all_layers():
  model = ReadMeLM(**{**DIMS, "num_layers": 2}, num_experts=3, router_mlp_dim=16, dispatch="dense")
  tokens = _tokens()
  variables = model.init(jax.random.key(0), tokens)
  assert count_params(variables["params"]) == model.num_params()
  # A token uses the shared expert and one of the 3 domain experts: 2 of them are skipped in each of 2 layers.
  domain_experts = sum(
    count_params(variables["params"][f"layers_{i}"]["ffn"][name]) for i in range(2) for name in ("gate", "up", "down")
  )
  assert model.num_params() - model.num_active_params() == domain_experts * 2 // 3
  logits, out = jax.jit(model.apply)(variables, tokens)
  assert logits.shape == (2, 6, DIMS["vocab_size"])
  assert out.metrics["expert_load"].shape == (2, 3)
  np.testing.assert_allclose(out.metrics["expert_load"][0], out.metrics["expert_load"][1])
  route = model.apply(variables, tokens, method="route")
  np.testing.assert_allclose(out.metrics["expert_load"][0], np.bincount(np.ravel(route), minlength=3) / route.size)
  assert float(out.aux_loss) == pytest.approx(float(out.metrics["router_loss"]))


def test_cached_decoding_matches_full_forward():
  model = ReadMeLM(**DIMS, num_experts=2, router_mlp_dim=16, train_phase="backbone")
  tokens = _tokens(t=7)
  variables = model.init(jax.random.key(0), tokens)
  full, _ = jax.jit(model.apply)(variables, tokens)
  cache = model.apply(variables, 2, 8, method="init_cache")
  step = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))
  logits, out = step(variables, tokens[:, :4], cache)
  pieces = [logits]
  for i in range(4, 7):
    logits, out = step(variables, tokens[:, i : i + 1], out.cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5)


@pytest.mark.parametrize("phase", ["router", "backbone", "joint"])
def test_train_phase_stops_gradients_to_the_other_part(phase):
  model = ReadMeLM(**DIMS, num_experts=2, router_mlp_dim=16, train_phase=phase, dispatch="dense")
  tokens = _tokens()
  params = model.init(jax.random.key(0), tokens)["params"]

  def loss(p):
    logits, out = model.apply({"params": p}, tokens)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
    return nll + out.aux_loss

  grads = nn.meta.unbox(jax.jit(jax.grad(loss))(params))
  router_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads.pop("router")))
  backbone_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads))
  assert (router_norm > 0) == (phase != "backbone")
  assert (backbone_norm > 0) == (phase != "router")


def test_bad_config_raises():
  with pytest.raises(ConfigError, match="train_phase"):
    ReadMeLM(**DIMS, train_phase="both")
  with pytest.raises(ConfigError, match="num_experts"):
    ReadMeLM(**DIMS, num_experts=1)
  with pytest.raises(ValueError, match="routing"):
    ReadMeFFN(num_experts=2, expert_mlp_dim=4).init(jax.random.key(0), jnp.zeros((3, 8)))
