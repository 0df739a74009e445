"""Local routing consistency (SRP, SCH) on routings worked out by hand, and against a direct reimplementation of the
authors' algorithm (ljcleo/moe-lrc src/30_srp_calc.py, src/31_srp_refine.py, src/41_sch_calc.py) on random ones."""

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


def test_whole_model_srp_pools_counts_over_layers():
  # E=2, k=1, L=2. Layer 0 routes 0, 0, 1, 0: histogram [1, 4, 1], SRP 3/4 (above).
  # Layer 1 routes 0, 0, 0, 0: expert 0 -> 2, 2, 2 and expert 1 -> 0, 0, 0: histogram [3, 0, 3], actuals 6;
  #   tau=1 or 2: 2*6 / (2*3 + 6) = 1. The mean of the layers is (3/4 + 1) / 2 = 7/8.
  # Pooled histogram [4, 4, 4], actuals 4 + 8 = 12: tau=0: 24 / (2*12 + 12) = 2/3; tau=1: 24 / (2*8 + 12) = 6/7;
  #   tau=2: 16 / (2*4 + 12) = 4/5. The whole-model SRP is 6/7, not 7/8.
  ids = np.array([[[0], [0], [1], [0]], [[0], [0], [0], [0]]])[:, None]  # [layers, batch, length, k]
  result = consistency.routing_consistency(ids, 2, segment_lengths=(2,))
  np.testing.assert_allclose(result["srp"][:, 0], [3 / 4, 1])
  assert result["model_srp"][0] == pytest.approx(6 / 7)


def test_constant_routing_is_perfectly_consistent():
  ids = np.tile(np.array([[2, 5]]), (16, 1))
  for length in (1, 4, 16):
    assert consistency.segment_routing_best_performance(ids, 8, length) == pytest.approx(1.0)
  # The two first uses find a cache with room, so they count as hits: 32 of 32.
  assert consistency.segment_cache_best_hit_rate(ids, 8, 4, 2) == 1.0
  # C=1: token 0's expert 2 is a first use with room (hit), 5 is not (miss). Each later token starts with {5}
  # (its last access): 5 hits, 2 misses. 1 + 15 hits of 32.
  assert consistency.segment_cache_best_hit_rate(ids, 8, 4, 1) == pytest.approx(16 / 32)


def test_first_use_is_a_hit_while_the_cache_has_room():
  # E=2, k=1, tokens 0, 1, 0, 1. C=2: both first uses find room, then both experts stay: 4 hits of 4.
  ids = np.array([[0], [1], [0], [1]])
  assert consistency.segment_cache_best_hit_rate(ids, 2, 1, 2) == 1.0
  # C=1: 0 is a hit (nothing seen yet), 1 a miss (one expert seen, the cache is full), then each token misses the
  # expert the one before it loaded: 1 hit of 4.
  assert consistency.segment_cache_best_hit_rate(ids, 2, 1, 1) == pytest.approx(1 / 4)
  # Room is counted slot by slot within a token: E=4, k=2, C=3, tokens [0, 1], [2, 3]. 0, 1, 2 find 0, 1, 2 experts
  # seen before them (< 3: hits), 3 finds 3 (miss): 3 hits of 4.
  assert consistency.segment_cache_best_hit_rate(np.array([[0, 1], [2, 3]]), 4, 2, 3) == pytest.approx(3 / 4)


def test_lookahead_sees_the_next_L_minus_1_tokens():
  # E=3, k=1, C=2, tokens 0, 1, 2, 2, 0. Tokens 0 and 1 are first uses with room (hits); token 2 misses (two experts
  # seen) and evicts one of {0, 1}:
  #   L=2: the priority counts uses in tokens 2..3, the next L-1 = 1 token: neither 0 nor 1 is used -> tie, evict
  #     the least recently used 0. Token 3 hits (2), token 4 misses (0): 3 hits of 5.
  #   L=3: tokens 2..4 (the next 2): 0 is used once, 1 never -> evict 1. Tokens 3 and 4 hit: 4 hits of 5.
  #   L=1: no lookahead at all -> as L=2, 3 of 5.
  ids = np.array([[0], [1], [2], [2], [0]])
  assert consistency.segment_cache_best_hit_rate(ids, 3, 1, 2) == pytest.approx(3 / 5)
  assert consistency.segment_cache_best_hit_rate(ids, 3, 2, 2) == pytest.approx(3 / 5)
  assert consistency.segment_cache_best_hit_rate(ids, 3, 3, 2) == pytest.approx(4 / 5)
  # A cache holding every expert hits everything: the three first uses find room.
  assert consistency.segment_cache_best_hit_rate(ids, 3, 1, 3) == 1.0


def test_eviction_may_push_out_an_expert_the_current_token_used():
  # E=4, k=2, C=2, L=2 (priority: uses in the current and the next token; an access removes its own token's use).
  # Tokens [0, 1], [2, 3], [0, 3].
  #   Token 0: first uses with room, 2 hits. Cache {0, 1}.
  #   Token 1: 2 and 3 are first uses with a full cache (misses). Access 2: uses in tokens 1..2: 0 once (token 2),
  #     1 never -> evict 1, cache {0, 2}. Access 3: 2 has no use left (its token-1 use is spent, token 2 lacks it),
  #     0 has one -> evict 2, the expert this token has just accessed. Cache {0, 3}.
  #   Token 2: 0 and 3 hit. 4 hits of 6 (were the current token's experts protected, 0 would go and 3 of 6 hit).
  ids = np.array([[0, 1], [2, 3], [0, 3]])
  assert consistency.segment_cache_best_hit_rate(ids, 4, 2, 2) == pytest.approx(4 / 6)
  # C=4 holds every expert: 6 of 6.
  assert consistency.segment_cache_best_hit_rate(ids, 4, 2, 4) == 1.0


def test_whole_model_sch_is_one_cache_over_all_layers():
  # E=3, k=1, L=1, C=2 slots per layer. Layer 0 cycles 0, 1, 2, 0, 1, 2: tokens 0, 1 hit (room); every later token
  # evicts the least recently used expert (no lookahead), the one needed two tokens later: 2 hits of 6.
  # Layer 1 routes 0 throughout: 6 of 6. The mean of the layers is (1/3 + 1) / 2 = 2/3.
  # Whole model: one cache of 2 * 2 = 4 slots over the 6 experts, of which 4 are used: every first use finds room
  # and nothing is evicted: 12 hits of 12.
  ids = np.array([[[0], [1], [2], [0], [1], [2]], [[0]] * 6])[:, None]  # [layers, batch, length, k]
  result = consistency.routing_consistency(ids, 3, segment_lengths=(1,), cache_sizes=(2,))
  np.testing.assert_allclose(result["sch"][:, 0, 0], [1 / 3, 1])
  assert result["model_sch"][0, 0] == 1.0
  # The whole model's routing: layer l's ids offset by l * E, layers in order.
  np.testing.assert_array_equal(consistency.model_expert_ids(ids, 3)[0, :2], [[0, 3], [1, 3]])


def _reference_hits(seq, segment_length, cache_size):
  """(hits, accesses) of one sequence [tokens, k], simulating one cache of `cache_size` slots directly.

  The authors' rules, as a plain cache: a token's hits are read before its first access (an expert is a hit if it
  was cached when the token began; a first use is a hit if fewer than C experts were seen before it); then each of
  its experts, in slot order, is loaded if absent, evicting the cached expert with the fewest uses in the window of L
  tokens from the current one (an expert already accessed by this token no longer counts the current token), ties
  going against the least recently accessed.
  """
  rows = []
  for row in seq:
    experts = []
    for e in row:
      if e >= 0 and e not in experts:
        experts.append(int(e))
    rows.append(experts)
  cache, seen, last_access = set(), set(), {}
  clock = hits = accesses = 0
  for t, row in enumerate(rows):
    cached_at_start, seen_before = set(cache), len(seen)
    for e in row:
      accesses += 1
      if e in seen:
        hits += e in cached_at_start
      else:
        hits += seen_before < cache_size
        seen_before += 1
    for j, e in enumerate(row):
      if e not in cache:
        if len(cache) >= cache_size:

          def worth(v, t=t, j=j, row=row):
            uses = sum(v in rows[u] for u in range(t, min(t + segment_length, len(rows))))
            return (uses - (v in row[:j]), last_access[v])

          cache.remove(min(cache, key=worth))
        cache.add(e)
      seen.add(e)
      clock += 1
      last_access[e] = clock
  return hits, accesses


def _random_routing(rng, batch, tokens, num_experts, k, *, empty=0.0):
  """[batch, tokens, k] routing that repeats the previous token's experts 40% of the time, slots -1 with `empty`."""
  seqs = []
  for _ in range(batch):
    prev, rows = rng.choice(num_experts, k, replace=False), []
    for _ in range(tokens):
      prev = prev if rng.random() < 0.4 else rng.choice(num_experts, k, replace=False)
      rows.append(np.where(rng.random(k) < empty, -1, prev))
    seqs.append(rows)
  return np.array(seqs)


def test_sch_matches_a_direct_cache_simulation_on_random_routing():
  rng = np.random.default_rng(0)
  for trial in range(40):
    num_experts = int(rng.integers(2, 9))
    k = int(rng.integers(1, min(num_experts, 3) + 1))
    tokens = int(rng.integers(1, 25))
    ids = _random_routing(rng, 2, tokens, num_experts, k, empty=0.2 if trial % 4 == 0 else 0.0)
    length = int(rng.integers(1, tokens + 1))
    for cache_size in range(1, num_experts + 1):
      counts = [_reference_hits(seq, length, cache_size) for seq in ids]
      expected = sum(h for h, _ in counts) / max(sum(a for _, a in counts), 1)
      got = consistency.segment_cache_best_hit_rate(ids, num_experts, length, cache_size)
      assert got == pytest.approx(expected), (trial, ids.tolist(), length, cache_size)


def _reference_srp(layers, num_experts, length):
  """Best F1 over thresholds of 'expert e active in all L tokens of a window', counts pooled over `layers`."""
  best = 0.0
  for tau in range(length + 1):
    matches = predictions = actuals = 0
    for seq in (s for layer in layers for s in layer):
      for start in range(len(seq) - length + 1):
        window = seq[start : start + length]
        for e in range(num_experts):
          uses = sum(e in row for row in window)
          actuals += uses
          if uses >= tau:
            predictions += length
            matches += uses
    best = max(best, 2 * matches / max(predictions + actuals, 1))
  return best


def test_srp_matches_a_direct_count_on_random_routing():
  rng = np.random.default_rng(1)
  ids = np.stack([_random_routing(rng, 2, 12, 6, 2) for _ in range(3)])  # [layers, batch, length, k]
  result = consistency.routing_consistency(ids, 6, segment_lengths=(1, 3, 4))
  for j, length in enumerate((1, 3, 4)):
    assert result["model_srp"][j] == pytest.approx(_reference_srp(ids, 6, length))
    for layer in range(3):
      assert result["srp"][layer, j] == pytest.approx(_reference_srp(ids[layer : layer + 1], 6, length))


def test_whole_model_sch_matches_a_direct_cache_simulation_on_random_routing():
  rng = np.random.default_rng(2)
  ids = np.stack([_random_routing(rng, 2, 16, 4, 2) for _ in range(3)])  # [layers, batch, length, k]
  result = consistency.routing_consistency(ids, 4, segment_lengths=(1, 4, 16), cache_sizes=(1, 2, 3))
  whole = consistency.model_expert_ids(ids, 4)
  for j, length in enumerate((1, 4, 16)):
    for c, size in enumerate((1, 2, 3)):
      counts = [_reference_hits(seq, length, 3 * size) for seq in whole]
      assert result["model_sch"][j, c] == pytest.approx(sum(h for h, _ in counts) / sum(a for _, a in counts))


def test_bigger_cache_never_hurts_on_random_routing():
  rng = np.random.default_rng(0)
  ids = np.stack([rng.choice(8, size=2, replace=False) for _ in range(64)])
  rates = [consistency.segment_cache_best_hit_rate(ids, 8, 8, c) for c in (1, 2, 4, 6, 8)]
  assert rates == sorted(rates) and rates[-1] == 1.0  # a cache of all 8 experts: every first use finds room


def test_routing_consistency_over_layers_and_plot(tmp_path):
  rng = np.random.default_rng(1)
  random_layer = np.stack([rng.choice(4, size=(2,), replace=False) for _ in range(2 * 32)]).reshape(2, 32, 2)
  sticky_layer = np.broadcast_to(np.array([0, 1]), (2, 32, 2))
  result = consistency.routing_consistency(np.stack([random_layer, sticky_layer]), 4)
  np.testing.assert_array_equal(result["segment_lengths"], [4, 16])  # 64 and 256 do not fit length 32
  np.testing.assert_array_equal(result["cache_sizes"], [2, 4])
  assert result["srp"].shape == (2, 2) and result["sch"].shape == (2, 2, 2)
  assert result["model_srp"].shape == (2,) and result["model_sch"].shape == (2, 2)
  assert np.all(result["srp"][1] == 1.0) and np.all(result["srp"][0] < 1.0)
  assert np.all(result["sch"][1] > result["sch"][0] - 1e-9)
  assert np.all(result["srp"][0] < result["model_srp"]) and np.all(result["model_srp"] < 1.0)


def test_bad_inputs_raise():
  ids = np.array([[0], [1]])
  with pytest.raises(ValueError, match="segment_length=3"):
    consistency.segment_routing_best_performance(ids, 2, 3)
  with pytest.raises(ValueError, match="expert ids must lie in -1..1"):
    consistency.segment_routing_best_performance(np.array([[0], [2]]), 2, 1)
  with pytest.raises(ValueError, match="expert ids must lie in -1..1"):
    consistency.segment_cache_best_hit_rate(np.array([[0], [2]]), 2, 1, 1)
  with pytest.raises(ValueError, match="cache_size=3"):
    consistency.segment_cache_best_hit_rate(np.array([[0, 1]]), 2, 1, 3)
  with pytest.raises(ValueError, match="cache_size=0"):
    consistency.routing_consistency(ids[None, None], 2, segment_lengths=(1,), cache_sizes=(0,))
  with pytest.raises(ValueError, match=r"\[layers, batch, length, k\]"):
    consistency.routing_consistency(ids, 2)
  with pytest.raises(ValueError, match="integers"):
    consistency.segment_routing_best_performance(np.array([[0.5]]), 2, 1)
