"""EllieSQL's label-based routers (`zoo.routing.model_routers`, `papers.md` C4) on hand-written and planted data."""

import numpy as np
import pytest

from test_model_routers import data
from zoo.models import ConfigError
from zoo.routing import model_routers as mr


def quality_for(labels, m=3):
  """A 0/1 quality matrix whose cheapest sufficient member is `labels`: every member from the label up is correct,
  except that label M-1 rows alternate between "only the last correct" and "nobody correct"."""
  labels = np.asarray(labels)
  quality = (np.arange(m)[None, :] >= labels[:, None]).astype(np.float64)
  nobody = (labels == m - 1) & (np.arange(len(labels)) % 2 == 1)
  quality[nobody] = 0.0
  return quality


def clusters(per_cluster=10, noise=0.05, seed=0):
  """Three 2-D clusters at the corners of a triangle around the origin; cluster c carries label c."""
  rng = np.random.default_rng(seed)
  angles = np.deg2rad([90.0, 210.0, 330.0])
  centers = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  labels = np.repeat(np.arange(3), per_cluster)
  features = centers[labels] + rng.normal(0.0, noise, (len(labels), 2))
  return features, labels, centers


def separable(n=150, seed=0):
  """2-D features uniform on [-1, 1]^2 with labels by x0 (cuts at -1/3 and 1/3), points within 0.05 of a cut
  dropped, so the labels are linearly separable with a margin."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1.0, 1.0, (3 * n, 2))
  keep = (np.abs(x[:, 0] + 1 / 3) > 0.05) & (np.abs(x[:, 0] - 1 / 3) > 0.05)
  x = x[keep][:n]
  labels = np.searchsorted([-1 / 3, 1 / 3], x[:, 0])
  return x, labels


def test_cheapest_sufficient_by_hand():
  quality = [
    [1, 1, 1],  # everybody correct -> the cheapest
    [0, 1, 1],  # -> 1
    [0, 0, 1],  # only the last correct -> 2
    [0, 0, 0],  # nobody correct -> the last
    [0.2, 0.7, 0.7],  # graded quality: the cheapest of the best
    [0.9, 0.3, 0.1],
    [1, 0, 1],  # the cheapest correct, even if the middle one fails
  ]
  assert mr.cheapest_sufficient(quality).tolist() == [0, 1, 2, 2, 1, 0, 0]
  assert mr.cheapest_sufficient(quality_for([0, 1, 2, 2])).tolist() == [0, 1, 2, 2]


def test_rule_with_given_cuts_counts_the_cuts_exceeded():
  d = data(np.zeros((7, 3)), complexity=[0, 1, 2, 2.5, 3, 4, 10])
  # EllieSQL's table rule: <= 2 tables -> basic, else the next; a second cut at 3.
  router = mr.make_router("rule", cuts=(2, 3)).fit(d)
  decision = router.route(d, 0.5)
  assert decision.choice.tolist() == [0, 0, 0, 1, 1, 2, 2]
  assert not decision.uses_features and router.timing == "before" and router.family == "baseline"
  # More cuts than members - 1: clipped to the last member.
  two = data(np.zeros((4, 2)), complexity=[0, 1.5, 2.5, 9])
  assert mr.make_router("rule", cuts=(1, 2, 3)).fit(two).route(two, 0.5).choice.tolist() == [0, 1, 1, 1]
  with pytest.raises(ConfigError, match="non-decreasing"):
    mr.make_router("rule", cuts=(3, 2))


def test_rule_learns_a_planted_rule_exactly():
  rng = np.random.default_rng(0)
  complexity = rng.integers(1, 7, 60).astype(np.float64)  # 1..6 tables
  labels = np.searchsorted([2, 4], complexity, side="left")  # <= 2 -> 0, 3-4 -> 1, >= 5 -> 2
  train = data(quality_for(labels), complexity=complexity)
  router = mr.make_router("rule").fit(train)
  assert router.learned_cuts.tolist() == [2.0, 4.0]  # the only candidates that separate 2|3 and 4|5
  assert router.route(train, 0.5).choice.tolist() == labels.tolist()
  new = data(np.zeros((4, 3)), complexity=[0.5, 2.5, 4.0, 100.0])
  assert router.route(new, 0.5).choice.tolist() == [0, 1, 1, 2]


def test_rule_ties_take_the_first_cuts_in_sorted_order():
  # Every label 0: all cut pairs with both cuts >= the largest value are perfect; the first is (3, 3).
  train = data(quality_for([0, 0, 0]), complexity=[1, 2, 3])
  assert mr.make_router("rule").fit(train).learned_cuts.tolist() == [3.0, 3.0]
  # Every label 2: no candidate lies below the smallest value 1, so the best cuts miss that query (accuracy 2/3);
  # (1, 1) is the first such pair.
  train = data(quality_for([2, 2, 2]), complexity=[1, 2, 3])
  assert mr.make_router("rule").fit(train).learned_cuts.tolist() == [1.0, 1.0]


def test_rule_needs_complexity():
  d = data(quality_for([0, 1, 2]))
  with pytest.raises(ConfigError, match="rule router needs RoutingData.complexity"):
    mr.make_router("rule").fit(d)
  with pytest.raises(ConfigError, match="rule router needs RoutingData.complexity"):
    mr.make_router("rule", cuts=(2,)).route(d, 0.5)


def test_label_knn_votes_the_clusters_label_and_ties_go_to_the_cheaper():
  features, labels, centers = clusters()
  train = data(quality_for(labels), features=features)
  router = mr.make_router("label_knn").fit(train)
  assert router.k == 5 and router.family == "similarity"
  queries = data(np.zeros((3, 3)), features=centers * 1.1, feature_cost=0.5)
  decision = router.route(queries, 0.5)
  assert decision.choice.tolist() == [0, 1, 2] and decision.uses_features
  assert decision.cost(queries).tolist() == [1.5, 2.5, 4.5]  # + the feature cost
  # Standardised, these are (1, 1), (1, -1), (-1, 1), (-1, -1): the query (1, 0) is equally close to the first two,
  # whose labels are 2 and 1 -> 1.
  tie = data(quality_for([2, 1, 0, 0]), features=[[1, 0.1], [1, -0.1], [-1, 0.1], [-1, -0.1]])
  knn2 = mr.make_router("label_knn", k=2).fit(tie)
  assert knn2.votes(np.array([[1.0, 0.0]])).tolist() == [[0, 1, 1]]
  assert knn2.route(data(np.zeros((1, 3)), features=[[1.0, 0.0]]), 0.5).choice.tolist() == [1]
  for k in (0, 5):
    with pytest.raises(ConfigError, match=f"label_knn: k={k} must lie in"):
      mr.make_router("label_knn", k=k).fit(tie)


@pytest.mark.parametrize("name", ["classifier", "pairwise"])
def test_classifier_and_pairwise_learn_separable_labels(name):
  x, labels = separable()
  train = data(quality_for(labels), features=x)
  router = mr.make_router(name).fit(train, seed=0)
  choice = router.route(train, 0.5).choice
  assert np.mean(choice == labels) >= 0.95
  assert set(choice.tolist()) == {0, 1, 2}
  # Fresh points deep inside each label's band go to that label.
  queries = data(np.zeros((3, 3)), features=[[-0.8, 0.3], [0.0, -0.5], [0.8, 0.1]])
  assert router.route(queries, 0.5).choice.tolist() == [0, 1, 2]


def test_pairwise_pairs_follow_ellie_sql_for_three_members():
  def as_set(pairs):
    return {(int(a), int(b)) for a, b in zip(*np.nonzero(pairs), strict=True)}

  three = mr.label_preference_pairs(3)
  assert as_set(three[0]) == {(0, 1), (0, 2)}
  assert as_set(three[1]) == {(1, 0), (1, 2), (2, 0)}
  assert as_set(three[2]) == {(2, 1), (2, 0)}
  four = mr.label_preference_pairs(4)  # label 1: 1 beats all; 2 and 3 beat 0
  assert as_set(four[1]) == {(1, 0), (1, 2), (1, 3), (2, 0), (3, 0)}


def test_binary_cascade_routes_each_cluster_to_its_label():
  features, labels, centers = clusters(per_cluster=20)
  train = data(quality_for(labels), features=features)
  router = mr.make_router("binary_cascade").fit(train, seed=0)
  assert router.knob_name == "threshold" and router.timing == "before"
  probs = router.probs(train.features)
  assert probs.shape == (60, 2)
  # Member 0 is sufficient only for cluster 0, member 1 for clusters 0 and 1.
  assert np.all((probs[:, 0] >= 0.5) == (labels == 0)) and np.all((probs[:, 1] >= 0.5) == (labels <= 1))
  assert router.route(train, 0.5).choice.tolist() == labels.tolist()
  queries = data(np.zeros((3, 3)), features=centers)
  assert router.route(queries, 0.5).choice.tolist() == [0, 1, 2]
  assert router.route(queries, 1.01).choice.tolist() == [2, 2, 2]  # nobody clears the threshold: the last member
  assert router.route(queries, 0.0).choice.tolist() == [0, 0, 0]


@pytest.mark.parametrize("name", ["rule", "label_knn", "classifier", "binary_cascade", "pairwise"])
def test_every_label_router_keeps_the_interface(name):
  features, labels, _ = clusters(per_cluster=6)
  train = data(quality_for(labels), features=features, complexity=labels + 1.0)
  options = {"steps": 20} if name in ("classifier", "binary_cascade", "pairwise") else {}
  router = mr.make_router(name, **options).fit(train)
  decision = router.route(train, router.knobs()[0])
  assert decision.ran.shape == (18, 3) and np.all(decision.ran.sum(axis=1) == 1)
  assert np.all(decision.ran[np.arange(18), decision.choice])
  assert decision.uses_features == (name != "rule")
  curve = router.curve(train)
  assert curve.shape == (1, 3) and curve[0, 0] == 0.5
  np.testing.assert_allclose(curve[0, 1:], [decision.cost(train).mean(), decision.quality(train).mean()])
  assert router.timing == "before" and router.family in mr.FAMILIES


def test_routing_data_complexity_is_checked_and_kept():
  with pytest.raises(ValueError, match="complexity has shape"):
    data(np.zeros((3, 2)), complexity=[1.0, 2.0])
  with pytest.raises(ValueError, match="complexity has shape"):
    data(np.zeros((3, 2)), complexity=np.zeros((3, 1)))
  d = data(np.zeros((4, 2)), complexity=[1.0, 2.0, 3.0, 4.0])
  assert d.subset(np.array([3, 1])).complexity.tolist() == [4.0, 2.0]
  assert d.subset(np.array([True, False, True, False])).complexity.tolist() == [1.0, 3.0]
  assert data(np.zeros((4, 2))).subset(np.array([0, 1])).complexity is None
  assert d.with_cost(np.ones((4, 2)), np.zeros(4)).complexity.tolist() == [1.0, 2.0, 3.0, 4.0]
