"""Routers between whole models: one interface over a pool of models whose cost is measured (`papers.md` C1-C5).

The interface follows the survey's taxonomy (C5, "Doing More with Less"): every router states its `family`
(similarity-based, supervised, cascade, preference, reinforcement learning; plus the baselines random and oracle),
its `timing` ('before' generation: one member answers; 'after': a cascade runs members in turn and looks at what each
produced) and one objective, quality under a cost budget. A router maps a scalar knob (its willingness to pay, or its
threshold) to per-query member choices; `choose_threshold(router, validation, budget)` picks the knob that maximises
validation quality at a mean cost <= budget.

Papers: RouteLLM (Ong et al. 2024, "RouteLLM: Learning to Route LLMs with Preference Data"), RouterBench (Hu et al.
2024, "RouterBench: A Benchmark for Multi-LLM Routing System"), FrugalGPT (Chen et al. 2023) for cascades.

Routers (`MODEL_ROUTERS`, by name):
- `random`: RouteLLM's random router: the strongest member with probability p, else the cheapest; knob p.
- `oracle`: the true per-query qualities; knob w (below): w = inf is the cheapest member of the best quality, a finite
  w the Lagrangian form of the best quality under a budget (RouterBench's Oracle).
- `knn`: similarity-based (RouterBench's KNN router): the mean quality of each member over the k nearest training
  queries (cosine similarity of standardised features).
- `mlp`: supervised (RouterBench's MLP router): an MLP regressing each member's quality from the features.
- `preference`: RouteLLM's matrix factorisation router as a Bradley-Terry model over the whole pool: score
  s(m, x) = w2 . (v_m * (W1 x + b1)), P(m beats j | x) = sigmoid(s(m, x) - s(j, x)), trained on which member wins
  each training query (pairs with equal quality are left out [guess]); the predicted quality of m is its mean win
  probability against the others [guess: RouteLLM routes between two models only].
- `sw_ranking`: RouteLLM's similarity-weighted ranking router: per query, a Bradley-Terry fit over the training
  preference pairs, each training query weighted by gamma^(1 + its normalised cosine similarity); predicted
  quality as `preference`'s.
- `cascade`: FrugalGPT's cascade (the survey's routing after generation): run the members from the cheapest up and
  stop at the first whose confidence (mean max-softmax probability on the prompt [guess]) is >= the threshold; the
  cost is the sum over every member run.
- `composition`: Composition of Experts (C3): a category classifier (logistic regression on the features) -> a
  category -> member table from the per-category mean training quality under the willingness to pay; prompts whose
  category probability is below `min_confidence` go to the general member (the best member over all categories at the
  same knob).
- An RL-trained router (Router-R1, C2) fits the same interface with family 'rl': `fit` trains its policy, `route`
  runs it with the knob as its cost weight.

Willingness to pay w (the predictive routers and the oracle): per query, the member maximising
`w * predicted_quality - cost / max_member_cost` (ties: the cheaper member); w = 0 is the cheapest member and w = inf
the member of best predicted quality. Feature-based routers pay `feature_cost` per query (the features' forward pass).

Data (`RoutingData`, numpy): quality [Q, M] (higher is better), cost [Q, M] (seconds or FLOPs of running member m on
query q), feature_cost [Q], features [Q, F], confidence [Q, M], category int [Q], optionally complexity [Q] (a
hand-made difficulty feature), optionally tokens [Q, T] (the prompts, for LM routers); members sorted by cost.

Label-based routers (EllieSQL, `papers.md` C4: "Cost-Efficient Text-to-SQL with Complexity-Aware Routing",
HKUSTDial/EllieSQL): the members are pipelines of increasing cost and every training query gets one label,
`cheapest_sufficient(quality)`: the cheapest member whose answer is correct, else the most expensive. Each has one
operating point (`knobs()` = [0.5], the cascade's probability threshold; the others ignore the knob):
- `rule`: TableCountRouter generalised to M members: cut points on `RoutingData.complexity`, given or learned.
- `label_knn`: the majority label of the k = 5 nearest training queries (KnnRouter's similarity).
- `classifier`: an MLP classifying the label (softmax cross-entropy).
- `binary_cascade`: one "is member i sufficient" classifier per member but the last, walked in cost order.
- `pairwise`: a scoring MLP trained on preference pairs derived from the label (Bradley-Terry loss); argmax score.
EllieSQL's DPO-trained LM router (family 'generative') is `zoo.routing.ellie_sql.DpoLmRouter` ('dpo_lm'): it reads
`RoutingData.tokens`, the queries' prompts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import numpy as np

from zoo.registry import ConfigError, Registry

FAMILIES = ("baseline", "similarity", "supervised", "cascade", "preference", "rl", "generative")
TIMINGS = ("before", "after")
MODEL_ROUTERS = Registry("model router", None, "--routers")
register_model_router = MODEL_ROUTERS.register


@dataclasses.dataclass(frozen=True)
class RoutingData:
  """Queries with every member's measured quality and cost.

  Attributes:
    quality: float [Q, M], higher is better (e.g. next-token accuracy on the continuation).
    cost: float [Q, M], the cost of running member m on query q (seconds or FLOPs).
    features: float [Q, F], what before-generation routers see.
    feature_cost: float [Q], the cost of computing `features` (in `cost`'s unit).
    confidence: float [Q, M], each member's confidence on the query (what cascades see).
    category: int [Q], index into `categories`.
    members: the member names, M of them, in increasing cost.
    categories: the category names.
    complexity: float [Q] or None, a hand-made difficulty feature (for text-to-SQL the number of tables the question
      mentions; EllieSQL's TableCountRouter, `papers.md` C4); only the `rule` router reads it.
    tokens: int [Q, T] or None, each query's prompt as token ids (one length), for routers that are LMs themselves
      (EllieSQL's DPO-trained router, `zoo.routing.ellie_sql`).
  """

  quality: np.ndarray
  cost: np.ndarray
  features: np.ndarray
  feature_cost: np.ndarray
  confidence: np.ndarray
  category: np.ndarray
  members: tuple[str, ...]
  categories: tuple[str, ...] = ("all",)
  complexity: np.ndarray | None = None
  tokens: np.ndarray | None = None

  def __post_init__(self):
    q, m = np.shape(self.quality)
    shapes = {
      "cost": (np.shape(self.cost), (q, m)),
      "confidence": (np.shape(self.confidence), (q, m)),
      "feature_cost": (np.shape(self.feature_cost), (q,)),
      "category": (np.shape(self.category), (q,)),
      "features": (np.shape(self.features)[:1], (q,)),
    }
    if self.complexity is not None:
      shapes["complexity"] = (np.shape(self.complexity), (q,))
    if self.tokens is not None:
      shapes["tokens"] = (np.shape(self.tokens)[:1], (q,))
    for name, (got, want) in shapes.items():
      if tuple(got) != want:
        raise ValueError(f"RoutingData.{name} has shape {tuple(got)}; quality [Q, M]={q, m} needs {want}")
    if len(self.members) != m:
      raise ValueError(f"RoutingData: {len(self.members)} member names for quality with M={m} columns")

  def __len__(self):
    return int(np.shape(self.quality)[0])

  def subset(self, index):
    """The queries `index` (int array or boolean mask)."""
    pick = lambda a: np.asarray(a)[index]
    return dataclasses.replace(
      self,
      quality=pick(self.quality),
      cost=pick(self.cost),
      features=pick(self.features),
      feature_cost=pick(self.feature_cost),
      confidence=pick(self.confidence),
      category=pick(self.category),
      complexity=None if self.complexity is None else pick(self.complexity),
      tokens=None if self.tokens is None else pick(self.tokens),
    )

  def with_cost(self, cost, feature_cost):
    """The same queries with another cost unit (e.g. FLOPs instead of seconds)."""
    return dataclasses.replace(self, cost=np.asarray(cost), feature_cost=np.asarray(feature_cost))

  def member_cost(self):
    """float [M]: each member's mean cost per query."""
    return np.mean(self.cost, axis=0)


@dataclasses.dataclass(frozen=True)
class Decision:
  """A router's choices on Q queries: `choice` int [Q] (the member whose answer is kept), `ran` bool [Q, M] (every
  member run; a cascade runs several), `uses_features` (whether the feature cost is paid)."""

  choice: np.ndarray
  ran: np.ndarray
  uses_features: bool

  def cost(self, data: RoutingData):
    """float [Q]: the cost of each query (members run + the features when used)."""
    cost = np.sum(np.where(self.ran, data.cost, 0.0), axis=1)
    return cost + (data.feature_cost if self.uses_features else 0.0)

  def quality(self, data: RoutingData):
    """float [Q]: the quality of the kept answer."""
    return data.quality[np.arange(len(self.choice)), self.choice]


def one_member(choice, num_members):
  """A before-generation decision's `ran` [Q, M]: only the chosen member runs."""
  return np.eye(num_members, dtype=bool)[np.asarray(choice)]


def willingness_choice(predicted, cost, w):
  """The member maximising `w * predicted - cost / max member cost` per query (ties: the cheaper one).

  Args:
    predicted: float [Q, M] predicted (or true) quality.
    cost: float [Q, M].
    w: the willingness to pay, >= 0; inf: best predicted quality, cheapest among equals.

  Returns:
    int [Q].
  """
  predicted, cost = np.asarray(predicted, np.float64), np.asarray(cost, np.float64)
  scale = max(float(np.max(np.mean(cost, axis=0))), 1e-300)
  if np.isinf(w):
    utility = predicted
  else:
    utility = w * predicted - cost / scale
  best = utility >= np.max(utility, axis=1, keepdims=True) - 1e-12 * np.maximum(1.0, np.abs(utility).max())
  return np.argmin(np.where(best, cost, np.inf), axis=1)


# Knob grid of the willingness-to-pay routers: 0 (cheapest), geometric in between, inf (best predicted) [guess].
WILLINGNESS = np.concatenate([[0.0], np.geomspace(1e-2, 1e4, 61), [np.inf]])


class ModelRouter:
  """The interface every router between models implements (see the module docstring).

  Class attributes: `family` (one of FAMILIES), `timing` ('before' | 'after'), `knob_name`.
  """

  family: ClassVar[str] = "baseline"
  timing: ClassVar[str] = "before"
  knob_name: ClassVar[str] = "w"
  registry_name: ClassVar[str] = ""

  def fit(self, train: RoutingData, seed: int = 0) -> ModelRouter:
    """Learns from the training queries; returns self."""
    del train, seed
    return self

  def knobs(self) -> np.ndarray:
    """The knob values to sweep (after `fit`), float [K]."""
    return WILLINGNESS

  def route(self, data: RoutingData, knob: float) -> Decision:
    """Per-query member choices at `knob`."""
    raise NotImplementedError

  def curve(self, data: RoutingData):
    """float [K, 3]: (knob, mean cost, mean quality) over `knobs()`."""
    rows = []
    for knob in self.knobs():
      d = self.route(data, knob)
      rows.append((knob, float(np.mean(d.cost(data))), float(np.mean(d.quality(data)))))
    return np.asarray(rows, np.float64)


def choose_threshold(router: ModelRouter, validation: RoutingData, budget: float) -> float:
  """The knob with the best mean validation quality among those whose mean validation cost is <= budget (ties: the
  cheaper, then the first).

  Raises:
    ConfigError: no knob of the router meets the budget.
  """
  curve = router.curve(validation)
  feasible = curve[:, 1] <= budget * (1 + 1e-9)
  if not feasible.any():
    cheapest = float(curve[:, 1].min())
    raise ConfigError(
      f"budget {budget:.6g} is below the cheapest mean cost {cheapest:.6g} that router "
      f"{router.registry_name or type(router).__name__!r} reaches on the validation split; allowed: budget >= "
      f"{cheapest:.6g}"
    )
  rows = np.flatnonzero(feasible)
  best = max(rows, key=lambda i: (curve[i, 2], -curve[i, 1], -i))
  return float(curve[best, 0])


def _standardize(train_features):
  mean = np.mean(train_features, axis=0)
  std = np.std(train_features, axis=0) + 1e-6
  return lambda x: (np.asarray(x, np.float32) - mean) / std


@register_model_router("random")
@dataclasses.dataclass
class RandomRouter(ModelRouter):
  """RouteLLM's random router: per query, the strongest member (best mean training quality) with probability
  `knob`, else the cheapest. The draws are fixed by `seed` and the query index."""

  family: ClassVar[str] = "baseline"
  knob_name: ClassVar[str] = "p_strong"
  steps: int = 21
  seed: int = 0
  strong: int = -1

  def fit(self, train, seed=0):
    self.seed = seed
    self.strong = int(np.argmax(np.mean(train.quality, axis=0)))
    return self

  def knobs(self):
    return np.linspace(0.0, 1.0, self.steps)

  def route(self, data, knob):
    draws = np.random.default_rng(self.seed).random(len(data))
    choice = np.where(draws < knob, self.strong, 0)
    return Decision(choice, one_member(choice, len(data.members)), uses_features=False)


@register_model_router("oracle")
class OracleRouter(ModelRouter):
  """The true qualities under the willingness to pay w: w = inf is the cheapest member of the best quality per
  query; a finite w traces the best-quality-under-budget curve (its Lagrangian relaxation)."""

  def route(self, data, knob):
    choice = willingness_choice(data.quality, data.cost, knob)
    return Decision(choice, one_member(choice, len(data.members)), uses_features=False)


class _PredictiveRouter(ModelRouter):
  """A before-generation router that predicts each member's quality from the features [Q, F] -> [Q, M]."""

  def predict(self, features) -> np.ndarray:
    raise NotImplementedError

  def route(self, data, knob):
    choice = willingness_choice(self.predict(data.features), data.cost, knob)
    return Decision(choice, one_member(choice, len(data.members)), uses_features=True)


@register_model_router("knn")
@dataclasses.dataclass
class KnnRouter(_PredictiveRouter):
  """RouterBench's KNN router: predicted quality of member m = the mean quality of m over the `k` training queries
  most similar (cosine of standardised features) to the query. k = 10 [guess; EllieSQL uses 5]."""

  family: ClassVar[str] = "similarity"
  k: int = 10

  def fit(self, train, seed=0):
    if not 1 <= self.k <= len(train):
      raise ConfigError(f"{self.registry_name}: k={self.k} must lie in [1, {len(train)}] (the training queries)")
    self._scale = _standardize(train.features)
    self._keys = self._unit(train.features)
    self._quality = np.asarray(train.quality, np.float64)
    return self

  def _unit(self, features):
    x = self._scale(features)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)

  def nearest(self, features):
    """int [Q, k]: the training queries most similar to each query, most similar first."""
    similarity = self._unit(features) @ self._keys.T
    return np.argsort(-similarity, axis=1, kind="stable")[:, : self.k]

  def predict(self, features):
    return self._quality[self.nearest(features)].mean(axis=1)


def _fit_adam(loss_fn, params, *, steps, lr, seed):
  """Full-batch Adam (optax) on `loss_fn(params)`; returns the trained params as numpy."""
  import jax
  import optax

  del seed
  tx = optax.adamw(lr, weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(steps):
    params, opt_state, _ = step(params, opt_state)
  return jax.tree.map(np.asarray, params)


def _mlp_init(rng, sizes):
  return [
    {"w": rng.normal(0.0, 1.0 / np.sqrt(a), (a, b)).astype(np.float32), "b": np.zeros(b, np.float32)}
    for a, b in zip(sizes[:-1], sizes[1:])
  ]


def _mlp_apply(params, x, np_=np):
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      x = np_.maximum(x, 0.0)
  return x


def _fit_mlp(x, sizes, output_loss, *, steps, lr, seed, rng=None):
  """The params of an MLP of layer `sizes` on x [Q, sizes[0]] (standardised features, a jax array), trained
  full-batch (`_fit_adam`) on `output_loss(outputs [Q, sizes[-1]])`; `rng` draws the initial weights (default: a
  generator of `seed`)."""
  import jax.numpy as jnp

  init = _mlp_init(np.random.default_rng(seed) if rng is None else rng, sizes)
  return _fit_adam(lambda p: output_loss(_mlp_apply(p, x, jnp)), init, steps=steps, lr=lr, seed=seed)


@register_model_router("mlp")
@dataclasses.dataclass
class MlpRouter(_PredictiveRouter):
  """RouterBench's MLP router: an MLP (one ReLU hidden layer of `hidden` units [guess]) regressing every member's
  standardised quality from the standardised features (mean squared error, Adam, full batch)."""

  family: ClassVar[str] = "supervised"
  hidden: int = 64
  steps: int = 300
  lr: float = 3e-3

  def fit(self, train, seed=0):
    import jax.numpy as jnp

    self._scale = _standardize(train.features)
    x = jnp.asarray(self._scale(train.features))
    q = np.asarray(train.quality, np.float32)
    self._q_mean, self._q_std = q.mean(0), q.std(0) + 1e-6
    y = jnp.asarray((q - self._q_mean) / self._q_std)
    sizes = (x.shape[1], self.hidden, y.shape[1])
    loss = lambda out: jnp.mean((out - y) ** 2)
    self._params = _fit_mlp(x, sizes, loss, steps=self.steps, lr=self.lr, seed=seed)
    return self

  def predict(self, features):
    return _mlp_apply(self._params, self._scale(features)) * self._q_std + self._q_mean


def win_pairs(quality):
  """The Bradley-Terry training pairs: (i [P], j [P], mask [Q, P] of the queries where they differ, label [Q, P]
  = 1 where member i's quality is higher)."""
  m = np.shape(quality)[1]
  i, j = np.triu_indices(m, 1)
  q = np.asarray(quality)
  return i, j, q[:, i] != q[:, j], (q[:, i] > q[:, j]).astype(np.float32)


@register_model_router("preference")
@dataclasses.dataclass
class PreferenceRouter(_PredictiveRouter):
  """RouteLLM's matrix-factorisation router as a Bradley-Terry model over the pool (see the module docstring);
  `dim` = 32 [guess; RouteLLM: 128]."""

  family: ClassVar[str] = "preference"
  dim: int = 32
  steps: int = 300
  lr: float = 3e-3

  def fit(self, train, seed=0):
    import jax
    import jax.numpy as jnp

    self._scale = _standardize(train.features)
    x = jnp.asarray(self._scale(train.features))
    i, j, mask, label = win_pairs(train.quality)
    if not mask.any():
      raise ConfigError("preference: every member has the same quality on every training query; nothing to learn")
    mask, label = jnp.asarray(mask, jnp.float32), jnp.asarray(label)
    rng = np.random.default_rng(seed)
    params = {
      "w1": rng.normal(0.0, 1.0 / np.sqrt(x.shape[1]), (x.shape[1], self.dim)).astype(np.float32),
      "b1": np.zeros(self.dim, np.float32),
      "v": rng.normal(0.0, 1.0, (len(train.members), self.dim)).astype(np.float32),
      "w2": rng.normal(0.0, 1.0 / np.sqrt(self.dim), (self.dim,)).astype(np.float32),
    }

    def loss(p):
      s = self._scores(p, x, jnp)
      logit = s[:, i] - s[:, j]
      bce = -label * jax.nn.log_sigmoid(logit) - (1 - label) * jax.nn.log_sigmoid(-logit)
      return jnp.sum(bce * mask) / jnp.sum(mask)

    self._params = _fit_adam(loss, params, steps=self.steps, lr=self.lr, seed=seed)
    return self

  @staticmethod
  def _scores(p, x, np_):
    """s(m, x) [Q, M] = w2 . (v_m * (W1 x + b1))."""
    h = x @ p["w1"] + p["b1"]
    return np_.einsum("qd,md,d->qm", h, p["v"], p["w2"])

  def predict(self, features):
    s = self._scores(self._params, self._scale(features), np)
    win = 1.0 / (1.0 + np.exp(-(s[:, :, None] - s[:, None, :])))
    m = s.shape[1]
    return (win.sum(axis=2) - 0.5) / max(m - 1, 1)  # the diagonal adds sigmoid(0) = 0.5


# The most training x test similarities `SwRankingRouter` holds at once (float64 entries); larger batches go in chunks.
SW_CHUNK_ENTRIES = 4_000_000


@register_model_router("sw_ranking")
@dataclasses.dataclass
class SwRankingRouter(_PredictiveRouter):
  """RouteLLM's similarity-weighted (SW) ranking router (Ong et al. 2024, section 4.1) over the whole pool.

  For a query q every training query i gets the weight w_i = gamma^(1 + S(q, q_i)), S(q, q_i) = sim(q, q_i) /
  max_j sim(q, q_j), sim the cosine similarity of the standardised features (as `knn`); gamma = 10 as in RouteLLM.
  Per query, Bradley-Terry coefficients xi [M] are fitted by weighted maximum likelihood over the training preference
  pairs (`win_pairs`: member a beats member b on training query i), P(a beats b) = sigmoid(xi_a - xi_b); a tie counts
  as half a win for each side (RouteLLM's `compute_elo_mle_with_tie`), or is left out with `count_ties=False`. The
  predicted quality of member m is its mean win probability against the others (for M = 2 the strong member's is
  RouteLLM's sigmoid(xi_strong - xi_weak)) [guess: RouteLLM routes between two models, fitting the BT model over
  tiers of Chatbot Arena models].

  The fit (numpy, float64, all queries at once): the weights are normalised to sum to 1 per query (the unpenalised
  maximum likelihood does not change) and an L2 penalty `l2` / 2 * ||xi||^2 on all M coefficients [guess] keeps a
  member that never wins finite and makes the fit unique (its optimum has mean 0, so no member is the penalty's
  anchor); `steps` damped Newton iterations (backtracking line search) on the strictly concave penalised
  log-likelihood; the coefficients are reported shifted to xi_0 = 0. If the largest similarity of a query is <= 0, S
  divides by its absolute value instead (order kept) [guess: RouteLLM's embeddings have positive similarities].
  """

  family: ClassVar[str] = "preference"
  gamma: float = 10.0
  l2: float = 1e-2
  steps: int = 30
  count_ties: bool = True

  def __post_init__(self):
    self._check()

  def _check(self):
    name = self.registry_name
    if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 1.0 <= self.gamma < np.inf:
      raise ConfigError(
        f"{name}: gamma={self.gamma!r} must be a finite number >= 1 (1: every training query weighs the same)"
      )
    if isinstance(self.l2, bool) or not isinstance(self.l2, (int, float)) or not 0.0 < self.l2 < np.inf:
      raise ConfigError(f"{name}: l2={self.l2!r} must be a finite number > 0 (it keeps the coefficients finite)")
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
      raise ConfigError(f"{name}: steps={self.steps!r} must be a positive integer (Newton iterations)")

  def fit(self, train, seed=0):
    del seed
    self._check()
    self._scale = _standardize(train.features)
    self._keys = self._unit(train.features)
    m = len(train.members)
    i, j, mask, label = win_pairs(train.quality)
    if not self.count_ties and not mask.any():
      raise ConfigError(
        f"{self.registry_name}: every member has the same quality on every training query and count_ties=False; "
        "nothing to learn"
      )
    tie = 0.5 * (~mask) if self.count_ties else np.zeros(mask.shape)
    wins = np.zeros((len(train), m, m))  # wins[n, a, b]: how much a beats b on training query n
    wins[:, i, j] = mask * label + tie
    wins[:, j, i] = mask * (1.0 - label) + tie
    self._wins = wins.reshape(len(train), m * m)
    self._num_members = m
    return self

  def _unit(self, features):
    x = np.asarray(self._scale(features), np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)

  def weights(self, features):
    """float [Q, N_train]: each query's training-query weights gamma^(1 + S), normalised to sum to 1."""
    similarity = self._unit(features) @ self._keys.T
    top = np.abs(np.max(similarity, axis=1, keepdims=True))
    log_w = (1.0 + similarity / np.maximum(top, 1e-12)) * math.log(self.gamma)
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)

  def coefficients(self, features):
    """float [Q, M]: the per-query Bradley-Terry coefficients xi (xi_0 = 0)."""
    features = np.asarray(features)
    rows = max(1, SW_CHUNK_ENTRIES // max(len(self._keys), 1))
    chunks = [self._fit_bt(self.weights(features[s : s + rows])) for s in range(0, len(features), rows)]
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, self._num_members))

  def _fit_bt(self, weights):
    """Penalised weighted BT maximum likelihood for each row of `weights` [Q, N] -> xi [Q, M] (xi_0 = 0)."""
    m = self._num_members
    wins = (weights @ self._wins).reshape(-1, m, m)  # [Q, M, M] weighted win counts
    games = wins + np.swapaxes(wins, 1, 2)

    def objective(xi):  # the negative penalised log-likelihood, [...] over the leading axes of xi [..., Q, M]
      diff = xi[..., :, None] - xi[..., None, :]
      return np.sum(wins * np.logaddexp(0.0, -diff), axis=(-2, -1)) + 0.5 * self.l2 * np.sum(xi**2, axis=-1)

    xi = np.zeros((len(wins), m))
    if m == 1:
      return xi
    ts = 0.5 ** np.arange(30)
    for _ in range(self.steps):
      p = 1.0 / (1.0 + np.exp(-(xi[:, :, None] - xi[:, None, :])))  # P(a beats b)
      grad = -np.sum(wins - games * p, axis=2) + self.l2 * xi  # [Q, M]
      curv = games * p * (1.0 - p)
      hess = np.einsum("ab,qa->qab", np.eye(m), curv.sum(axis=2) + self.l2) - curv  # [Q, M, M]
      step = np.linalg.solve(hess, -grad[:, :, None])[..., 0]
      slope = np.sum(grad * step, axis=1)  # < 0 unless converged
      if np.all(slope > -1e-14):
        break
      now = objective(xi)
      tried = objective(xi[None] + ts[:, None, None] * step[None])  # [T, Q]
      ok = tried <= now + 1e-4 * ts[:, None] * slope
      t = np.where(ok.any(axis=0), ts[np.argmax(ok, axis=0)], 0.0)
      xi = xi + t[:, None] * step
    return xi - xi[:, :1]

  def predict(self, features):
    xi = self.coefficients(features)
    win = 1.0 / (1.0 + np.exp(-(xi[:, :, None] - xi[:, None, :])))
    m = xi.shape[1]
    return (win.sum(axis=2) - 0.5) / max(m - 1, 1)  # the diagonal adds sigmoid(0) = 0.5


@register_model_router("cascade")
@dataclasses.dataclass
class CascadeRouter(ModelRouter):
  """Cascade (timing 'after'): members run from the cheapest up; the first whose confidence >= the threshold (the
  knob) answers, the last answers anyway; the cost sums every member run. Knobs: 0, the `quantiles` of the training
  confidences, and just above 1 (always the last member)."""

  family: ClassVar[str] = "cascade"
  timing: ClassVar[str] = "after"
  knob_name: ClassVar[str] = "threshold"
  quantiles: int = 41
  _knobs: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.0, 1.0 + 1e-6]))

  def fit(self, train, seed=0):
    del seed
    inner = np.quantile(train.confidence[:, :-1], np.linspace(0.0, 1.0, self.quantiles))
    self._knobs = np.unique(np.concatenate([[0.0], inner, [1.0 + 1e-6]]))
    return self

  def knobs(self):
    return self._knobs

  def route(self, data, knob):
    confident = np.asarray(data.confidence) >= knob  # [Q, M]
    confident[:, -1] = True
    choice = np.argmax(confident, axis=1)  # the first confident member
    ran = np.arange(len(data.members))[None, :] <= choice[:, None]
    return Decision(choice, ran, uses_features=False)


def _softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


@register_model_router("composition")
@dataclasses.dataclass
class CompositionRouter(_PredictiveRouter):
  """Composition of Experts (C3): category classifier (logistic regression, Adam) -> category -> member table.

  The table holds each category's mean training quality per member, shrunk toward the overall mean with `prior`
  pseudo-queries [guess]; at knob w every category goes to its member of best `w * quality - cost`. Queries whose top
  category probability is below `min_confidence` [guess: 0.5] go to the general member (best overall at that w).
  """

  family: ClassVar[str] = "supervised"
  min_confidence: float = 0.5
  prior: float = 5.0
  steps: int = 300
  lr: float = 1e-2

  def fit(self, train, seed=0):
    import jax.numpy as jnp
    import optax

    self._scale = _standardize(train.features)
    x = jnp.asarray(self._scale(train.features))
    c = len(train.categories)
    labels = jnp.asarray(train.category, jnp.int32)
    params = {"w": np.zeros((x.shape[1], c), np.float32), "b": np.zeros(c, np.float32)}
    loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], labels))
    self._params = _fit_adam(loss, params, steps=self.steps, lr=self.lr, seed=seed)
    q = np.asarray(train.quality, np.float64)
    self._overall = q.mean(axis=0)
    counts = np.bincount(train.category, minlength=c).astype(np.float64)
    sums = np.zeros((c, q.shape[1]))
    np.add.at(sums, np.asarray(train.category), q)
    self._table_quality = (sums + self.prior * self._overall) / (counts[:, None] + self.prior)
    return self

  def category_probs(self, features):
    """float [Q, categories]."""
    return _softmax(self._scale(features) @ self._params["w"] + self._params["b"])

  def predict(self, features):
    probs = self.category_probs(features)
    table = self._table_quality[np.argmax(probs, axis=1)]
    general = np.broadcast_to(self._overall, table.shape)
    return np.where(probs.max(axis=1, keepdims=True) >= self.min_confidence, table, general)


def cheapest_sufficient(quality):
  """EllieSQL's training label (`src/router/labeler.py`): per query, the cheapest member that answers correctly.

  Members are sorted by cost (column 0 cheapest). A member is sufficient when its quality equals the row's maximum;
  a row whose maximum is <= 0 (no member correct) gets the last, most expensive member (EllieSQL's default label is
  the advanced pipeline).

  Args:
    quality: float [Q, M], higher is better (1 = correct, 0 = wrong for text-to-SQL).

  Returns:
    int [Q], in [0, M).
  """
  q = np.asarray(quality, np.float64)
  if q.ndim != 2 or q.shape[1] == 0:
    raise ValueError(f"cheapest_sufficient: quality has shape {q.shape}; needs [Q, M] with M >= 1")
  best = q.max(axis=1)
  first = np.argmax(q >= best[:, None], axis=1)
  return np.where(best > 0, first, q.shape[1] - 1).astype(np.int64)


def _sufficient(quality):
  """bool [Q, M]: member m is sufficient on query q (its quality is the row's maximum and that maximum is > 0)."""
  q = np.asarray(quality, np.float64)
  best = q.max(axis=1, keepdims=True)
  return (q >= best) & (best > 0)


class _LabelRouter(ModelRouter):
  """A before-generation router trained on `cheapest_sufficient` labels, with one operating point."""

  knob_name: ClassVar[str] = "threshold"
  uses_features: ClassVar[bool] = True

  def knobs(self):
    return np.array([0.5])

  def choose(self, data: RoutingData, knob: float) -> np.ndarray:
    """int [Q]: the member of each query."""
    raise NotImplementedError

  def route(self, data, knob):
    choice = np.asarray(self.choose(data, knob), np.int64)
    return Decision(choice, one_member(choice, len(data.members)), uses_features=self.uses_features)


# The most cut-point candidates the `rule` router searches exhaustively.
RULE_SEARCH_LIMIT = 2_000_000


@register_model_router("rule")
@dataclasses.dataclass
class RuleRouter(_LabelRouter):
  """EllieSQL's TableCountRouter (`src/router/table_count_router.py`: <= 2 tables in the linked schema -> the basic
  pipeline, else the advanced one) generalised to M members: the member is the number of cut points that the
  query's `RoutingData.complexity` exceeds, `searchsorted(cuts, complexity, side='left')` clipped to M - 1.

  `cuts` (non-decreasing) fixes the rule; when None, `fit` learns M - 1 non-decreasing cut points among the unique
  training complexities and +inf by exhaustive search, maximising the training accuracy against
  `cheapest_sufficient` (ties: the first in lexicographic order of the candidates) [guess: EllieSQL fixes the cut at
  2 tables]. Reads no features, so pays no feature cost.
  """

  family: ClassVar[str] = "baseline"
  uses_features: ClassVar[bool] = False
  cuts: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.cuts is not None:
      cuts = np.asarray(self.cuts, np.float64)
      if cuts.ndim != 1 or np.any(np.isnan(cuts)) or np.any(np.diff(cuts) < 0):
        raise ConfigError(f"rule: cuts={self.cuts} must be a non-decreasing sequence of numbers")
    self._cuts = None if self.cuts is None else np.asarray(self.cuts, np.float64)

  def _complexity(self, data, where):
    if data.complexity is None:
      raise ConfigError(
        f"rule router needs RoutingData.complexity (float [Q], e.g. the number of tables) in {where}; got None"
      )
    return np.asarray(data.complexity, np.float64)

  def fit(self, train, seed=0):
    del seed
    complexity = self._complexity(train, "the training data")
    if self.cuts is not None:
      self._cuts = np.asarray(self.cuts, np.float64)
      return self
    m = len(train.members)
    labels = cheapest_sufficient(train.quality)
    values, where = np.unique(complexity, return_inverse=True)
    u = len(values)
    total = math.comb(u + 1 + m - 2, m - 1)  # (m - 1)-multisets of the u + 1 candidates
    if total > RULE_SEARCH_LIMIT:
      raise ConfigError(
        f"rule: learning {m - 1} cut points over {u} distinct complexity values means {total} candidates "
        f"(> {RULE_SEARCH_LIMIT}); pass cuts= or bin the complexity"
      )
    counts = np.zeros((u, m))
    np.add.at(counts, (where.ravel(), labels), 1.0)
    cum = np.concatenate([np.zeros((1, m)), np.cumsum(counts, axis=0)])  # cum[j] = label counts of values < j
    combos = list(itertools.combinations_with_replacement(range(u + 1), m - 1))  # in lexicographic order
    combos = np.array(combos, np.int64).reshape(len(combos), m - 1)
    # Member k takes the values of index in (i_k, i_{k+1}], with i_0 = -1 and i_M = u - 1; index u is +inf.
    ends = np.ones((len(combos), 1), np.int64)
    bounds = np.concatenate([-ends, np.minimum(combos, u - 1), (u - 1) * ends], axis=1)
    correct = sum(cum[bounds[:, k + 1] + 1, k] - cum[bounds[:, k] + 1, k] for k in range(m))
    best = combos[int(np.argmax(correct))]
    self._cuts = np.append(values, np.inf)[best]
    return self

  @property
  def learned_cuts(self) -> np.ndarray:
    """float [<= M - 1]: the cut points in use (after `fit`)."""
    return self._cuts

  def choose(self, data, knob):
    del knob
    complexity = self._complexity(data, "the data to route")
    if self._cuts is None:
      raise ConfigError("rule: no cut points; call fit first or pass cuts=")
    return np.minimum(np.searchsorted(self._cuts, complexity, side="left"), len(data.members) - 1)


@register_model_router("label_knn")
@dataclasses.dataclass
class LabelKnnRouter(KnnRouter, _LabelRouter):
  """EllieSQL's kNN classifier router (`src/router/knn_classifier_router.py`, k = 5): the majority
  `cheapest_sufficient` label among the `k` training queries most similar to the query (cosine of standardised
  features, as `knn`); ties between labels go to the cheaper label."""

  family: ClassVar[str] = "similarity"
  k: int = 5

  def fit(self, train, seed=0):
    super().fit(train, seed)
    self._labels = cheapest_sufficient(train.quality)
    self._num_members = len(train.members)
    return self

  def votes(self, features):
    """int [Q, M]: how many of the k neighbours carry each label."""
    labels = self._labels[self.nearest(features)]  # [Q, k]
    return (labels[:, :, None] == np.arange(self._num_members)).sum(axis=1)

  def predict(self, features):
    return self.votes(features) / self.k

  def choose(self, data, knob):
    del knob
    return np.argmax(self.votes(data.features), axis=1)  # the first maximum: the cheaper label

  # One operating point: the label routers' route, not the willingness-to-pay route of KnnRouter's base.
  route = _LabelRouter.route
  knobs = _LabelRouter.knobs


@register_model_router("classifier")
@dataclasses.dataclass
class ClassifierRouter(_LabelRouter):
  """EllieSQL's classifier router (`src/router/roberta_classifier_router.py`, a fine-tuned encoder classifying the
  pipeline): here an MLP (one ReLU hidden layer of `hidden` units [guess]) on the standardised features, trained with
  softmax cross-entropy on the `cheapest_sufficient` label (full-batch Adam, `steps`, `lr` [guess]); route = argmax."""

  family: ClassVar[str] = "supervised"
  hidden: int = 64
  steps: int = 300
  lr: float = 1e-2

  def fit(self, train, seed=0):
    import jax.numpy as jnp
    import optax

    self._scale = _standardize(train.features)
    x = jnp.asarray(self._scale(train.features))
    labels = jnp.asarray(cheapest_sufficient(train.quality), jnp.int32)
    sizes = (x.shape[1], self.hidden, len(train.members))
    loss = lambda out: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, labels))
    self._params = _fit_mlp(x, sizes, loss, steps=self.steps, lr=self.lr, seed=seed)
    return self

  def logits(self, features):
    """float [Q, M]."""
    return _mlp_apply(self._params, self._scale(features))

  def choose(self, data, knob):
    del knob
    return np.argmax(self.logits(data.features), axis=1)


@register_model_router("binary_cascade")
@dataclasses.dataclass
class BinaryCascadeRouter(_LabelRouter):
  """EllieSQL's cascade router (`src/router/roberta_cascade_router.py`): for every member i < M - 1 a binary
  classifier of "member i answers correctly" (target: i is sufficient, its quality is the row's maximum and that
  maximum is > 0); routing walks the members in cost order and takes the first whose probability is >= the threshold
  (the knob, 0.5 as in EllieSQL), else the last member. Only the chosen member runs: the classifiers read the
  question, not the members' answers, so the timing is 'before'. Each classifier is a logistic regression on the
  standardised features (`hidden` = 0) or an MLP with one hidden layer of `hidden` units [guess: EllieSQL fine-tunes
  an encoder per pipeline]; sigmoid cross-entropy, full-batch Adam."""

  family: ClassVar[str] = "supervised"
  hidden: int = 0
  steps: int = 300
  lr: float = 1e-2

  def fit(self, train, seed=0):
    import jax.numpy as jnp
    import optax

    if self.hidden < 0:
      raise ConfigError(f"binary_cascade: hidden={self.hidden} must be >= 0 (0: logistic regression)")
    self._scale = _standardize(train.features)
    x = jnp.asarray(self._scale(train.features))
    target = _sufficient(train.quality).astype(np.float32)
    sizes = (x.shape[1],) + ((self.hidden,) if self.hidden else ()) + (1,)
    rng = np.random.default_rng(seed)
    self._params = []
    for i in range(len(train.members) - 1):
      y = jnp.asarray(target[:, i])
      loss = lambda out, y=y: jnp.mean(optax.sigmoid_binary_cross_entropy(out[:, 0], y))
      self._params.append(_fit_mlp(x, sizes, loss, steps=self.steps, lr=self.lr, seed=seed, rng=rng))
    return self

  def probs(self, features):
    """float [Q, M - 1]: P(member i is sufficient) for every member but the last."""
    x = self._scale(features)
    z = np.stack([_mlp_apply(p, x)[:, 0] for p in self._params], axis=1).reshape(len(x), len(self._params))
    return 1.0 / (1.0 + np.exp(-z))

  def choose(self, data, knob):
    accept = np.concatenate([self.probs(data.features) >= knob, np.ones((len(data), 1), bool)], axis=1)
    return np.argmax(accept, axis=1)  # the first accepted member


def label_preference_pairs(num_members):
  """bool [M, M, M]: pairs[label, a, b] = member a is preferred over member b for a query of that label.

  EllieSQL's pairwise data (`prepare_pairwise_data.py`, three pipelines): label 0: 0 > 1, 0 > 2; label 1: 1 > 0,
  1 > 2, 2 > 0; label 2: 2 > 1, 2 > 0. For M members [guess]: the label beats every other member, and every member
  above the label (costlier, so also correct) beats every member below it.
  """
  m = num_members
  label, a, b = np.meshgrid(np.arange(m), np.arange(m), np.arange(m), indexing="ij")
  return ((a == label) & (b != label)) | ((a > label) & (b < label))


@register_model_router("pairwise")
@dataclasses.dataclass
class PairwiseRouter(_LabelRouter):
  """EllieSQL's pairwise ranking router (`src/router/qwen_pairwise_router.py`): a scoring MLP s(x) -> [M] (one ReLU
  hidden layer of `hidden` units [guess]) on the standardised features, trained on the preference pairs of
  `label_preference_pairs` for each query's `cheapest_sufficient` label with the loss -log sigmoid(s_chosen -
  s_rejected) averaged over pairs (full-batch Adam); route = the member of highest score (ties: the cheaper)."""

  family: ClassVar[str] = "preference"
  hidden: int = 64
  steps: int = 300
  lr: float = 1e-2

  def fit(self, train, seed=0):
    import jax
    import jax.numpy as jnp

    self._scale = _standardize(train.features)
    x = jnp.asarray(self._scale(train.features))
    m = len(train.members)
    pairs = jnp.asarray(label_preference_pairs(m)[cheapest_sufficient(train.quality)], jnp.float32)  # [Q, M, M]
    count = max(float(pairs.sum()), 1.0)

    loss = lambda s: -jnp.sum(pairs * jax.nn.log_sigmoid(s[:, :, None] - s[:, None, :])) / count
    sizes = (x.shape[1], self.hidden, m)
    self._params = _fit_mlp(x, sizes, loss, steps=self.steps, lr=self.lr, seed=seed)
    return self

  def scores(self, features):
    """float [Q, M]."""
    return _mlp_apply(self._params, self._scale(features))

  def choose(self, data, knob):
    del knob
    return np.argmax(self.scores(data.features), axis=1)


def make_router(name, **options):
  """A router instance by registered name (`MODEL_ROUTERS`)."""
  cls = MODEL_ROUTERS.get(name)
  return cls(**options)
