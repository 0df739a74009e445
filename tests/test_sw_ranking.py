"""RouteLLM's similarity-weighted ranking router (`sw_ranking`, `zoo.routing.model_routers.SwRankingRouter`) on
hand-made quality matrices and features."""

import numpy as np
import pytest

from zoo.models import ConfigError
from zoo.routing import model_routers as mr

COST = np.array([1.0, 2.0, 4.0])  # three members, cheapest first


def data(quality, features, *, feature_cost=0.0):
  quality = np.asarray(quality, np.float64)
  q, m = quality.shape
  return mr.RoutingData(
    quality=quality,
    cost=np.broadcast_to(COST[:m], (q, m)).copy(),
    features=np.asarray(features, np.float64),
    feature_cost=np.full(q, feature_cost),
    confidence=np.zeros((q, m)),
    category=np.zeros(q, np.int32),
    members=("s", "m", "l")[:m],
  )


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def test_equal_weights_give_the_closed_form_two_member_fit():
  # Member 1 wins 3 queries, member 0 wins 1, 2 ties: with ties as half wins xi_1 = log(4 / 2), without log(3 / 1).
  quality = [[0, 1], [0, 1], [0.2, 0.7], [1, 0], [0.5, 0.5], [0, 0]]
  features = np.random.default_rng(0).normal(size=(6, 3))
  train = data(quality, features)
  queries = np.random.default_rng(1).normal(size=(4, 3))
  for count_ties, want in ((True, np.log(2.0)), (False, np.log(3.0))):
    router = mr.make_router("sw_ranking", gamma=1.0, l2=1e-10, count_ties=count_ties).fit(train)
    xi = router.coefficients(queries)
    np.testing.assert_allclose(xi[:, 0], 0.0, atol=0)
    np.testing.assert_allclose(xi[:, 1], want, atol=1e-6)
    p = sigmoid(want)  # the strong member's win probability, RouteLLM's routing score
    np.testing.assert_allclose(router.predict(queries), np.tile([1 - p, p], (4, 1)), atol=1e-6)


def bt_by_mm(wins, iterations=5000):
  """Unweighted Bradley-Terry strengths by Hunter's (2004) MM iteration; wins[a, b] = times a beat b. Returns
  log-strengths with member 0 at 0."""
  games = wins + wins.T
  strength = np.ones(len(wins))
  for _ in range(iterations):
    denom = np.sum(games / (strength[:, None] + strength[None, :]), axis=1)
    strength = wins.sum(axis=1) / denom
    strength /= strength[0]
  return np.log(strength)


def test_equal_weights_match_an_independent_three_member_bradley_terry_fit():
  quality = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0.5, 1], [0.3, 0.2, 0.9], [1, 0.5, 0]]
  wins = np.zeros((3, 3))
  for row in quality:
    for a in range(3):
      for b in range(3):
        wins[a, b] += row[a] > row[b]
  train = data(quality, np.random.default_rng(2).normal(size=(8, 2)))
  router = mr.make_router("sw_ranking", gamma=1.0, l2=1e-10, count_ties=False).fit(train)
  xi = router.coefficients(np.random.default_rng(3).normal(size=(3, 2)))
  np.testing.assert_allclose(xi, np.tile(bt_by_mm(wins), (3, 1)), atol=1e-6)


def standardised_unit(x, train):
  z = (np.asarray(x, np.float64) - train.mean(axis=0)) / (train.std(axis=0) + 1e-6)
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_weights_follow_gamma_to_the_one_plus_normalised_similarity():
  # Two members, no ties: the weighted BT fit is xi_1 = log(weight of member 1's wins / weight of member 0's wins).
  train_x = np.array([[2.0, 0.5], [1.5, -1.0], [-1.0, 1.0], [-2.0, -0.5], [0.5, 2.0]])
  quality = np.array([[0, 1], [0, 1], [1, 0], [1, 0], [1, 0]])
  train = data(quality, train_x)
  query = np.array([[1.0, 0.2], [-0.5, 1.5]])
  sim = standardised_unit(query, train_x) @ standardised_unit(train_x, train_x).T  # [2, 5]
  w = 10.0 ** (1.0 + sim / sim.max(axis=1, keepdims=True))
  want = np.log(w[:, :2].sum(axis=1) / w[:, 2:].sum(axis=1))
  router = mr.make_router("sw_ranking", l2=1e-10, count_ties=False).fit(train)
  np.testing.assert_allclose(router.weights(query), w / w.sum(axis=1, keepdims=True), rtol=1e-5)
  np.testing.assert_allclose(router.coefficients(query)[:, 1], want, atol=1e-5)
  assert want[0] > 1.0 and want[1] < -1.0  # the weighting matters: unweighted it would be log(2 / 3)


def clusters():
  """Cluster A (x ~ +3): member 1 wins; cluster B (x ~ -3): member 0 wins; member 2 always scores 0."""
  rng = np.random.default_rng(4)
  a = np.stack([3 + 0.3 * rng.normal(size=20), 0.3 * rng.normal(size=20)], axis=1)
  b = np.stack([-3 + 0.3 * rng.normal(size=20), 0.3 * rng.normal(size=20)], axis=1)
  quality = np.concatenate([np.tile([0.0, 1.0, 0.0], (20, 1)), np.tile([1.0, 0.0, 0.0], (20, 1))])
  return data(quality, np.concatenate([a, b])), np.array([[2.8, 0.1], [-3.1, -0.2]])


def test_similarity_weighting_separates_the_clusters():
  train, queries = clusters()
  local = mr.make_router("sw_ranking").fit(train).predict(queries)
  assert local[0, 1] > local[0, 0] + 0.3 and local[0, 1] > local[0, 2]  # A: member 1
  assert local[1, 0] > local[1, 1] + 0.3 and local[1, 0] > local[1, 2]  # B: member 0
  flat = mr.make_router("sw_ranking", gamma=1.0).fit(train).predict(queries)
  np.testing.assert_allclose(flat[0], flat[1], atol=1e-12)  # equal weights: one global fit
  np.testing.assert_allclose(flat[0, 0], flat[0, 1], atol=1e-9)  # the clusters balance
  np.testing.assert_allclose(local.sum(axis=1), 1.5, atol=1e-9)  # mean win probabilities of 3 members sum to 3 / 2


def test_routing_by_willingness_to_pay():
  train, queries = clusters()
  q = data(np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), queries, feature_cost=0.25)
  router = mr.make_router("sw_ranking").fit(train)
  predicted = router.predict(q.features)
  best = router.route(q, np.inf)
  assert best.choice.tolist() == np.argmax(predicted, axis=1).tolist() == [1, 0]
  assert best.uses_features and best.cost(q).tolist() == [2.25, 1.25] and best.quality(q).tolist() == [1.0, 1.0]
  assert best.ran.tolist() == [[False, True, False], [True, False, False]]
  assert router.route(q, 0.0).choice.tolist() == [0, 0]
  for w in (0.5, 3.0, 30.0):
    assert router.route(q, w).choice.tolist() == mr.willingness_choice(predicted, q.cost, w).tolist()


def test_a_member_that_never_wins_stays_finite_through_the_l2_penalty():
  train, queries = clusters()
  xi = {
    l2: mr.make_router("sw_ranking", l2=l2, count_ties=False).fit(train).coefficients(queries) for l2 in (1e-2, 1e-4)
  }
  assert np.all(np.isfinite(xi[1e-4]))
  for l2 in xi:
    assert np.all(xi[l2][:, 2] < xi[l2][:, :2].min(axis=1))  # member 2 lowest
  assert np.all(xi[1e-4][:, 2] < xi[1e-2][:, 2] - 1.0)  # less shrinkage, further down


def test_registered_and_curve_runs():
  router = mr.make_router("sw_ranking")
  assert isinstance(router, mr.SwRankingRouter) and router.registry_name == "sw_ranking"
  assert router.family == "preference" in mr.FAMILIES and router.timing == "before" and router.gamma == 10.0
  train, queries = clusters()
  q = data(np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), queries)
  curve = router.fit(train).curve(q)
  assert curve.shape == (len(mr.WILLINGNESS), 3)
  np.testing.assert_array_equal(curve[:, 0], mr.WILLINGNESS)
  assert np.all(np.diff(curve[:, 1]) >= 0)  # a higher willingness to pay never picks a cheaper member
  assert curve[0, 1:].tolist() == [1.0, 0.5] and curve[-1, 1:].tolist() == [1.5, 1.0]


def test_bad_options():
  with pytest.raises(ConfigError, match="gamma=0.5 must be a finite number >= 1"):
    mr.make_router("sw_ranking", gamma=0.5)
  with pytest.raises(ConfigError, match="l2=0.0 must be a finite number > 0"):
    mr.make_router("sw_ranking", l2=0.0)
  with pytest.raises(ConfigError, match="steps=0 must be a positive integer"):
    mr.make_router("sw_ranking", steps=0)
  same = data(np.full((3, 2), 0.5), np.eye(3)[:, :2])
  with pytest.raises(ConfigError, match="count_ties=False; nothing to learn"):
    mr.make_router("sw_ranking", count_ties=False).fit(same)
  xi = mr.make_router("sw_ranking").fit(same).coefficients(np.eye(2))  # all ties, counted: equal strengths
  np.testing.assert_allclose(xi, 0.0, atol=1e-12)
