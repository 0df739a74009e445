"""Serving with routes known ahead (papers.md A4; Cai et al. 2024, "Read-ME", Sec. 4): the pre-gating router gives
every pending token's expert before the backbone runs, so decoding can (a) batch the queue by expert (lookahead
expert-aware batching, Sec. 4.1) and (b) keep experts in a small cache with Belady's eviction (evict the expert whose
next use is farthest ahead, optimal for a known future; Belady 1966), compared with LRU (Sec. 4.2).

Pure numpy functions over expert-id sequences.
"""

import numpy as np


def _check_accesses(accesses, capacity):
  accesses = np.asarray(accesses)
  if accesses.ndim != 1 or not np.issubdtype(accesses.dtype, np.integer):
    raise ValueError(
      f"accesses must be a 1-D sequence of integer expert ids, got shape {accesses.shape} dtype {accesses.dtype}"
    )
  if not isinstance(capacity, (int, np.integer)) or capacity < 1:
    raise ValueError(f"capacity={capacity!r} must be a positive integer (experts the cache holds)")
  return [int(a) for a in accesses]


def lru_hits(accesses, capacity):
  """Simulates an LRU expert cache: a miss loads the expert, evicting the least recently used one when full.

  Args:
    accesses: [n] int expert ids in the order they are needed.
    capacity: experts the cache holds.

  Returns:
    [n] bool, True where the access was a hit.
  """
  accesses = _check_accesses(accesses, capacity)
  cache, hits = [], []  # cache: least recently used first
  for expert in accesses:
    hit = expert in cache
    hits.append(hit)
    if hit:
      cache.remove(expert)
    elif len(cache) == capacity:
      cache.pop(0)
    cache.append(expert)
  return np.array(hits, bool)


def belady_hits(accesses, capacity):
  """Simulates an expert cache with Belady's eviction: on a miss with a full cache, evict the cached expert whose
  next use is farthest in the future (never used again = infinitely far; ties by the lower expert id).

  Args:
    accesses: [n] int expert ids in the order they are needed (known ahead thanks to the pre-gate).
    capacity: experts the cache holds.

  Returns:
    [n] bool, True where the access was a hit.
  """
  accesses = _check_accesses(accesses, capacity)
  n = len(accesses)
  next_use, last_seen = [n] * n, {}
  for i in range(n - 1, -1, -1):
    next_use[i] = last_seen.get(accesses[i], n)
    last_seen[accesses[i]] = i
  cache, hits = {}, []  # expert -> position of its next use
  for i, expert in enumerate(accesses):
    hit = expert in cache
    hits.append(hit)
    if not hit and len(cache) == capacity:
      victim = max(sorted(cache), key=lambda e: cache[e])
      del cache[victim]
    cache[expert] = next_use[i]
  return np.array(hits, bool)


def hit_rate(hits):
  """Fraction of hits of a [n] bool array (0 for an empty one)."""
  hits = np.asarray(hits, bool)
  return float(hits.mean()) if hits.size else 0.0


def expert_aware_batches(expert_ids, max_batch_size, lookahead=None):
  """Lookahead expert-aware batching: group pending tokens by their (known) expert.

  Greedy [guess: Read-ME's scheduler details are not published]: among the first `lookahead` pending tokens, take
  the expert with the most of them (ties: the expert of the oldest such token) and batch up to `max_batch_size` of its
  tokens in the window, oldest first; repeat until the queue is empty. Each batch loads one expert.

  Args:
    expert_ids: [n] int expert of each pending token/request, in arrival order.
    max_batch_size: most tokens in one batch.
    lookahead: how many pending tokens the scheduler looks at (None = the whole queue).

  Returns:
    A list of (expert id, [indices into expert_ids]) batches in execution order; every index appears once.
  """
  if not isinstance(max_batch_size, (int, np.integer)) or max_batch_size < 1:
    raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive integer")
  expert_ids = _check_accesses(expert_ids, 1)
  if lookahead is not None and (not isinstance(lookahead, (int, np.integer)) or lookahead < 1):
    raise ValueError(f"lookahead={lookahead!r} must be a positive integer or None")
  pending = list(range(len(expert_ids)))
  batches = []
  while pending:
    window = pending if lookahead is None else pending[:lookahead]
    counts = {}
    for i in window:
      counts[expert_ids[i]] = counts.get(expert_ids[i], 0) + 1
    expert = max(counts, key=lambda e: counts[e])  # dict order = first seen, so ties go to the oldest
    batch = [i for i in window if expert_ids[i] == expert][:max_batch_size]
    batches.append((expert, batch))
    taken = set(batch)
    pending = [i for i in pending if i not in taken]
  return batches
