"""Local routing consistency (SRP, SCH) on sequences worked out by hand."""

import numpy as np
import pytest

from zoo.routing import consistency


def test_window_histogram_and_srp_by_hand():
  # Tokens route to experts 0, 0, 1, 0 (k=1, E=2). Windows of L=2: [0,0], [0,1], [1,0].
  # Uses per window: expert 0 -> 2, 1, 1; expert 1 -> 0, 1, 1. Histogram over c: c=0: 1, c=1: 4, c=2: 1.
  ids = np.array([[0], [0], [1], [0]])
  np.testing.assert_array_equal(consistency.window_count_histogram(ids, 2, 2), [1, 4, 1])
  # actuals = 6. tau=0: 2*6 / (2*6 + 6) = 2/3; tau=1: 2*6 / (2*5 + 6) = 3/4; tau=2: 2*2 / (2*1 + 6) = 1/2.
  assert consistency.segment_routing_best_performance(ids, 2, 2) == pytest.approx(0.75)


def test_srp_pools_sequences_and_ignores_empty_slots():
  # Sequence 2 adds windows [1,1] (expert 1 -> 2, expert 0 -> 0) twice; the -1 slots are not uses.
  ids = np.array([[[0, -1], [0, -1], [1, -1], [0, -1]], [[1, -1], [1, -1], [1, -1], [-1, -1]]])
  # Sequence 2 windows: [1,1], [1,1], [1,-]: expert 1 -> 2, 2, 1; expert 0 -> 0, 0, 0.
  # Pooled histogram: c=0: 1 + 3, c=1: 4 + 1, c=2: 1 + 2 -> [4, 5, 3]; actuals = 5 + 6 = 11.
  np.testing.assert_array_equal(consistency.window_count_histogram(ids, 2, 2), [4, 5, 3])
  # tau=1: 2*11 / (2*8 + 11) = 22/27; tau=2: 2*6 / (2*3 + 11) = 12/17; tau=0: 22 / (24 + 11).
  assert consistency.segment_routing_best_performance(ids, 2, 2) == pytest.approx(22 / 27)


def test_constant_routing_is_perfectly_consistent():
  ids = np.tile(np.array([[2, 5]]), (16, 1))
  for length in (1, 4, 16):
    assert consistency.segment_routing_best_performance(ids, 8, length) == pytest.approx(1.0)
  # Only the two first uses miss.
  assert consistency.segment_cache_best_hit_rate(ids, 8, 4, 2) == pytest.approx(30 / 32)


def test_cache_lookahead_by_hand():
  # E=3, k=1, C=2, tokens use experts 0, 1, 2, 2, 0.
  ids = np.array([[0], [1], [2], [2], [0]])
  # t=0 miss {0}; t=1 miss {0,1}; t=2 miss, evict among {0,1}:
  #   L=1: next token (t=3) uses neither -> tie, evict the least recent 0 -> {1,2}; t=3 hit; t=4 miss. 1/5.
  #   L=2: tokens 3..4 use 0 once and 1 never -> evict 1 -> {0,2}; t=3 hit; t=4 hit. 2/5.
  assert consistency.segment_cache_best_hit_rate(ids, 3, 1, 2) == pytest.approx(1 / 5)
  assert consistency.segment_cache_best_hit_rate(ids, 3, 2, 2) == pytest.approx(2 / 5)
  # A cache holding every expert misses only first uses: 3 misses of 5.
  assert consistency.segment_cache_best_hit_rate(ids, 3, 1, 3) == pytest.approx(2 / 5)


def test_cache_never_evicts_the_current_tokens_experts():
  # E=4, k=2, C=2: token 1 needs both slots for its own experts {2,3}, so both of token 0's are evicted.
  ids = np.array([[0, 1], [2, 3], [0, 1]])
  assert consistency.segment_cache_best_hit_rate(ids, 4, 2, 2) == 0.0
  # With C=4 the third token hits twice: 2 hits of 6 accesses.
  assert consistency.segment_cache_best_hit_rate(ids, 4, 2, 4) == pytest.approx(2 / 6)


def test_bigger_cache_never_hurts_on_random_routing():
  rng = np.random.default_rng(0)
  ids = np.stack([rng.choice(8, size=2, replace=False) for _ in range(64)])
  rates = [consistency.segment_cache_best_hit_rate(ids, 8, 8, c) for c in (2, 4, 6, 8)]
  assert rates == sorted(rates) and rates[-1] == pytest.approx(1 - 8 / 128)


def test_routing_consistency_over_layers_and_plot(tmp_path):
  rng = np.random.default_rng(1)
  random_layer = np.stack([rng.choice(4, size=(2,), replace=False) for _ in range(2 * 32)]).reshape(2, 32, 2)
  sticky_layer = np.broadcast_to(np.array([0, 1]), (2, 32, 2))
  result = consistency.routing_consistency(np.stack([random_layer, sticky_layer]), 4)
  np.testing.assert_array_equal(result["segment_lengths"], [4, 16])  # 64 and 256 do not fit length 32
  np.testing.assert_array_equal(result["cache_sizes"], [2, 4])
  assert result["srp"].shape == (2, 2) and result["sch"].shape == (2, 2, 2)
  assert np.all(result["srp"][1] == 1.0) and np.all(result["srp"][0] < 1.0)
  assert np.all(result["sch"][1] > result["sch"][0] - 1e-9)


def test_bad_inputs_raise():
  ids = np.array([[0], [1]])
  with pytest.raises(ValueError, match="segment_length=3"):
    consistency.segment_routing_best_performance(ids, 2, 3)
  with pytest.raises(ValueError, match="expert ids must lie in -1..1"):
    consistency.segment_routing_best_performance(np.array([[0], [2]]), 2, 1)
  with pytest.raises(ValueError, match="cache_size=1"):
    consistency.segment_cache_best_hit_rate(np.array([[0, 1]]), 2, 1, 1)
  with pytest.raises(ValueError, match=r"\[layers, batch, length, k\]"):
    consistency.routing_consistency(ids, 2)
  with pytest.raises(ValueError, match="integers"):
    consistency.segment_routing_best_performance(np.array([[0.5]]), 2, 1)
