"""Routers, aux losses and routing metrics on small cases computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import routing


def _logits_for_probs(probs):
  """Logits whose softmax is `probs` (rows sum to 1)."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


def _logits_for_scores(scores):
  """Logits whose sigmoid is `scores`."""
  s = np.asarray(scores, np.float64)
  return jnp.asarray(np.log(s / (1 - s)), jnp.float32)


PROBS = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.15, 0.25, 0.1], [0.25, 0.2, 0.45, 0.1]]


def test_softmax_top2_renormalized():
  r = routing.softmax_topk(_logits_for_probs(PROBS), 2)
  np.testing.assert_array_equal(r.expert_ids, [[3, 2], [0, 2], [2, 0]])
  np.testing.assert_allclose(
    r.weights, [[4 / 7, 3 / 7], [0.5 / 0.75, 0.25 / 0.75], [0.45 / 0.7, 0.25 / 0.7]], rtol=1e-6
  )
  np.testing.assert_allclose(r.probs, PROBS, rtol=1e-6)


def test_softmax_top2_without_renormalization_and_scaling():
  r = routing.softmax_topk(_logits_for_probs(PROBS), 2, renormalize=False, routed_scaling_factor=2.0)
  np.testing.assert_allclose(r.weights, [[0.8, 0.6], [1.0, 0.5], [0.9, 0.5]], rtol=1e-6)


def test_softmax_top1_switch_load_balance_by_hand():
  r = routing.softmax_topk(_logits_for_probs(PROBS), 1)
  np.testing.assert_array_equal(r.expert_ids, [[3], [0], [2]])
  # f = [1/3, 0, 1/3, 1/3]; P = column means of PROBS = [0.85, 0.55, 1.0, 0.6] / 3.
  expected = 4 * (0.85 + 1.0 + 0.6) / 9
  np.testing.assert_allclose(r.aux["load_balance"], expected, rtol=1e-6)
  np.testing.assert_allclose(r.metrics["expert_load"], [1 / 3, 0, 1 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(r.metrics["load_imbalance"], 4 / 3, rtol=1e-6)


def test_load_balance_minimum_is_one_under_uniform_routing():
  experts = 4  # k = 2 experts per token below
  probs = jnp.full((8, experts), 1 / experts)
  ids = jnp.array([[0, 1], [2, 3]] * 4)
  np.testing.assert_allclose(routing.load_balance_loss(probs, ids, experts), 1.0, rtol=1e-6)
  # All tokens on expert 0 with all probability there: the maximum E.
  collapsed = jnp.zeros((8, experts)).at[:, 0].set(1.0)
  np.testing.assert_allclose(
    routing.load_balance_loss(collapsed, jnp.zeros((8, 1), jnp.int32), experts), experts, rtol=1e-6
  )


def test_load_balance_per_sequence_by_hand():
  probs = jnp.array([[0.8, 0.2], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6]])
  ids = jnp.array([[0], [0], [1], [1]])
  np.testing.assert_allclose(routing.load_balance_loss(probs, ids, 2), 1.0, rtol=1e-6)
  # Per sequence of 2: f = [1, 0], P = [0.7, 0.3] -> 2 * 0.7, and the mirror image.
  np.testing.assert_allclose(routing.load_balance_loss(probs, ids, 2, sequence_length=2), 1.4, rtol=1e-6)
  with pytest.raises(ValueError, match="sequence_length=3"):
    routing.load_balance_loss(probs, ids, 2, sequence_length=3)


def test_load_balance_gradient_only_through_probabilities():
  logits = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
  grad = jax.grad(lambda l: routing.softmax_topk(l, 1).aux["load_balance"])(logits)
  # f = [1, 0, 0] for both tokens, so the loss is 3 * mean_t p_t0; its gradient is that of the mean probability.
  expected = jax.grad(lambda l: 3 * jnp.mean(jax.nn.softmax(l)[:, 0]))(logits)
  np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_router_z_loss_by_hand():
  logits = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
  np.testing.assert_allclose(routing.router_z_loss(logits), expected, rtol=1e-6)
  r = routing.softmax_topk(logits, 1)
  np.testing.assert_allclose(r.aux["z_loss"], expected, rtol=1e-6)
  np.testing.assert_allclose(r.metrics["router_z"], (math.log(2) + 1 + math.log(2)) / 2, rtol=1e-6)


def test_router_entropy_metric():
  r = routing.softmax_topk(jnp.zeros((3, 4)), 1)
  np.testing.assert_allclose(r.metrics["router_entropy"], math.log(4), rtol=1e-6)
  peaked = routing.softmax_topk(jnp.array([[0.0, -1e4, -1e4, -1e4]]), 1)
  np.testing.assert_allclose(peaked.metrics["router_entropy"], 0.0, atol=1e-6)


def test_sigmoid_bias_selects_but_weights_are_unbiased():
  logits = _logits_for_scores([[0.9, 0.8, 0.1, 0.7]])
  plain = routing.sigmoid_topk(logits, 2)
  np.testing.assert_array_equal(plain.expert_ids, [[0, 1]])
  np.testing.assert_allclose(plain.weights, [[0.9 / 1.7, 0.8 / 1.7]], rtol=1e-5)
  biased = routing.sigmoid_topk(logits, 2, bias=jnp.array([0.0, 0.0, 1.0, 0.0]), routed_scaling_factor=2.5)
  # choice scores 0.9, 0.8, 1.1, 0.7 -> experts 2 and 0; weights from the unbiased 0.1 and 0.9 (sum 1) times 2.5.
  np.testing.assert_array_equal(biased.expert_ids, [[2, 0]])
  np.testing.assert_allclose(biased.weights, [[0.25, 2.25]], rtol=1e-5)
  np.testing.assert_allclose(biased.probs, [[0.9 / 2.5, 0.8 / 2.5, 0.1 / 2.5, 0.7 / 2.5]], rtol=1e-5)


def test_bias_update_moves_bias_against_the_load():
  bias = jnp.array([0.0, 0.5, 0.0, -0.5])
  new = routing.update_balance_bias(bias, jnp.array([0.5, 0.25, 0.25, 0.0]), 0.1)
  np.testing.assert_allclose(new, [-0.1, 0.5, 0.0, -0.4], rtol=1e-6)


def test_bias_balancing_loop_reduces_imbalance():
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, 4)) + jnp.array([2.0, 0.0, 0.0, -1.0])
  imbalance = jax.jit(lambda b: routing.sigmoid_topk(logits, 1, bias=b).metrics["load_imbalance"])

  def step(bias, _):
    r = routing.sigmoid_topk(logits, 1, bias=bias)
    return routing.update_balance_bias(bias, r.metrics["expert_load"], 0.02), None

  first = imbalance(jnp.zeros(4))
  bias, _ = jax.lax.scan(step, jnp.zeros(4), length=100)
  last = imbalance(bias)
  assert first > 2.0
  assert last < 1.3
  assert bias[0] < 0 < bias[3]


GROUP_SCORES = [[0.9, 0.02, 0.5, 0.45, 0.8, 0.01, 0.3, 0.35]]  # top-2 group sums: 0.92, 0.95, 0.81, 0.65


def test_group_limited_selection_uses_top2_sum_of_groups():
  logits = _logits_for_scores(GROUP_SCORES)
  unlimited = routing.sigmoid_topk(logits, 2)
  np.testing.assert_array_equal(unlimited.expert_ids, [[0, 4]])
  two_groups = routing.sigmoid_topk(logits, 2, n_group=4, topk_group=2)
  np.testing.assert_array_equal(two_groups.expert_ids, [[0, 2]])
  # With one group the best group by top-2 sum is group 1 (experts 2, 3), not group 0 that holds the maximum.
  one_group = routing.sigmoid_topk(logits, 2, n_group=4, topk_group=1)
  np.testing.assert_array_equal(one_group.expert_ids, [[2, 3]])
  mask = routing.group_limited_mask(jnp.asarray(GROUP_SCORES), 4, 2)
  np.testing.assert_array_equal(mask, [[True, True, True, True, False, False, False, False]])


def test_group_limited_softmax_picks_only_from_top_groups():
  scores = jax.random.uniform(jax.random.PRNGKey(1), (32, 16))
  r = routing.softmax_topk(jnp.log(scores), 3, n_group=4, topk_group=2)
  mask = routing.group_limited_mask(r.probs, 4, 2)
  assert bool(jnp.all(jnp.take_along_axis(mask, r.expert_ids, axis=-1)))
  groups_used = jnp.sum(jax.nn.one_hot(r.expert_ids // 4, 4).max(axis=1), axis=-1)
  assert int(groups_used.max()) <= 2


def test_expert_choice_by_hand():
  probs = [[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]]
  r = routing.expert_choice(_logits_for_probs(probs), capacity_factor=1.0)
  assert r.capacity == 2  # ceil(3 tokens * 1.0 / 2 experts)
  np.testing.assert_array_equal(r.expert_ids, [[0, 1], [-1, 1], [0, -1]])
  np.testing.assert_allclose(r.weights, [[0.7, 0.3], [0.0, 0.6], [0.9, 0.0]], rtol=1e-6)
  assert set(r.aux) == {"z_loss"}


def test_routing_from_dense_marks_zero_weights_empty():
  combine = jnp.array([[0.0, 1.5, 0.0], [0.2, 0.0, 0.3], [0.0, 0.0, 0.1]])
  r = routing.routing_from_dense(combine, jnp.zeros((3, 3)))
  np.testing.assert_array_equal(r.expert_ids, [[-1, 1, -1], [0, -1, 2], [-1, -1, 2]])
  np.testing.assert_allclose(r.metrics["expert_load"], [0.25, 0.25, 0.5])


def test_jitter_bounds_and_identity():
  x = jnp.ones((4, 8))
  noisy = routing.jitter(x, jax.random.PRNGKey(0), 0.01)
  assert float(jnp.abs(noisy - 1).max()) <= 0.01
  assert float(jnp.abs(noisy - 1).max()) > 0
  np.testing.assert_array_equal(routing.jitter(x, jax.random.PRNGKey(0), 0.0), x)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="k=5"):
    routing.softmax_topk(jnp.zeros((2, 4)), 5)
  with pytest.raises(ValueError, match="n_group=3"):
    routing.sigmoid_topk(jnp.zeros((2, 4)), 1, n_group=3, topk_group=1)
  with pytest.raises(ValueError, match="topk_group=3"):
    routing.sigmoid_topk(jnp.zeros((2, 4)), 1, n_group=2, topk_group=3)
  with pytest.raises(ValueError, match="bias must have shape"):
    routing.sigmoid_topk(jnp.zeros((2, 4)), 1, bias=jnp.zeros(3))
  with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
    routing.softmax_topk(jnp.zeros((2, 3, 4)), 1)


def test_router_module_bias_state_updates_only_in_training():
  router = routing.Router(4, 1, score="sigmoid", bias_balancing=True, bias_update_rate=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
  variables = router.init(jax.random.PRNGKey(1), x)
  assert set(variables) == {"params", "routing_state"}
  r, state = router.apply(variables, x, deterministic=False, mutable=["routing_state"])
  bias = jax.tree.leaves(state)[0]
  expected = routing.update_balance_bias(jnp.zeros(4), r.metrics["expert_load"], 0.1)
  np.testing.assert_allclose(bias, expected)
  _, state = router.apply(variables, x, deterministic=True, mutable=["routing_state"])
  np.testing.assert_array_equal(jax.tree.leaves(state)[0], jnp.zeros(4))


def test_router_module_fixed_bias_selects_and_stays_with_rate_zero():
  # A loaded score-correction bias (DeepSeek-V3): used for selection, never moved when bias_update_rate == 0.
  router = routing.Router(4, 1, score="sigmoid", bias_balancing=True, bias_update_rate=0.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 16))
  variables = router.init(jax.random.PRNGKey(1), x)
  bias = jnp.array([0.0, 0.0, 5.0, 0.0])
  variables = {**variables, "routing_state": {"bias": variables["routing_state"]["bias"].replace_boxed(bias)}}
  r, state = router.apply(variables, x, deterministic=False, mutable=["routing_state"])
  np.testing.assert_array_equal(r.expert_ids, 2)  # the bias outweighs any sigmoid score difference
  np.testing.assert_array_equal(jax.tree.leaves(state)[0], bias)


def test_router_module_frozen_kernel_is_not_a_parameter():
  router = routing.Router(4, 2, frozen=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 16))
  variables = router.init(jax.random.PRNGKey(1), x)
  assert "params" not in variables
  kernel = jax.tree.leaves(variables["routing_state"])[0]
  assert kernel.shape == (16, 4)
  r = router.apply(variables, x)
  np.testing.assert_array_equal(r.expert_ids, routing.softmax_topk(x @ kernel, 2).expert_ids)


def test_router_registry_builds_the_configured_routers():
  assert set(routing.router_names()) >= {"softmax_topk", "sigmoid_topk", "expert_choice", "random"}
  options = dict(num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5)
  softmax = routing.get_router("softmax_topk")(**options)
  assert (softmax.score, softmax.frozen, softmax.bias_balancing, softmax.n_group) == ("softmax", False, False, 2)
  sigmoid = routing.get_router("sigmoid_topk")(**options, bias=True, bias_update_rate=0.1)
  assert (sigmoid.score, sigmoid.bias_balancing, sigmoid.bias_update_rate) == ("sigmoid", True, 0.1)
  chooser = routing.get_router("expert_choice")(**options)
  assert (chooser.score, chooser.capacity_factor) == ("expert_choice", 2.0)  # c = k: the cost of top-k
  frozen = routing.get_router("random")(**options)
  assert (frozen.score, frozen.frozen) == ("softmax", True)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 16))
  variables = frozen.init(jax.random.PRNGKey(1), x)
  assert "params" not in variables  # the frozen kernel is state
  with pytest.raises(ValueError, match="has no selection bias"):
    routing.get_router("softmax_topk")(**options, bias=True)


def test_router_registry_names_unknown_routers_and_refuses_duplicates():
  with pytest.raises(ValueError, match=r"router 'top2' is unknown; choose one of \[.*'softmax_topk'"):
    routing.get_router("top2")
  factory = routing.get_router("softmax_topk")
  assert factory.registry_name == "softmax_topk"
  assert routing.register_router("softmax_topk")(factory) is factory  # registering the same factory again is fine
  with pytest.raises(ValueError, match="registered twice"):
    routing.register_router("softmax_topk")(lambda **options: None)


def test_router_module_logical_axes():
  variables = routing.Router(4, 2).init(jax.random.PRNGKey(1), jnp.ones((3, 16)))
  assert variables["params"]["kernel"].names == ("embed", "expert")


def test_stack_layer_metrics():
  layers = [routing.softmax_topk(jnp.zeros((3, 4)), 1).metrics for _ in range(5)]
  stacked = routing.stack_layer_metrics(layers)
  assert stacked["expert_load"].shape == (5, 4)
  assert stacked["router_entropy"].shape == (5,)
