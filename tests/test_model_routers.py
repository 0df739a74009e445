"""Routers between whole models (`zoo.routing.model_routers`) on hand-written quality / cost / confidence matrices."""

import numpy as np
import pytest

from zoo.models import ConfigError
from zoo.routing import model_routers as mr

COST = np.array([1.0, 2.0, 4.0])  # three members, cheapest first


def data(
  quality, *, features=None, confidence=None, category=None, categories=("all",), feature_cost=0.0, complexity=None
):
  quality = np.asarray(quality, np.float64)
  q, m = quality.shape
  return mr.RoutingData(
    quality=quality,
    cost=np.broadcast_to(COST[:m], (q, m)).copy(),
    features=np.zeros((q, 1)) if features is None else np.asarray(features, np.float64),
    feature_cost=np.full(q, feature_cost),
    confidence=np.zeros((q, m)) if confidence is None else np.asarray(confidence, np.float64),
    category=np.zeros(q, np.int32) if category is None else np.asarray(category, np.int32),
    members=("s", "m", "l")[:m],
    categories=categories,
    complexity=None if complexity is None else np.asarray(complexity, np.float64),
  )


def test_oracle_picks_the_cheapest_best_member_and_zero_willingness_the_cheapest():
  d = data([[0.5, 0.7, 0.7], [0.9, 0.9, 0.2], [0.1, 0.2, 0.3]])
  oracle = mr.make_router("oracle").fit(d)
  assert oracle.route(d, np.inf).choice.tolist() == [1, 0, 2]
  assert oracle.route(d, 0.0).choice.tolist() == [0, 0, 0]
  # w = 4, utility 4 q - cost / 4: query 0: 1.75, 2.3, 1.8 -> 1; query 1: 3.35, 3.1, -0.2 -> 0; query 2: 0.15, 0.3, 0.2.
  assert oracle.route(d, 4.0).choice.tolist() == [1, 0, 1]
  decision = oracle.route(d, np.inf)
  assert decision.cost(d).tolist() == [2.0, 1.0, 4.0] and decision.quality(d).tolist() == [0.7, 0.9, 0.3]


def test_knn_returns_the_neighbours_mean_quality_and_best_member():
  features = [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]
  train = data([[0.1, 0.2, 0.9], [0.3, 0.2, 0.7], [0.8, 0.1, 0.1], [0.6, 0.3, 0.2]], features=features)
  knn = mr.make_router("knn", k=2).fit(train)
  queries = data(np.zeros((2, 3)), features=[[0.95, 0.02], [0.05, 0.95]], feature_cost=0.5)
  np.testing.assert_allclose(knn.predict(queries.features), [[0.2, 0.2, 0.8], [0.7, 0.2, 0.15]])
  decision = knn.route(queries, np.inf)
  assert decision.choice.tolist() == [2, 0] and decision.cost(queries).tolist() == [4.5, 1.5]  # + feature cost
  with pytest.raises(ConfigError, match="k=9 must lie in"):
    mr.make_router("knn", k=9).fit(train)


def test_cascade_escalates_exactly_below_the_threshold_and_sums_the_costs():
  confidence = [[0.9, 0.1, 0.1], [0.2, 0.5, 0.0], [0.1, 0.1, 0.1], [0.49, 0.51, 1.0]]
  d = data(np.zeros((4, 3)), confidence=confidence, feature_cost=10.0)
  cascade = mr.make_router("cascade").fit(d)
  decision = cascade.route(d, 0.5)
  assert decision.choice.tolist() == [0, 1, 2, 1]  # 0.5 >= 0.5 stops; 0.49 < 0.5 escalates
  assert decision.ran.tolist() == [
    [True, False, False],
    [True, True, False],
    [True, True, True],
    [True, True, False],
  ]
  assert decision.cost(d).tolist() == [1.0, 3.0, 7.0, 3.0]  # every member run, no feature cost
  assert cascade.route(d, 0.0).choice.tolist() == [0, 0, 0, 0]
  assert cascade.route(d, cascade.knobs()[-1]).choice.tolist() == [2, 2, 2, 2]
  assert cascade.timing == "after" and mr.make_router("knn").timing == "before"


class _Fixed(mr.ModelRouter):
  """Knob k sends every query to member k."""

  def knobs(self):
    return np.array([0.0, 1.0, 2.0])

  def route(self, d, knob):
    choice = np.full(len(d), int(knob))
    return mr.Decision(choice, mr.one_member(choice, len(d.members)), uses_features=False)


def test_choose_threshold_is_the_best_feasible_knob():
  d = data([[0.2, 0.5, 0.9], [0.2, 0.5, 0.9]])
  router = _Fixed()
  assert mr.choose_threshold(router, d, 2.5) == 1.0  # member 1: cost 2 <= 2.5; member 2 (cost 4) is over
  assert mr.choose_threshold(router, d, 4.0) == 2.0
  assert mr.choose_threshold(router, d, 1.0) == 0.0
  with pytest.raises(ConfigError, match="budget 0.5 is below the cheapest mean cost 1 .* allowed: budget >= 1"):
    mr.choose_threshold(router, d, 0.5)
  # Equal quality: the cheaper knob wins.
  assert mr.choose_threshold(router, data([[0.5, 0.5, 0.4]]), 10.0) == 0.0


def test_choose_threshold_on_the_oracle_meets_the_budget_and_no_feasible_knob_is_better():
  rng = np.random.default_rng(0)
  d = data(rng.random((40, 3)) + np.array([0.0, 0.2, 0.4]))
  oracle = mr.make_router("oracle")
  curve = oracle.curve(d)
  for budget in (1.5, 2.0, 3.0):
    knob = mr.choose_threshold(oracle, d, budget)
    decision = oracle.route(d, knob)
    assert decision.cost(d).mean() <= budget
    feasible = curve[curve[:, 1] <= budget]
    assert decision.quality(d).mean() == pytest.approx(feasible[:, 2].max())


def test_random_router_mixes_the_cheapest_and_the_strongest():
  d = data(np.tile([0.1, 0.9, 0.5], (2000, 1)))  # the strongest is member 1
  router = mr.make_router("random").fit(d, seed=3)
  assert set(router.route(d, 0.0).choice) == {0} and set(router.route(d, 1.0).choice) == {1}
  share = np.mean(router.route(d, 0.3).choice == 1)
  assert 0.25 < share < 0.35


def _two_groups(n=40):
  x = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
  quality = np.where(x > 0, [0.2, 0.9], [0.6, 0.3])  # member 1 wins on x > 0, member 0 on x < 0
  return x, quality


def test_mlp_and_preference_learn_which_member_wins():
  x, quality = _two_groups()
  train = data(quality, features=x, category=(x[:, 0] > 0).astype(int), categories=("neg", "pos"))
  queries = data(np.zeros((2, 2)), features=[[1.0], [-1.0]])
  mlp = mr.make_router("mlp").fit(train)
  np.testing.assert_allclose(mlp.predict(queries.features), [[0.2, 0.9], [0.6, 0.3]], atol=0.1)
  preference = mr.make_router("preference").fit(train)
  assert preference.route(queries, np.inf).choice.tolist() == [1, 0]
  assert mr.win_pairs(np.array([[0.5, 0.5, 0.7]]))[2].tolist() == [[False, True, True]]  # ties left out
  with pytest.raises(ConfigError, match="same quality on every training query"):
    mr.make_router("preference").fit(data(np.full((4, 2), 0.5)))


def test_composition_routes_categories_through_its_table_and_unsure_prompts_to_the_general_member():
  x, quality = _two_groups()
  train = data(quality, features=x, category=(x[:, 0] > 0).astype(int), categories=("neg", "pos"))
  queries = data(np.zeros((2, 2)), features=[[1.0], [-1.0]])
  coe = mr.make_router("composition").fit(train)
  assert np.argmax(coe.category_probs(queries.features), axis=1).tolist() == [1, 0]
  assert coe.route(queries, np.inf).choice.tolist() == [1, 0]
  # Nobody is sure enough: every query goes to the general member (best mean quality overall: member 1, 0.6 vs 0.4).
  unsure = mr.make_router("composition", min_confidence=1.01).fit(train)
  assert unsure.route(queries, np.inf).choice.tolist() == [1, 1]


def test_interface_errors():
  with pytest.raises(ConfigError, match="'bandit' is not a known model router; choose one of"):
    mr.make_router("bandit")
  with pytest.raises(ValueError, match="cost has shape"):
    mr.RoutingData(
      np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 1)), np.zeros(2), np.zeros((2, 3)), np.zeros(2), ("a", "b", "c")
    )
  routers = ("random", "oracle", "knn", "mlp", "preference", "cascade", "composition")
  assert {mr.MODEL_ROUTERS.get(n).family for n in routers} <= set(mr.FAMILIES)
