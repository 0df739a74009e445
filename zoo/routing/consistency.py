"""Local routing consistency of a routed model: SRP and SCH (papers.md A8).

"Not All Models Suit Expert Offloading: On Local Routing Consistency of Mixture-of-Expert Models" (2025; the
authors' code ljcleo/moe-lrc, src/30_srp_calc.py and src/41_sch_calc.py). Both metrics read only routing decisions,
expert ids [tokens, k] per layer, so they apply to every routed model in the zoo (a model that routes tokens to experts
sows them as `intermediates['expert_ids']` [layers, batch, length, k] in `apply(..., mutable=['intermediates'])`).

- Segment Routing Best Performance, SRP(L): how well "expert e is active for the whole window" predicts the routing
  of every sliding window of L tokens. With `A[t, e] = 1` iff e is among token t's experts and `c_{w,e}` the uses of e
  in window w, a threshold tau predicts e for all L tokens of w iff `c_{w,e} >= tau`:
  `predictions = L * #{(w, e): c >= tau}`, `matches = sum_{c >= tau} c`, `actuals = sum c`,
  `F1(tau) = 2 matches / (predictions + actuals)`, and `SRP = max_{tau in 0..L} F1(tau)`. The (window, expert)
  counts are pooled over all sequences of the batch and all experts of the layer before the maximum (the
  layer-level statistic of the authors' code).
- Segment Cache Best Hit rate, SCH(L, C): hits / accesses of an expert cache of C slots that loads an expert on a
  miss and evicts the cached expert with the fewest uses in the next L tokens (ties: the least recently used;
  then the lowest expert id [guess]). Each sequence starts with an empty cache, so a first use is a miss
  [guess: the authors' stack simulation counts a first use as a hit when fewer than C experts have been seen]; the
  experts of the current token are never evicted for each other. Hits and accesses are summed over the sequences.

These are evaluation metrics computed on the host with numpy (the cache simulation is sequential).
"""

import numpy as np

DEFAULT_SEGMENT_LENGTHS = (4, 16, 64, 256)


def _as_sequences(expert_ids):
  """expert_ids [tokens, k] or [batch, tokens, k] -> int64 [batch, tokens, k]."""
  ids = np.asarray(expert_ids)
  if ids.ndim == 2:
    ids = ids[None]
  if ids.ndim != 3:
    raise ValueError(f"expert_ids must be [tokens, k] or [batch, tokens, k], got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"expert_ids must be integers (expert index, -1 = empty slot), got dtype {ids.dtype}")
  return ids.astype(np.int64)


def _activation(ids, num_experts):
  """[batch, tokens, k] ids -> [batch, tokens, E] 0/1 activation matrix A (empty slots -1 ignored)."""
  if ids.size and (ids.max() >= num_experts or ids.min() < -1):
    raise ValueError(
      f"expert ids must lie in -1..{num_experts - 1} (num_experts={num_experts}), got values in "
      f"{ids.min()}..{ids.max()}"
    )
  active = np.zeros(ids.shape[:2] + (num_experts + 1,), np.int64)
  b, t = np.meshgrid(np.arange(ids.shape[0]), np.arange(ids.shape[1]), indexing="ij")
  for slot in range(ids.shape[2]):
    active[b, t, ids[..., slot]] = 1  # slot -1 writes the spare last column
  return active[..., :num_experts]


def _check_length(segment_length, tokens):
  if not isinstance(segment_length, (int, np.integer)) or not 1 <= segment_length <= tokens:
    raise ValueError(f"segment_length={segment_length!r} is invalid; allowed 1..{tokens} (the sequence length)")


def window_count_histogram(expert_ids, num_experts, segment_length):
  """Histogram of per-window expert use counts over every sliding window of `segment_length` tokens.

  Args:
    expert_ids: [tokens, k] or [batch, tokens, k] int expert ids (-1 = empty slot).
    num_experts: E.
    segment_length: L, the window length (1..tokens).

  Returns:
    int64 [L + 1]: entry c = number of (sequence, window, expert) triples where the expert is used c times.
  """
  ids = _as_sequences(expert_ids)
  _check_length(segment_length, ids.shape[1])
  active = _activation(ids, num_experts)
  csum = np.concatenate([np.zeros_like(active[:, :1]), np.cumsum(active, axis=1)], axis=1)
  counts = csum[:, segment_length:] - csum[:, :-segment_length]  # [batch, windows, E]
  return np.bincount(counts.reshape(-1), minlength=segment_length + 1)


def segment_routing_best_performance(expert_ids, num_experts, segment_length):
  """SRP(L) of one layer (see the module docstring).

  Args:
    expert_ids: [tokens, k] or [batch, tokens, k] int expert ids (-1 = empty slot).
    num_experts: E.
    segment_length: L (1..tokens).

  Returns:
    float in [0, 1]: the best F1 over thresholds 0..L (0 when no expert is ever used).
  """
  hist = window_count_histogram(expert_ids, num_experts, segment_length)
  c = np.arange(segment_length + 1)
  matches = np.cumsum((hist * c)[::-1])[::-1]  # matches[tau] = sum_{c >= tau} c * hist[c]
  predictions = segment_length * np.cumsum(hist[::-1])[::-1]
  actuals = matches[0]
  f1 = 2.0 * matches / np.maximum(predictions + actuals, 1)
  return float(np.max(f1))


def _future_uses(active, horizon):
  """[tokens, E] uses of each expert in the `horizon` tokens after each token (t+1..t+horizon)."""
  csum = np.concatenate([np.zeros_like(active[:1]), np.cumsum(active, axis=0)], axis=0)  # csum[t] = uses in 0..t-1
  t = np.arange(active.shape[0])
  return csum[np.minimum(t + 1 + horizon, active.shape[0])] - csum[t + 1]


def _cache_hits(ids, num_experts, segment_length, cache_size):
  """(hits, accesses) of the lookahead expert cache on one sequence ids [tokens, k]."""
  future = _future_uses(_activation(ids[None], num_experts)[0], segment_length)
  last_use = np.full(num_experts, -1)
  cache, hits, accesses = set(), 0, 0
  for t, row in enumerate(ids):
    experts = sorted({int(e) for e in row if e >= 0})
    accesses += len(experts)
    hits += sum(e in cache for e in experts)
    for e in experts:
      if e in cache:
        continue
      if len(cache) >= cache_size:
        victims = cache.difference(experts)
        cache.remove(min(victims, key=lambda v: (future[t, v], last_use[v], v)))
      cache.add(e)
    last_use[experts] = t
  return hits, accesses


def segment_cache_best_hit_rate(expert_ids, num_experts, segment_length, cache_size):
  """SCH(L, C) of one layer (see the module docstring).

  Args:
    expert_ids: [tokens, k] or [batch, tokens, k] int expert ids (-1 = empty slot).
    num_experts: E.
    segment_length: L, the lookahead of the eviction priority (1..tokens).
    cache_size: C cached experts; at least k (a token's own experts must fit) and at most E.

  Returns:
    float in [0, 1]: hits / accesses summed over sequences (0 when nothing is accessed).
  """
  ids = _as_sequences(expert_ids)
  _check_length(segment_length, ids.shape[1])
  if not ids.shape[2] <= cache_size <= num_experts:
    raise ValueError(f"cache_size={cache_size} is invalid; allowed k={ids.shape[2]}..num_experts={num_experts}")
  hits = accesses = 0
  for seq in ids:
    h, a = _cache_hits(seq, num_experts, segment_length, cache_size)
    hits, accesses = hits + h, accesses + a
  return hits / max(accesses, 1)


def routing_consistency(expert_ids, num_experts, *, segment_lengths=DEFAULT_SEGMENT_LENGTHS, cache_sizes=None):
  """SRP and SCH of every layer of a routed model, for every segment length that fits the sequences.

  Args:
    expert_ids: [layers, batch, length, k] int expert ids (e.g. a model's sown `intermediates['expert_ids']`).
    num_experts: E (the same in every layer).
    segment_lengths: candidate L values; those longer than `length` are dropped.
    cache_sizes: C values for SCH; default (k, 2k) clipped to E (papers.md A8: about twice the active experts
      suffices).

  Returns:
    dict of numpy arrays: 'segment_lengths' [n_L] (the L values used), 'cache_sizes' [n_C], 'srp' [layers, n_L],
    'sch' [layers, n_L, n_C].
  """
  ids = np.asarray(expert_ids)
  if ids.ndim != 4:
    raise ValueError(f"expert_ids must be [layers, batch, length, k], got shape {ids.shape}")
  length, k = ids.shape[2], ids.shape[3]
  lengths = [int(l) for l in segment_lengths if l <= length]
  if not lengths:
    raise ValueError(f"no segment length in {tuple(segment_lengths)} fits sequences of length {length}")
  if cache_sizes is None:
    cache_sizes = sorted({min(k, num_experts), min(2 * k, num_experts)})
  srp = np.array([[segment_routing_best_performance(layer, num_experts, l) for l in lengths] for layer in ids])
  sch = np.array(
    [[[segment_cache_best_hit_rate(layer, num_experts, l, c) for c in cache_sizes] for l in lengths] for layer in ids]
  )
  return {"segment_lengths": np.array(lengths), "cache_sizes": np.array(cache_sizes), "srp": srp, "sch": sch}
