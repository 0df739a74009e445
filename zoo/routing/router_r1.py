"""Router-R1: the router between models is itself a small autoregressive policy trained by reinforcement learning
(`papers.md` C2; Zhang, Feng and You 2025, "Router-R1: Teaching LLMs Multi-Round Routing and Aggregation via
Reinforcement Learning", arXiv 2506.09033, section 3).

The policy (`RouterPolicy`, a tiny pre-norm decoder built from `zoo.layers.DecoderBlock`) reads one query and writes
turns, at most `max_turns` of them (the paper's 4):

  <query> <think> thought_i </think> <search> Member </search> <information> bin_b </information> ... <answer> Member
  </answer>

- `<query>`: the first position; its embedding is the `<query>` token's plus a projection of the query's
  (standardised) router features and of the cost weight a [guess: the paper's policy reads the question's text and is
  trained for one a; here the features stand in for the text, and a is an input so that one policy serves every
  knob of `ModelRouter`; train with a single a for the paper's setting].
- `<think> thought_i </think>`: one thought token out of `num_thoughts` [guess: the action/turn vocabulary replaces
  free text at this size].
- `<search> Member </search>`: the paper's `<search> Model-Name:query </search>` (the query is implicit: there is one
  per episode). The environment runs that member and inserts `<information> bin_b </information>`: the tokens the
  policy did not generate (masked out of the loss). The observation is what running the member reveals without the
  reference, its confidence on the prompt (`RoutingData.confidence`, mean max-softmax probability) cut into
  `num_bins` equal bins of [0, 1] [guess: the paper returns the member's answer text].
- `<answer> Member </answer>`: the member whose output is kept (the paper's final answer aggregates the returned
  answers; here the policy keeps one of them). A turn is any of think / search / answer.

Reward (the paper's, as `papers.md` C2 states it): format f = 0 for a valid trajectory, -1 otherwise; cost term
c = 1 - normalised sqrt(cost), where cost is the MEASURED cost (seconds or FLOPs of the pool's members, summed over
every search call) instead of the paper's token prices, normalised per query as (sqrt(C) - sqrt(c_min)) /
(sqrt(c_max) - sqrt(c_min)) over the pool's single-member costs and clipped to [0, 1] [guess]; then
  no answer: f (1 - a);  correct: (score + f)(1 - a) + a c;  wrong: f,
with score = 1 (exact match) and a the cost weight. "Correct" on the pool's data: the answered member was searched
and its quality on the query is within `margin` of the best member's (`correct_margin`, default a quarter of the
mean best-minus-worst quality gap of the training queries [guess]). Valid format: the turns parse as above, at most
`max_turns`, ending with exactly one answer turn, with `<eos>` or at the turn limit (the last two: no answer); the
answer is read from the first well-formed answer turn whatever the format. Every search call is paid, a member
searched twice twice (`CallsDecision`).

Training: GRPO (Shao et al. 2024): G samples per query, group-relative advantages
(r - mean) / (std + eps), PPO's clipped ratio (eps 0.2), k3 KL to the initial policy (coefficient 0.001, verl's
default [guess]), token-mean over the generated tokens only; optax Adam. `scale_advantages=False` keeps the centred
rewards (Dr. GRPO): with the std division every group pushes equally hard, so many queries with a small gap can
outvote a few with a large one. Before GRPO, `format_warmup_steps` of
cross-entropy on random well-formed trajectories (members drawn uniformly, real observations) stand in for the
instruction-following prior of the paper's pretrained LLM [guess]: without it, sampling from scratch almost never
produces a valid trajectory and every group's advantages are 0. PPO with GAE (the paper's other option) is not
implemented here.

`RouterR1` is the 'rl' family of `zoo.routing.model_routers` (registered as 'router_r1'): `fit` trains the policy on
a `RoutingData` (quality [Q, M], cost [Q, M], features [Q, F], confidence [Q, M]), its knobs are the trained cost
weights, `route(data, a)` decodes greedily and returns a `Decision` (every search call is paid for, and the features).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.layers import MLP, Attention, DecoderBlock, Embed, RMSNorm
from zoo.registry import ConfigError
from zoo.routing.model_routers import Decision, ModelRouter, RoutingData, register_model_router

# ------------------------------------------------------------------------------------------------------- vocabulary

SPECIAL = (
  "<pad>",
  "<query>",
  "<eos>",
  "<think>",
  "</think>",
  "<search>",
  "</search>",
  "<information>",
  "</information>",
  "<answer>",
  "</answer>",
)
PAD, QUERY, EOS, THINK, THINK_END, SEARCH, SEARCH_END, INFO, INFO_END, ANSWER, ANSWER_END = range(len(SPECIAL))


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The turn vocabulary: the special tags, `num_thoughts` thought tokens, one token per member, `num_bins`
  observation tokens (in that order)."""

  num_members: int
  num_thoughts: int = 4
  num_bins: int = 8

  def __post_init__(self):
    for key in ("num_members", "num_thoughts", "num_bins"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
        raise ConfigError(f"router_r1: {key}={getattr(self, key)!r} must be a positive integer")

  @property
  def first_thought(self):
    return len(SPECIAL)

  @property
  def first_member(self):
    return self.first_thought + self.num_thoughts

  @property
  def first_bin(self):
    return self.first_member + self.num_members

  @property
  def size(self):
    return self.first_bin + self.num_bins

  def member(self, token):
    """The member index of a token (a Python int), -1 if it is not a member token."""
    first = len(SPECIAL) + self.num_thoughts
    return token - first if first <= token < first + self.num_members else -1

  def is_thought(self, token):
    return self.first_thought <= token < self.first_member

  def is_bin(self, token):
    return self.first_bin <= token < self.size

  def observation_bin(self, confidence):
    """int [...]: the observation token of a confidence in [0, 1] (equal bins)."""
    b = np.clip(np.floor(np.asarray(confidence, np.float64) * self.num_bins), 0, self.num_bins - 1)
    return (self.first_bin + b).astype(np.int32)

  def render(self, tokens, members=None):
    """The text of a token row, e.g. '<query> <search> small </search> <information> c3 </information> ...'."""
    words = []
    for t in np.asarray(tokens).tolist():
      if t == PAD:
        continue
      if t < len(SPECIAL):
        words.append(SPECIAL[t])
      elif t < self.first_member:
        words.append(f"t{t - self.first_thought}")
      elif t < self.first_bin:
        k = t - self.first_member
        words.append(members[k] if members else f"M{k}")
      else:
        words.append(f"c{t - self.first_bin}")
    return " ".join(words)


def max_length(max_turns):
  """Tokens of an episode: the query + at most `max_turns` turns of at most 6 tokens (a search and its
  observation)."""
  return 1 + 6 * max_turns


# ----------------------------------------------------------------------------------------------------------- policy


class RouterPolicy(nn.Module):
  """The policy: a causal decoder over the turn vocabulary, conditioned on the query at position 0.

  Attributes:
    vocab_size: the turn vocabulary's size (`Vocab.size`).
    num_layers, embed_dim, num_heads, mlp_dim: the decoder's shape [guess: tiny, for CPU].
  """

  vocab_size: int
  num_layers: int = 2
  embed_dim: int = 64
  num_heads: int = 4
  mlp_dim: int = 128

  @nn.compact
  def __call__(self, tokens, features, cost_weight):
    """Next-token logits.

    Args:
      tokens: int [N, L]; position 0 holds `<query>`.
      features: float [N, F] (standardised query features).
      cost_weight: float [N], the cost weight a.

    Returns:
      float32 logits [N, L, vocab] (position t predicts token t + 1).
    """
    embed = Embed(self.vocab_size, self.embed_dim, name="embed")
    x = embed(tokens)
    query = nn.Dense(self.embed_dim, name="query_proj")(features.astype(jnp.float32))
    query = query + nn.Dense(self.embed_dim, name="cost_weight_proj")(cost_weight.astype(jnp.float32)[:, None])
    x = x + jnp.where((tokens == QUERY)[..., None], query[:, None, :], 0.0)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    head_dim = self.embed_dim // self.num_heads
    for i in range(self.num_layers):
      x, _, _ = DecoderBlock(
        functools.partial(Attention, num_heads=self.num_heads, head_dim=head_dim),
        functools.partial(MLP, hidden_dim=self.mlp_dim),
        name=f"layers_{i}",
      )(x, positions)
    x = RMSNorm(name="final_norm")(x)
    return embed.attend(x).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ episodes, reward


@dataclasses.dataclass(frozen=True)
class Episodes:
  """N trajectories: `tokens` int [N, L], `generated` bool [N, L] (sampled by the policy), `observed` bool [N, L]
  (inserted by the environment); neither at `<query>` and padding."""

  tokens: np.ndarray
  generated: np.ndarray
  observed: np.ndarray


@dataclasses.dataclass(frozen=True)
class Parsed:
  """What a trajectory says: `valid` bool [N] (format), `answer` int [N] (member answered, -1 none), `calls` int
  [N, M] (times each member was run), `last_search` int [N] (-1 none), `turns` int [N]."""

  valid: np.ndarray
  answer: np.ndarray
  calls: np.ndarray
  last_search: np.ndarray
  turns: np.ndarray


def parse(tokens, vocab: Vocab, max_turns):
  """Reads trajectories (see the module docstring for the grammar).

  Args:
    tokens: int [N, L], position 0 the query.
  """
  tokens = np.asarray(tokens)
  n, length = tokens.shape
  valid = np.zeros(n, bool)
  answer = np.full(n, -1)
  calls = np.zeros((n, vocab.num_members), int)
  last = np.full(n, -1)
  turns = np.zeros(n, int)
  for r in range(n):
    row = tokens[r].tolist() + [PAD] * 6
    # Every well-formed search that got its observation is run; the first well-formed answer is the answer.
    for i in range(1, length):
      k = vocab.member(row[i + 1])
      if row[i] == SEARCH and k >= 0 and row[i + 2] == SEARCH_END and row[i + 3] == INFO:
        calls[r, k] += 1
        last[r] = k
      if row[i] == ANSWER and k >= 0 and row[i + 2] == ANSWER_END and answer[r] < 0:
        answer[r] = k
    i, ok, count = 1, False, 0
    while True:
      t = row[i]
      if t == EOS:  # the end without an answer
        ok = all(x == PAD for x in row[i + 1 :])
        break
      if t == PAD:  # the rollout stopped: valid only at the turn limit
        ok = count == max_turns
        break
      if count == max_turns:
        break
      if t == THINK and vocab.is_thought(row[i + 1]) and row[i + 2] == THINK_END:
        i, count = i + 3, count + 1
      elif (
        t == SEARCH
        and vocab.member(row[i + 1]) >= 0
        and row[i + 2 : i + 4] == [SEARCH_END, INFO]
        and vocab.is_bin(row[i + 4])
        and row[i + 5] == INFO_END
      ):
        i, count = i + 6, count + 1
      elif t == ANSWER and vocab.member(row[i + 1]) >= 0 and row[i + 2] == ANSWER_END:
        count += 1
        ok = all(x == PAD for x in row[i + 3 :])
        break
      else:
        break
    valid[r], turns[r] = ok, count
  return Parsed(valid, answer, calls, last, turns)


def cost_term(cost_paid, member_cost):
  """c = 1 - normalised sqrt(cost) per query (module docstring).

  Args:
    cost_paid: float [N], the summed measured cost of the members run.
    member_cost: float [N, M], each member's measured cost on the query.
  """
  lo = np.sqrt(np.min(member_cost, axis=1))
  hi = np.sqrt(np.max(member_cost, axis=1))
  x = (np.sqrt(np.asarray(cost_paid, np.float64)) - lo) / np.maximum(hi - lo, 1e-12)
  return 1.0 - np.clip(x, 0.0, 1.0)


def reward(f, answered, correct, c, a, score=1.0):
  """Router-R1's reward: no answer f (1 - a); correct (score + f)(1 - a) + a c; wrong f.

  Args:
    f: float [N], 0 (valid format) or -1.
    answered, correct: bool [N].
    c: float [N], the cost term in [0, 1].
    a: float or [N], the cost weight in [0, 1].
  """
  f, c = np.asarray(f, np.float64), np.asarray(c, np.float64)
  return np.where(~np.asarray(answered), f * (1 - a), np.where(correct, (score + f) * (1 - a) + a * c, f))


def episode_rewards(parsed: Parsed, quality, cost, a, margin):
  """float [N] rewards of parsed trajectories on their queries' quality [N, M] and cost [N, M] rows."""
  quality, cost = np.asarray(quality, np.float64), np.asarray(cost, np.float64)
  rows = np.arange(len(parsed.answer))
  answered = parsed.answer >= 0
  ans = np.maximum(parsed.answer, 0)
  best = quality.max(axis=1)
  correct = answered & (parsed.calls[rows, ans] > 0) & (quality[rows, ans] >= best - margin)
  c = cost_term(np.sum(parsed.calls * cost, axis=1), cost)
  return reward(np.where(parsed.valid, 0.0, -1.0), answered, correct, c, a)


# ---------------------------------------------------------------------------------------------------- losses, GRPO


def group_advantages(rewards, group_size, eps=1e-6, scale=True):
  """GRPO's advantages: rewards [N] in consecutive groups of `group_size` -> (r - group mean) / (group std + eps);
  `scale=False`: r - group mean (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO), which keeps the
  size of each group's reward gap instead of making every group's push equal."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centred = r - r.mean(axis=1, keepdims=True)
  return (centred / (r.std(axis=1, keepdims=True) + eps) if scale else centred).reshape(-1)


def token_logprobs(logits, tokens):
  """float [N, L-1]: log p(tokens[:, t+1] | prefix) from logits [N, L, V]."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def grpo_loss(logits, tokens, loss_mask, advantages, old_logp, ref_logp, *, clip_eps=0.2, kl_coef=0.0):
  """GRPO's clipped surrogate + k3 KL, token mean over `loss_mask` (generated tokens only).

  Args:
    logits: [N, L, V]; tokens: int [N, L]; loss_mask: bool [N, L] (True at generated tokens; observation tokens,
      the query and padding are False).
    advantages: [N]; old_logp, ref_logp: [N, L-1] (`token_logprobs` of the sampling and the reference policy).

  Returns:
    (loss, {'clip_fraction', 'kl'}).
  """
  logp = token_logprobs(logits, tokens)
  mask = jnp.asarray(loss_mask[:, 1:], jnp.float32)
  ratio = jnp.exp(logp - old_logp)
  adv = jnp.asarray(advantages, jnp.float32)[:, None]
  surrogate = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
  log_ref_ratio = ref_logp - logp
  kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
  denom = jnp.maximum(mask.sum(), 1.0)
  per_token = surrogate + kl_coef * kl
  # jnp.where (not a product) so that a non-finite value at a masked position cannot leak into the loss.
  loss = jnp.sum(jnp.where(mask > 0, per_token, 0.0)) / denom
  clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
  return loss, {
    "clip_fraction": jnp.sum(jnp.where(mask > 0, clipped, 0.0)) / denom,
    "kl": jnp.sum(jnp.where(mask > 0, kl, 0.0)) / denom,
  }


def sft_loss(logits, tokens, loss_mask):
  """Cross-entropy on the generated tokens only (the format warm-up)."""
  logp = token_logprobs(logits, tokens)
  mask = jnp.asarray(loss_mask[:, 1:], jnp.float32)
  return -jnp.sum(jnp.where(mask > 0, logp, 0.0)) / jnp.maximum(mask.sum(), 1.0)


# --------------------------------------------------------------------------------------------------------- rollouts


@functools.partial(jax.jit, static_argnums=(0, 6))
def _next_token(policy, params, tokens, features, cost_weight, pos, greedy, key):
  logits = policy.apply({"params": params}, tokens, features, cost_weight)
  logits = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False)
  logits = logits.at[:, jnp.array([PAD, QUERY])].set(-jnp.inf)
  return jnp.argmax(logits, axis=-1) if greedy else jax.random.categorical(key, logits)


def rollout(policy, params, features, cost_weight, observation, vocab, max_turns, key, greedy=False):
  """Samples (or decodes greedily) N trajectories; the environment inserts `<information> bin </information>` after
  every well-formed `<search> Member </search>`.

  Args:
    features: float [N, F]; cost_weight: float [N].
    observation: int [N, M], the observation token of each member on each query (`Vocab.observation_bin`).

  Returns:
    Episodes.
  """
  n, length = len(features), max_length(max_turns)
  tokens = np.full((n, length), PAD, np.int32)
  tokens[:, 0] = QUERY
  generated = np.zeros((n, length), bool)
  observed = np.zeros((n, length), bool)
  pending = [[] for _ in range(n)]
  done = np.zeros(n, bool)
  features, cost_weight = jnp.asarray(features, jnp.float32), jnp.asarray(cost_weight, jnp.float32)
  keys = np.asarray(jax.random.split(key, length))  # raw uint32 keys: indexing them is not a device op
  for pos in range(1, length):
    if done.all():
      break
    sampled = _next_token(policy, params, jnp.asarray(tokens), features, cost_weight, pos, greedy, keys[pos])
    sampled = np.asarray(sampled).tolist()
    for r in np.flatnonzero(~done):
      if pending[r]:
        tokens[r, pos] = pending[r].pop(0)
        observed[r, pos] = True
        continue
      t = int(sampled[r])
      tokens[r, pos], generated[r, pos] = t, True
      k = vocab.member(int(tokens[r, pos - 1])) if pos >= 2 else -1
      if t == SEARCH_END and k >= 0 and tokens[r, pos - 2] == SEARCH:
        pending[r] = [INFO, int(observation[r, k]), INFO_END]
      if t == EOS or (t == ANSWER_END and k >= 0 and tokens[r, pos - 2] == ANSWER):
        done[r] = True
  return Episodes(tokens, generated, observed)


def demonstrations(rng, observation, vocab, max_turns):
  """Random well-formed trajectories for the format warm-up: an optional thought, 1..max_turns-1 searches of
  uniformly drawn members (with their real observations), the answer one of the members searched.

  Args:
    observation: int [N, M].

  Returns:
    Episodes.
  """
  n, length = len(observation), max_length(max_turns)
  tokens = np.full((n, length), PAD, np.int32)
  tokens[:, 0] = QUERY
  generated = np.zeros((n, length), bool)
  observed = np.zeros((n, length), bool)
  for r in range(n):
    row, gen = [], []
    searches = int(rng.integers(1, max_turns))
    if searches < max_turns - 1 and rng.random() < 0.5:
      row += [THINK, vocab.first_thought + int(rng.integers(vocab.num_thoughts)), THINK_END]
      gen += [True] * 3
    members = rng.integers(vocab.num_members, size=searches)
    for k in members:
      row += [SEARCH, vocab.first_member + int(k), SEARCH_END, INFO, int(observation[r, k]), INFO_END]
      gen += [True] * 3 + [False] * 3
    row += [ANSWER, vocab.first_member + int(rng.choice(members)), ANSWER_END]
    gen += [True] * 3
    tokens[r, 1 : 1 + len(row)] = row
    generated[r, 1 : 1 + len(row)] = gen
    observed[r, 1 : 1 + len(row)] = ~np.asarray(gen)
  return Episodes(tokens, generated, observed)


# ----------------------------------------------------------------------------------------------------------- router


@dataclasses.dataclass(frozen=True)
class CallsDecision(Decision):
  """A `Decision` whose cost counts every call: `calls` int [Q, M] (a member searched twice is paid twice)."""

  calls: np.ndarray = None

  def cost(self, data: RoutingData):
    cost = np.sum(self.calls * np.asarray(data.cost), axis=1)
    return cost + (data.feature_cost if self.uses_features else 0.0)


@register_model_router("router_r1")
@dataclasses.dataclass
class RouterR1(ModelRouter):
  """Router-R1 (see the module docstring) as a `ModelRouter` of family 'rl'; the knob is the cost weight a.

  Attributes:
    cost_weights: the a values trained (one policy conditioned on a; each episode draws one) and swept by `curve`.
    max_turns: turns per episode (the paper's 4).
    group_size: GRPO's G samples per query [guess: 8].
    queries_per_step: queries per GRPO step.
    steps: GRPO steps; `epochs`: gradient steps on each batch of rollouts (PPO epochs).
    format_warmup_steps: cross-entropy steps on random well-formed trajectories before GRPO.
    lr, clip_eps, kl_coef: GRPO's Adam learning rate, the ratio clip, the KL coefficient.
    warmup_lr: the format warm-up's learning rate.
    scale_advantages: divide by the group's reward std (GRPO); False: Dr. GRPO's centred rewards.
    correct_margin: quality below the best member's still counted correct; None: a quarter of the mean
      best-minus-worst gap over the training queries [guess].
    num_layers, embed_dim, num_heads, mlp_dim, num_thoughts, num_bins: the policy and its vocabulary.
  """

  family: ClassVar[str] = "rl"
  knob_name: ClassVar[str] = "cost_weight"
  cost_weights: tuple = (0.0, 0.5, 0.9)
  max_turns: int = 4
  group_size: int = 8
  queries_per_step: int = 32
  steps: int = 150
  epochs: int = 2
  format_warmup_steps: int = 200
  lr: float = 1e-3
  warmup_lr: float = 3e-3
  scale_advantages: bool = True
  clip_eps: float = 0.2
  kl_coef: float = 0.001
  correct_margin: float | None = None
  num_layers: int = 2
  embed_dim: int = 64
  num_heads: int = 4
  mlp_dim: int = 128
  num_thoughts: int = 4
  num_bins: int = 8
  history: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.cost_weights = tuple(float(a) for a in np.atleast_1d(self.cost_weights))
    if not self.cost_weights or any(not 0.0 <= a <= 1.0 for a in self.cost_weights):
      raise ConfigError(f"router_r1: cost_weights={self.cost_weights} must be numbers in [0, 1]")
    for key, low in (("max_turns", 2), ("group_size", 2), ("queries_per_step", 1), ("epochs", 1), ("num_layers", 1)):
      value = getattr(self, key)
      if not isinstance(value, int) or value < low:
        raise ConfigError(f"router_r1: {key}={value!r} must be an integer >= {low}")
    for key in ("steps", "format_warmup_steps"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
        raise ConfigError(f"router_r1: {key}={getattr(self, key)!r} must be an integer >= 0")
    if self.correct_margin is not None and not self.correct_margin >= 0:
      raise ConfigError(f"router_r1: correct_margin={self.correct_margin!r} must be >= 0 or None")
    if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
      raise ConfigError(
        f"router_r1: embed_dim={self.embed_dim} must be num_heads={self.num_heads} x an even head width (RoPE)"
      )

  def knobs(self):
    return np.asarray(self.cost_weights, np.float64)

  # -- data
  def _inputs(self, data: RoutingData):
    if not hasattr(self, "vocab"):
      raise ValueError("router_r1: call fit(train) before route/decode")
    return self._scale(data.features), self.vocab.observation_bin(data.confidence)

  def fit(self, train: RoutingData, seed=0):
    vocab = Vocab(len(train.members), self.num_thoughts, self.num_bins)
    self.vocab = vocab
    mean, std = np.mean(train.features, axis=0), np.std(train.features, axis=0) + 1e-6
    self._scale = lambda x: ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)
    quality = np.asarray(train.quality, np.float64)
    if self.correct_margin is None:
      self.margin = 0.25 * float(np.mean(quality.max(axis=1) - quality.min(axis=1)))
    else:
      self.margin = float(self.correct_margin)
    self.policy = RouterPolicy(self.vocab.size, self.num_layers, self.embed_dim, self.num_heads, self.mlp_dim)
    features, observation = self._inputs(train)
    key = jax.random.PRNGKey(seed)
    rng = np.random.default_rng(seed)
    key, sub = jax.random.split(key)
    f0 = jnp.zeros((1, features.shape[1]), jnp.float32)
    params = jax.jit(self.policy.init)(sub, jnp.full((1, max_length(self.max_turns)), QUERY), f0, jnp.zeros(1))[
      "params"
    ]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(self.lr))
    tx_warmup = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(self.warmup_lr))
    policy = self.policy

    @jax.jit
    def sft_step(params, opt_state, tokens, mask, feats, a):
      loss, grads = jax.value_and_grad(lambda p: sft_loss(policy.apply({"params": p}, tokens, feats, a), tokens, mask))(
        params
      )
      updates, opt_state = tx_warmup.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def logprobs(params, tokens, feats, a):
      return token_logprobs(policy.apply({"params": params}, tokens, feats, a), tokens)

    @jax.jit
    def grpo_step(params, opt_state, tokens, mask, feats, a, adv, old_logp, ref_logp):
      def loss_fn(p):
        logits = policy.apply({"params": p}, tokens, feats, a)
        return grpo_loss(logits, tokens, mask, adv, old_logp, ref_logp, clip_eps=self.clip_eps, kl_coef=self.kl_coef)

      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss, stats

    opt_state = tx_warmup.init(params)
    q = len(train)
    b = min(self.queries_per_step, q)
    weights = np.asarray(self.cost_weights, np.float32)
    for _ in range(self.format_warmup_steps):
      idx = rng.integers(q, size=b * self.group_size)
      demo = demonstrations(rng, observation[idx], self.vocab, self.max_turns)
      a = weights[rng.integers(len(weights), size=len(idx))]
      params, opt_state, _ = sft_step(params, opt_state, demo.tokens, demo.generated, features[idx], a)
    ref_params = params
    opt_state = tx.init(params)
    self.history = []
    for step in range(self.steps):
      idx = np.repeat(rng.choice(q, size=b, replace=False), self.group_size)
      a = np.repeat(weights[rng.integers(len(weights), size=b)], self.group_size)
      key, sub = jax.random.split(key)
      ep = rollout(self.policy, params, features[idx], a, observation[idx], self.vocab, self.max_turns, sub)
      parsed = parse(ep.tokens, self.vocab, self.max_turns)
      r = episode_rewards(parsed, train.quality[idx], train.cost[idx], a, self.margin)
      adv = group_advantages(r, self.group_size, scale=self.scale_advantages)
      feats = jnp.asarray(features[idx])
      old_logp = logprobs(params, ep.tokens, feats, a)
      ref_logp = logprobs(ref_params, ep.tokens, feats, a) if self.kl_coef else old_logp
      for _ in range(self.epochs):
        params, opt_state, loss, stats = grpo_step(
          params, opt_state, ep.tokens, ep.generated, feats, a, adv, old_logp, ref_logp
        )
      self.history.append(
        {
          "step": step,
          "reward": float(r.mean()),
          "valid": float(parsed.valid.mean()),
          "answers": np.bincount(parsed.answer + 1, minlength=self.vocab.num_members + 1)[1:] / len(idx),
          "loss": float(loss),
          "kl": float(stats["kl"]),
          "clip_fraction": float(stats["clip_fraction"]),
        }
      )
    self.params = params
    self._seed = seed
    return self

  def decode(self, data: RoutingData, knob):
    """Greedy trajectories (Episodes) and their parse on `data` at cost weight `knob`."""
    features, observation = self._inputs(data)
    a = np.full(len(data), float(knob), np.float32)
    ep = rollout(
      self.policy, self.params, features, a, observation, self.vocab, self.max_turns, jax.random.PRNGKey(0), True
    )
    return ep, parse(ep.tokens, self.vocab, self.max_turns)

  def route(self, data: RoutingData, knob):
    """The greedy policy's choice: the member answered (if it was searched), else the last member searched, else
    the cheapest member (run) [guess: the fallback of an episode without a usable answer]."""
    _, parsed = self.decode(data, knob)
    rows = np.arange(len(data))
    usable = (parsed.answer >= 0) & (parsed.calls[rows, np.maximum(parsed.answer, 0)] > 0)
    choice = np.where(usable, parsed.answer, np.maximum(parsed.last_search, 0))
    calls = parsed.calls.copy()
    calls[rows, choice] = np.maximum(calls[rows, choice], 1)
    return CallsDecision(choice, calls > 0, uses_features=True, calls=calls)
