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
query q), feature_cost [Q], features [Q, F], confidence [Q, M], category int [Q]; members sorted by cost.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from zoo.registry import ConfigError, Registry

FAMILIES = ("baseline", "similarity", "supervised", "cascade", "preference", "rl")
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
  """

  quality: np.ndarray
  cost: np.ndarray
  features: np.ndarray
  feature_cost: np.ndarray
  confidence: np.ndarray
  category: np.ndarray
  members: tuple[str, ...]
  categories: tuple[str, ...] = ("all",)

  def __post_init__(self):
    q, m = np.shape(self.quality)
    shapes = {
      "cost": (np.shape(self.cost), (q, m)),
      "confidence": (np.shape(self.confidence), (q, m)),
      "feature_cost": (np.shape(self.feature_cost), (q,)),
      "category": (np.shape(self.category), (q,)),
      "features": (np.shape(self.features)[:1], (q,)),
    }
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
      raise ConfigError(f"knn: k={self.k} must lie in [1, {len(train)}] (the training queries)")
    self._scale = _standardize(train.features)
    self._keys = self._unit(train.features)
    self._quality = np.asarray(train.quality, np.float64)
    return self

  def _unit(self, features):
    x = self._scale(features)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)

  def predict(self, features):
    similarity = self._unit(features) @ self._keys.T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, : self.k]
    return self._quality[nearest].mean(axis=1)


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
    loss = lambda p: jnp.mean((_mlp_apply(p, x, jnp) - y) ** 2)
    self._params = _fit_adam(
      loss, _mlp_init(np.random.default_rng(seed), sizes), steps=self.steps, lr=self.lr, seed=seed
    )
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


def make_router(name, **options):
  """A router instance by registered name (`MODEL_ROUTERS`)."""
  cls = MODEL_ROUTERS.get(name)
  return cls(**options)
