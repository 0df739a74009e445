"""A pool of trained zoo LMs for the routers between models (`papers.md` C1-C5, `zoo.routing.model_routers`), their
measured cost, and the routing data built from them.

- `zoo.engine.runs.load_pool(["small=workdirs/pool_small", "workdirs/pool_large", ...])` (the engine restores runs):
  each member's config (`config.json`) and latest checkpoint, restored as a frozen parameter tree (one device;
  nothing trains). Members are sorted by forward FLOPs per token. One `ConfigError` line for a missing run
  directory, a run without a checkpoint, members whose vocabularies or tokenizers differ, a duplicate name, and
  (`ModelPool.member`) a name not in the pool.
- `measure_costs(pool, tokens)`: per member the analytic forward FLOPs per token (one third of the model's
  `train_flops_per_token`, Kaplan et al. 2020 table 1: the forward pass is 2N + 4 L d keys of the 6N + 12 L d keys)
  and the tokens per second measured in one run on this machine: the jitted forward over the same batch, after
  compilation, median of `repeats` timings taken round-robin over the members (so that a load on the machine falls
  on all of them alike).
- `corpus_queries(data_config)`: queries = non-overlapping windows of `prompt_len + continuation_len` tokens of the
  documents of the corpus's held-out split (the split the members never trained on), each labelled with its
  document's domain (pystdlib's `domain`: 'docs', 'modules' or the stdlib package).
- `score_queries(pool, tokens, prompt_len)`: per query and member, the quality on the continuation (teacher-forced
  next-token accuracy, and negative mean loss in nats), the confidence on the prompt (mean max-softmax probability),
  and the router features from the cheapest member's prompt pass: its mean final-norm hidden state over the prompt,
  its prompt confidence and its prompt loss [guess: the RouteLLM/RouterBench routers embed the prompt with a separate
  text encoder; here the cheapest member is the encoder, and its prompt pass is charged to the router].
- `routing_data(...)`: the `RoutingData` of those queries, with cost = measured seconds per token x tokens (or
  FLOPs per token x tokens) per member and feature cost = the cheapest member's cost of the prompt.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import numpy as np

from zoo.registry import ConfigError
from zoo.routing.model_routers import RoutingData


@dataclasses.dataclass(frozen=True)
class PoolMember:
  """One trained run: `name`, `workdir`, `step` (of the restored checkpoint), `config`, `model` (Linen module) and
  `variables` (its restored, frozen variables)."""

  name: str
  workdir: str
  step: int
  config: object
  model: object
  variables: dict

  @property
  def num_params(self):
    from zoo.layers import count_params

    return count_params(self.variables["params"])

  def forward_flops_per_token(self, seq_len):
    """Analytic forward FLOPs per token at `seq_len`: a third of `train_flops_per_token` (2 N per token when the model
    has none)."""
    if hasattr(self.model, "train_flops_per_token"):
      return float(self.model.train_flops_per_token(seq_len)) / 3.0
    return 2.0 * self.num_params


@dataclasses.dataclass(frozen=True)
class ModelPool:
  """The members, sorted by forward FLOPs per token; `tokenizer` and `vocab_size` are common to all."""

  members: tuple[PoolMember, ...]
  tokenizer: str
  vocab_size: int

  @property
  def names(self):
    return tuple(m.name for m in self.members)

  def member(self, name):
    """The member called `name`; ConfigError when there is none."""
    for m in self.members:
      if m.name == name:
        return m
    raise ConfigError(f"pool member {name!r} is not in the pool; allowed: {', '.join(self.names)}")


def parse_pool(spec):
  """'a=DIR,DIR2' (or a list of such items) -> [(name, workdir)]; a bare DIR is named after its folder without a
  'pool_' prefix [guess]."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  items = [i.strip() for i in items if i.strip()]
  if len(items) < 2:
    raise ConfigError(f"--pool needs at least two members (NAME=DIR or DIR, comma-separated), got {spec!r}")
  pairs = []
  for item in items:
    name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
    name = name or os.path.basename(os.path.normpath(path)).removeprefix("pool_")
    pairs.append((name, path))
  names = [n for n, _ in pairs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ConfigError(f"--pool: member names {dup} occur twice; allowed: distinct names (NAME=DIR)")
  return pairs


@dataclasses.dataclass(frozen=True)
class MemberCost:
  """Measured and analytic cost of one member: `seconds_per_token` (median), `tokens_per_second`,
  `flops_per_token` (analytic forward), `params`, `timings` (every timed forward, seconds)."""

  seconds_per_token: float
  tokens_per_second: float
  flops_per_token: float
  params: int
  timings: tuple[float, ...]


def _forward(member):
  import jax

  return jax.jit(lambda variables, tokens: member.model.apply(variables, tokens)[0])


def measure_costs(pool: ModelPool, tokens, *, repeats=5) -> dict[str, MemberCost]:
  """{member name: MemberCost} from the forward over `tokens` int32 [B, T] (see the module docstring)."""
  import jax.numpy as jnp

  if repeats < 1:
    raise ConfigError(f"repeats={repeats} must be >= 1")
  tokens = jnp.asarray(tokens, jnp.int32)
  fns = {m.name: _forward(m) for m in pool.members}
  for m in pool.members:  # compile and warm up
    fns[m.name](m.variables, tokens).block_until_ready()
  timings = {m.name: [] for m in pool.members}
  for _ in range(repeats):
    for m in pool.members:
      start = time.perf_counter()
      fns[m.name](m.variables, tokens).block_until_ready()
      timings[m.name].append(time.perf_counter() - start)
  count = int(np.prod(tokens.shape))
  out = {}
  for m in pool.members:
    seconds = float(np.median(timings[m.name])) / count
    out[m.name] = MemberCost(
      seconds, 1.0 / seconds, m.forward_flops_per_token(tokens.shape[1]), m.num_params, tuple(timings[m.name])
    )
  return out


def corpus_queries(data_config, *, split=None, prompt_len=64, continuation_len=64, max_queries=1024, seed=0):
  """Windows of the corpus's documents as routing queries.

  Args:
    data_config: a member's `config.data` (a 'text' dataset; its tokenizer).
    split: the split to read (default: `data_config.eval_split`, which the members did not train on).
    prompt_len, continuation_len: tokens of a query's prompt and continuation.
    max_queries: at most this many windows, a seeded random choice when there are more (kept in corpus order).

  Returns:
    (tokens int32 [Q, prompt_len + continuation_len], category int32 [Q], category names): the windows are
    non-overlapping pieces of BOS + document + EOS; the category is the document's domain when the dataset has a
    'domain' label ('all' otherwise).
  """
  from zoo.data.config import resolve_data_config
  from zoo.data.pipeline import _open_source  # the pipeline's source opener: embedded datasets or TFDS by name
  from zoo.data.tokenizer import make_tokenizer

  if prompt_len < 1 or continuation_len < 1:
    raise ConfigError(f"prompt_len={prompt_len} and continuation_len={continuation_len} must be >= 1")
  cfg = resolve_data_config(data_config)
  split = split or cfg["eval_split"]
  source, builder = _open_source(cfg, split)
  features = builder.info.features
  label = features["domain"] if "domain" in features else None
  tok = make_tokenizer(cfg["tokenizer"])
  length = prompt_len + continuation_len
  windows, labels = [], []
  for i in range(len(source)):
    record = source[i]
    ids = tok.encode(record[cfg["text_key"]])
    for start in range(0, len(ids) - length + 1, length):
      windows.append(ids[start : start + length])
      labels.append(int(record["domain"]) if label is not None else 0)
  if not windows:
    raise ConfigError(f"split {split!r} of {cfg['name']!r} has no document of >= {length} tokens")
  if len(windows) > max_queries:
    keep = np.sort(np.random.default_rng(seed).choice(len(windows), max_queries, replace=False))
    windows, labels = [windows[k] for k in keep], [labels[k] for k in keep]
  present = sorted(set(labels))
  names = tuple(label.names[k] for k in present) if label is not None else ("all",)
  remap = {k: j for j, k in enumerate(present)}
  return np.stack(windows).astype(np.int32), np.asarray([remap[k] for k in labels], np.int32), names


def _score_fn(member, prompt_len, with_features):
  """jit: tokens [B, T] -> per-row stats (continuation accuracy and loss, prompt confidence and loss, and with
  `with_features` the mean final-norm hidden state over the prompt)."""
  import jax
  import jax.numpy as jnp

  def fn(variables, tokens):
    capture = (lambda mdl, _: mdl.name == "final_norm") if with_features else False
    (logits, _), state = member.model.apply(variables, tokens, capture_intermediates=capture, mutable=["intermediates"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    cont = slice(prompt_len - 1, None)  # logits at positions P-1 .. T-2 predict the continuation
    stats = {
      "accuracy": correct[:, cont].mean(axis=1),
      "neg_loss": target_logp[:, cont].mean(axis=1),
      "confidence": jnp.exp(jnp.max(logp[:, :prompt_len], axis=-1)).mean(axis=1),
      "prompt_loss": -target_logp[:, : prompt_len - 1].mean(axis=1) if prompt_len > 1 else jnp.zeros(tokens.shape[0]),
    }
    if with_features:
      hidden = state["intermediates"]["final_norm"]["__call__"][0]
      stats["hidden"] = hidden[:, :prompt_len].astype(jnp.float32).mean(axis=1)
    return stats

  return jax.jit(fn)


def score_queries(pool: ModelPool, tokens, prompt_len, *, batch_size=64):
  """Every member on every query (see the module docstring).

  Returns:
    {'accuracy', 'neg_loss', 'confidence': float [Q, M] (members in pool order), 'features': float [Q, F]}.
  """
  tokens = np.asarray(tokens, np.int32)
  q = tokens.shape[0]
  if not 1 <= prompt_len < tokens.shape[1]:
    raise ConfigError(f"prompt_len={prompt_len} must lie in [1, {tokens.shape[1] - 1}] (query length - 1)")
  pad = (-q) % batch_size
  padded = np.concatenate([tokens, np.repeat(tokens[-1:], pad, axis=0)]) if pad else tokens
  columns = {"accuracy": [], "neg_loss": [], "confidence": []}
  features = None
  for index, member in enumerate(pool.members):
    first = index == 0
    fn = _score_fn(member, prompt_len, with_features=first)
    rows = [
      {k: np.asarray(v) for k, v in fn(member.variables, padded[s : s + batch_size]).items()}
      for s in range(0, len(padded), batch_size)
    ]
    stats = {k: np.concatenate([r[k] for r in rows])[:q] for k in rows[0]}
    for k in columns:
      columns[k].append(stats[k])
    if first:
      features = np.concatenate(
        [stats["hidden"], stats["confidence"][:, None], stats["prompt_loss"][:, None]], axis=1
      ).astype(np.float32)
  return {**{k: np.stack(v, axis=1).astype(np.float64) for k, v in columns.items()}, "features": features}


def routing_data(
  pool, costs, scores, category, categories, *, prompt_len, query_len, quality="accuracy", unit="seconds"
):
  """The `RoutingData` of the scored queries.

  Args:
    pool: the ModelPool (members in pool order, which `scores` follows).
    costs: {name: MemberCost}.
    scores: `score_queries`'s output.
    category, categories: `corpus_queries`'s labels.
    prompt_len, query_len: tokens of the prompt and of the whole query.
    quality: 'accuracy' (teacher-forced next-token accuracy on the continuation) or 'neg_loss'.
    unit: 'seconds' (measured) or 'flops' (analytic); the members are ordered by measured cost in both.
  """
  if quality not in ("accuracy", "neg_loss"):
    raise ConfigError(f"quality={quality!r}; allowed: 'accuracy', 'neg_loss'")
  if unit not in ("seconds", "flops"):
    raise ConfigError(f"unit={unit!r}; allowed: 'seconds', 'flops'")
  names = pool.names
  per_token = np.array(
    [costs[n].seconds_per_token if unit == "seconds" else costs[n].flops_per_token for n in names], np.float64
  )
  # Columns in increasing measured cost, whatever the unit, so that decisions carry over between units.
  order = np.argsort([costs[n].seconds_per_token for n in names], kind="stable")
  q = scores[quality].shape[0]
  cost = np.broadcast_to(per_token[order] * query_len, (q, len(names))).copy()
  feature_cost = np.full(q, per_token[0] * prompt_len)  # the cheapest-by-FLOPs member (pool order) makes the features
  return RoutingData(
    quality=scores[quality][:, order],
    cost=cost,
    features=scores["features"],
    feature_cost=feature_cost,
    confidence=scores["confidence"][:, order],
    category=np.asarray(category),
    members=tuple(names[i] for i in order),
    categories=tuple(categories),
  )


def split_queries(num_queries, fractions=(0.5, 0.25, 0.25), seed=0) -> Sequence[np.ndarray]:
  """A seeded random partition of range(num_queries) into train / validation / test index arrays (sorted)."""
  if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-9:
    raise ConfigError(f"split fractions {fractions} must be three positive numbers summing to 1")
  perm = np.random.default_rng(seed).permutation(num_queries)
  a = int(round(fractions[0] * num_queries))
  b = a + int(round(fractions[1] * num_queries))
  parts = (perm[:a], perm[a:b], perm[b:])
  if min(len(p) for p in parts) == 0:
    raise ConfigError(f"{num_queries} queries cannot fill the three splits {fractions}; allowed: more queries")
  return tuple(np.sort(p) for p in parts)
