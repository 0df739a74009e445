"""Local routing consistency of a routed model: SRP and SCH (papers.md A8).

"Not All Models Suit Expert Offloading: On Local Routing Consistency of Mixture-of-Expert Models" (Liang et al. 2025,
arXiv 2505.16056: its two metrics, SRP and SCH); the figures follow the authors' code, ljcleo/moe-lrc:
src/30_srp_calc.py and src/31_srp_refine.py (SRP), src/41_sch_calc.py (`calc_fsf`, SCH) and src/42_sch_refine.py
(cache sizes). Both metrics read only routing decisions, expert ids [tokens, k] per layer, so they apply to every
routed model in the zoo (a model that routes tokens to experts sows them as `intermediates['expert_ids']` [layers,
batch, length, k] in `apply(..., mutable=['intermediates'])`).

- Segment Routing Best Performance, SRP(L): how well "expert e is active for the whole window" predicts the routing
  of every sliding window of L tokens. With `A[t, e] = 1` iff e is among token t's experts and `c_{w,e}` the uses of e
  in window w, a threshold tau predicts e for all L tokens of w iff `c_{w,e} >= tau`:
  `predictions = L * #{(w, e): c >= tau}`, `matches = sum_{c >= tau} c`, `actuals = sum c`,
  `F1(tau) = 2 matches / (predictions + actuals)`, and `SRP = max_{tau in 0..L} F1(tau)` (30_srp_calc.py
  `calc_stat`, 31_srp_refine.py `best_f1`). The (window, expert) counts are pooled over all sequences and all experts
  of a layer before the maximum; the whole-model SRP pools them over the layers too (31_srp_refine.py sums the
  counts of every layer into its model-level table 'mg' and takes one maximum), which is not the mean of the
  per-layer values.
- Segment Cache Best Hit rate, SCH(L, C): the hit rate of an expert cache of C slots whose eviction keeps the experts
  with the most uses in the next L - 1 tokens (ties: the most recently used), computed for every C at once by a
  priority stack (Mattson et al. 1970; 41_sch_calc.py `calc_fsf`, whose linked lists implement the same stack):
  - priority of expert e = (uses of e in the window of L tokens that starts at the current token, time of e's last
    access); an access takes its own token out of the window of its expert, so an expert the current token has
    already accessed counts only the next L - 1 tokens, while one it accesses later in its slot order still counts
    the current token as a use;
  - an access to x moves x to the top of the stack; the old top is carried down, and at each position above x's old
    one the lower-priority expert of (carried, resident) is carried on, the carried one at the end taking x's old
    position (or the bottom, for a first use). The top C experts are the content of a cache of C slots that, on a
    miss, evicts its lowest-priority expert, which may be one the current token has just accessed;
  - the stack depth of each access is read before the token's first access: a token's access is a hit for cache
    size C iff its expert was among the top C at the start of the token, and a first use (the expert not yet in the
    stack) is a hit iff fewer than C distinct experts have been accessed before it (the cache still has room).
  A token's experts are accessed in their slot order (the authors': descending router score, as top-k returns them);
  empty slots (-1) and repeats of an expert within a token are skipped. Hits and accesses are summed over sequences
  (the authors average per-sequence rates of equal-length sequences, the same figure). The whole-model SCH is one
  cache over the experts of all layers (each layer's ids offset by layer * E, a token accessing its layers' experts in
  layer order) with C slots per layer, C * layers in all (41_sch_calc.py concatenates the layers' top-k before
  `calc_fsf`, and 42_sch_refine.py gives its cache size per active expert).

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


def _check_ids(ids, num_experts):
  if ids.size and (ids.max() >= num_experts or ids.min() < -1):
    raise ValueError(
      f"expert ids must lie in -1..{num_experts - 1} (num_experts={num_experts}), got values in "
      f"{ids.min()}..{ids.max()}"
    )


def _activation(ids, num_experts):
  """[batch, tokens, k] ids -> [batch, tokens, E] 0/1 activation matrix A (empty slots -1 ignored)."""
  _check_ids(ids, num_experts)
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


def srp_from_histogram(histogram):
  """SRP of a (pooled) window count histogram: the best F1 over thresholds 0..L (0 when nothing is used).

  Args:
    histogram: int [L + 1] of `window_count_histogram`, or the sum of several (pooled counts).

  Returns:
    float in [0, 1].
  """
  hist = np.asarray(histogram, np.int64)
  segment_length = hist.shape[0] - 1
  c = np.arange(segment_length + 1)
  matches = np.cumsum((hist * c)[::-1])[::-1]  # matches[tau] = sum_{c >= tau} c * hist[c]
  predictions = segment_length * np.cumsum(hist[::-1])[::-1]
  actuals = matches[0]
  f1 = 2.0 * matches / np.maximum(predictions + actuals, 1)
  return float(np.max(f1))


def segment_routing_best_performance(expert_ids, num_experts, segment_length):
  """SRP(L) of one layer (see the module docstring).

  Args:
    expert_ids: [tokens, k] or [batch, tokens, k] int expert ids (-1 = empty slot).
    num_experts: E.
    segment_length: L (1..tokens).

  Returns:
    float in [0, 1]: the best F1 over thresholds 0..L (0 when no expert is ever used).
  """
  return srp_from_histogram(window_count_histogram(expert_ids, num_experts, segment_length))


def _token_experts(row):
  """A token's distinct experts in slot order, empty slots (-1) left out."""
  seen = []
  for e in row:
    if e >= 0 and e not in seen:
      seen.append(int(e))
  return seen


def _stack_depths(ids, num_experts, segment_length):
  """Stack depth counts of one sequence ids [tokens, k]: int64 [E], entry d = accesses at depth d (module docstring).

  The priority of expert e is `uses << 32 | time of its last access` in one integer, as in 41_sch_calc.py (`prop`).
  Plain Python lists: the stack holds at most E experts, and small lists are faster than numpy here.
  """
  tokens = [_token_experts(row) for row in ids]
  priority = [0] * num_experts
  for row in tokens[:segment_length]:  # the window of the first token: tokens 0..L-1
    for e in row:
      priority[e] += 1 << 32
  depths = np.zeros(num_experts, np.int64)
  stack = []  # expert ids, top first
  clock = 0
  for t, row in enumerate(tokens):
    rank = {e: i for i, e in enumerate(stack)}
    seen = len(stack)
    for e in row:  # depths before the token's first access; a first use sits below every expert seen so far
      if e in rank:
        depths[rank[e]] += 1
      else:
        depths[seen] += 1
        seen += 1
    for e in row:
      if e not in rank:
        stack.append(e)  # a first use enters at the bottom
      pos = stack.index(e)
      if pos:
        carried = stack[0]
        for j in range(1, pos):  # the lower-priority one of (carried, resident) is carried on
          if priority[stack[j]] < priority[carried]:
            stack[j], carried = carried, stack[j]
        stack[pos], stack[0] = carried, e
      clock += 1
      priority[e] = (((priority[e] >> 32) - 1) << 32) | clock
    if t + segment_length < len(tokens):
      for e in tokens[t + segment_length]:
        priority[e] += 1 << 32
  return depths


def cache_depth_counts(expert_ids, num_experts, segment_length):
  """Stack depths of every access of the SCH(L, .) cache, summed over sequences (see the module docstring).

  Args:
    expert_ids: [tokens, k] or [batch, tokens, k] int expert ids (-1 = empty slot).
    num_experts: E.
    segment_length: L (1..tokens): the priority counts uses in the window of L tokens from the current one.

  Returns:
    int64 [E]: entry d = accesses at depth d, so hits of a cache of C slots = sum of the first C entries and
    accesses = the total.
  """
  ids = _as_sequences(expert_ids)
  _check_length(segment_length, ids.shape[1])
  _check_ids(ids, num_experts)
  return sum((_stack_depths(seq, num_experts, segment_length) for seq in ids), np.zeros(num_experts, np.int64))


def _hit_rates(depths, cache_sizes):
  total = max(int(depths.sum()), 1)
  return np.array([depths[:c].sum() / total for c in cache_sizes])


def _check_cache_size(cache_size, num_experts):
  if not isinstance(cache_size, (int, np.integer)) or not 1 <= cache_size <= num_experts:
    raise ValueError(f"cache_size={cache_size!r} is invalid; allowed 1..num_experts={num_experts}")


def segment_cache_best_hit_rate(expert_ids, num_experts, segment_length, cache_size):
  """SCH(L, C) of one layer (see the module docstring).

  Args:
    expert_ids: [tokens, k] or [batch, tokens, k] int expert ids (-1 = empty slot).
    num_experts: E.
    segment_length: L (1..tokens): the eviction priority sees the next L - 1 tokens.
    cache_size: C cached experts (1..E; the authors report C = m k for m = 1, 2, ...).

  Returns:
    float in [0, 1]: hits / accesses summed over sequences (0 when nothing is accessed).
  """
  _check_cache_size(cache_size, num_experts)
  return float(_hit_rates(cache_depth_counts(expert_ids, num_experts, segment_length), [cache_size])[0])


def model_expert_ids(expert_ids, num_experts):
  """The routing of all layers as one layer of `layers * E` experts: [layers, batch, length, k] -> [batch, length,
  layers * k], layer l's ids offset by l * E (empty slots stay -1), layers in order (41_sch_calc.py `main`)."""
  ids = np.asarray(expert_ids)
  offset = (np.arange(ids.shape[0]) * num_experts).reshape(-1, 1, 1, 1)
  ids = np.where(ids >= 0, ids + offset, -1)
  return np.concatenate(list(ids), axis=-1)


def routing_consistency(expert_ids, num_experts, *, segment_lengths=DEFAULT_SEGMENT_LENGTHS, cache_sizes=None):
  """SRP and SCH of every layer and of the whole model, for every segment length that fits the sequences.

  Args:
    expert_ids: [layers, batch, length, k] int expert ids (e.g. a model's sown `intermediates['expert_ids']`).
    num_experts: E (the same in every layer).
    segment_lengths: candidate L values; those longer than `length` are dropped.
    cache_sizes: C values (slots per layer) for SCH; default (k, 2k) clipped to E (papers.md A8: about twice the
      active experts suffices).

  Returns:
    dict of numpy arrays: 'segment_lengths' [n_L] (the L values used), 'cache_sizes' [n_C], 'srp' [layers, n_L],
    'sch' [layers, n_L, n_C] (per layer), 'model_srp' [n_L] (counts pooled over layers) and 'model_sch' [n_L, n_C]
    (one cache of C * layers slots over all layers' experts): the whole-model figures of the authors' code.
  """
  ids = np.asarray(expert_ids)
  if ids.ndim != 4:
    raise ValueError(f"expert_ids must be [layers, batch, length, k], got shape {ids.shape}")
  num_layers, length, k = ids.shape[0], ids.shape[2], ids.shape[3]
  lengths = [int(l) for l in segment_lengths if l <= length]
  if not lengths:
    raise ValueError(f"no segment length in {tuple(segment_lengths)} fits sequences of length {length}")
  if cache_sizes is None:
    cache_sizes = sorted({min(k, num_experts), min(2 * k, num_experts)})
  cache_sizes = [int(c) for c in cache_sizes]
  for c in cache_sizes:
    _check_cache_size(c, num_experts)
  hists = {l: [window_count_histogram(layer, num_experts, l) for layer in ids] for l in lengths}
  srp = np.array([[srp_from_histogram(h) for h in hists[l]] for l in lengths]).T
  model_srp = np.array([srp_from_histogram(np.sum(hists[l], axis=0)) for l in lengths])
  sch = np.array(
    [[_hit_rates(cache_depth_counts(layer, num_experts, l), cache_sizes) for l in lengths] for layer in ids]
  )
  whole = model_expert_ids(ids, num_experts)
  model_sch = np.array(
    [
      _hit_rates(cache_depth_counts(whole, num_layers * num_experts, l), [c * num_layers for c in cache_sizes])
      for l in lengths
    ]
  )
  return {
    "segment_lengths": np.array(lengths),
    "cache_sizes": np.array(cache_sizes),
    "srp": srp,
    "sch": sch,
    "model_srp": model_srp,
    "model_sch": model_sch,
  }
