"""Expert caches (Belady vs LRU) and lookahead expert-aware batching (papers.md A4, Read-ME Sec. 4)."""

import numpy as np
import pytest

from zoo.routing.expert_cache import belady_hits, expert_aware_batches, hit_rate, lru_hits


def test_belady_beats_lru_on_a_hand_worked_sequence():
  # Capacity 2, accesses 0 1 2 0 1.
  # LRU:    0 miss [0]; 1 miss [0 1]; 2 miss, evict 0 (least recent) [1 2]; 0 miss, evict 1 [2 0];
  #         1 miss, evict 2 [0 1]  -> no hit.
  # Belady: 0 miss; 1 miss; 2 miss, next uses: 0 at t=3, 1 at t=4 -> evict 1 {0 2}; 0 hit;
  #         1 miss (0 and 2 are never used again: tie, evict the lower id 0)  -> one hit, at t=3.
  accesses = [0, 1, 2, 0, 1]
  np.testing.assert_array_equal(lru_hits(accesses, 2), [False] * 5)
  np.testing.assert_array_equal(belady_hits(accesses, 2), [False, False, False, True, False])
  assert hit_rate(belady_hits(accesses, 2)) == pytest.approx(0.2)


def test_lru_keeps_the_recent_expert():
  # Capacity 2, accesses 0 1 0 2 0 1: LRU hits at t=2 (0) and t=4 (0; 2 evicted 1, the least recent). Belady evicts
  # 1 at t=3 too (next use t=5 vs 0 at t=4), so both get 2 hits.
  accesses = [0, 1, 0, 2, 0, 1]
  expected = [False, False, True, False, True, False]
  np.testing.assert_array_equal(lru_hits(accesses, 2), expected)
  np.testing.assert_array_equal(belady_hits(accesses, 2), expected)


def test_belady_is_never_worse_than_lru_and_a_full_cache_only_misses_once_per_expert():
  rng = np.random.default_rng(0)
  for _ in range(20):
    accesses = rng.integers(0, 6, size=60)
    for capacity in (1, 2, 4):
      assert belady_hits(accesses, capacity).sum() >= lru_hits(accesses, capacity).sum()
    distinct = len(set(accesses.tolist()))
    assert (~lru_hits(accesses, 6)).sum() == distinct == (~belady_hits(accesses, 6)).sum()


def test_expert_aware_batches_by_hand():
  ids = [0, 1, 0, 2, 1, 0]
  # Whole queue: 0 has 3 tokens -> [0, 2] (batch size 2); then 1 has 2 -> [1, 4]; then 2 and 0 tie with one token
  # each, 2 is the older -> [3]; then 0 -> [5].
  assert expert_aware_batches(ids, 2) == [(0, [0, 2]), (1, [1, 4]), (2, [3]), (0, [5])]
  # Lookahead 3: window [0 1 2] -> expert 0 (2 tokens) [0, 2]; window [1 3 4] -> expert 1 [1, 4]; then [3], [5].
  assert expert_aware_batches(ids, 4, lookahead=3) == [(0, [0, 2]), (1, [1, 4]), (2, [3]), (0, [5])]
  # Lookahead 1 is arrival order.
  assert [b for _, b in expert_aware_batches(ids, 4, lookahead=1)] == [[i] for i in range(6)]


def test_bad_input_raises():
  with pytest.raises(ValueError, match="capacity"):
    lru_hits([0, 1], 0)
  with pytest.raises(ValueError, match="integer expert ids"):
    belady_hits([0.5, 1.0], 2)
  with pytest.raises(ValueError, match="max_batch_size"):
    expert_aware_batches([0, 1], 0)
  with pytest.raises(ValueError, match="lookahead"):
    expert_aware_batches([0, 1], 2, lookahead=0)
