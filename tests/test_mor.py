"""Mixture-of-Recursions: depth-routing primitives (`zoo/routing/depth.py`) and the `mor` model."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from zoo.routing import depth as D


# ----------------------------------------------------------------------------------------------- routing primitives

def test_default_capacities_and_k():
  assert D.default_capacities(3) == pytest.approx((1.0, 2 / 3, 1 / 3))
  assert [D.capacity_to_k(c, 12) for c in D.default_capacities(3)] == [12, 8, 4]
  assert [D.capacity_to_k(c, 10) for c in D.default_capacities(2)] == [10, 5]
  assert D.capacity_to_k(0.01, 10) == 1
  with pytest.raises(ValueError, match="non-increasing"):
    D.validate_capacities((0.5, 1.0), 2)
  with pytest.raises(ValueError, match="num_recursions"):
    D.validate_capacities((1.0,), 2)


def test_capacity_warmup_goes_from_one_to_target():
  caps = (1.0, 0.5)
  np.testing.assert_allclose(D.capacity_at_step(caps, 0, warmup_steps=10), [1.0, 1.0])
  np.testing.assert_allclose(D.capacity_at_step(caps, 5, warmup_steps=10), [1.0, 0.75], atol=1e-6)
  np.testing.assert_allclose(D.capacity_at_step(caps, 50, warmup_steps=10), [1.0, 0.5])
  np.testing.assert_allclose(D.capacity_at_step(caps, None, warmup_steps=10), [1.0, 0.5])


def test_hierarchical_topk_by_hand():
  scores = jnp.array([[0.9, 0.1, 0.8, 0.7, 0.2, 0.95]])
  all_on = jnp.ones_like(scores, bool)
  step1 = D.hierarchical_topk(scores, all_on, 4)
  np.testing.assert_array_equal(step1, [[1, 0, 1, 1, 0, 1]])
  # Step 2 rescored: token 1 now has the best score but was dropped at step 1, so it cannot come back.
  scores2 = jnp.array([[0.3, 0.99, 0.1, 0.6, 0.98, 0.5]])
  step2 = D.hierarchical_topk(scores2, step1, 2)
  np.testing.assert_array_equal(step2, [[0, 0, 0, 1, 0, 1]])
  np.testing.assert_array_equal(D.chosen_indices(step2, 2), [[3, 5]])  # causal order
  # Traced k (capacity warm-up) gives the same selection.
  traced = jax.jit(D.hierarchical_topk)(scores2, step1, jnp.int32(2))
  np.testing.assert_array_equal(traced, step2)


def test_hierarchical_topk_random_properties():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.normal(size=(3, 17)), jnp.float32)
  prev = jnp.asarray(rng.random((3, 17)) < 0.7)
  k = 5
  chosen = np.asarray(D.hierarchical_topk(scores, prev, k))
  for b in range(3):
    active = np.flatnonzero(np.asarray(prev[b]))
    best = active[np.argsort(-np.asarray(scores[b])[active], kind="stable")[:k]]
    np.testing.assert_array_equal(np.flatnonzero(chosen[b]), np.sort(best))


def test_bce_aux_loss_matches_numpy():
  logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
  targets = jnp.array([[1, 0, 0, 1]], bool)
  valid = jnp.array([[1, 1, 1, 0]], bool)
  p = 1 / (1 + np.exp(-np.asarray(logits[0, :3], np.float64)))
  t = np.array([1, 0, 0])
  want = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
  np.testing.assert_allclose(D.bce_aux_loss(logits, targets, valid), want, rtol=1e-6)
  np.testing.assert_array_equal(D.causal_decision(logits, valid), [[1, 0, 1, 0]])


def test_token_choice_route_and_bias():
  logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
  depth_index, weight, probs = D.token_choice_route(logits)
  np.testing.assert_array_equal(depth_index, [[0, 2]])
  np.testing.assert_allclose(weight, [[probs[0, 0, 0], probs[0, 1, 2]]])
  biased, weight_b, _ = D.token_choice_route(logits, bias=jnp.array([0.0, 1.0, 0.0]))
  np.testing.assert_array_equal(biased, [[1, 1]])
  np.testing.assert_allclose(weight_b, [[probs[0, 0, 1], probs[0, 1, 1]]])  # the bias only picks, never weights
  sig_index, sig_weight, _ = D.token_choice_route(logits, "sigmoid")
  np.testing.assert_array_equal(sig_index, [[0, 2]])
  np.testing.assert_allclose(sig_weight, jax.nn.sigmoid(jnp.array([[2.0, 1.0]])))
  with pytest.raises(ValueError, match="softmax"):
    D.token_choice_route(logits, "relu")


def test_depth_histogram():
  depth = jnp.array([[1, 3, 2, 3], [0, 1, 1, 3]])
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  hist, reached = D.depth_histogram(depth, 3, mask)
  np.testing.assert_allclose(hist, np.array([1, 3, 1, 2]) / 7)
  np.testing.assert_allclose(reached, np.array([6, 3, 2]) / 7)


def test_plot_depth_per_token(tmp_path):
  path = tmp_path / "depth.png"
  D.plot_depth_per_token(list("hello world"), np.arange(11) % 4, 3, str(path))
  assert path.read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="depths"):
    D.plot_depth_per_token(list("ab"), [1], 3, str(path))
