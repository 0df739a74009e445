"""AdaptDHM (`zoo.models.adaptdhm`) and the CTR task (`zoo.tasks.ctr`): binned AUC and log-loss against scikit-learn,
the centre update by hand, per-cluster tower weights, the two baselines, parameter counts, and a short training run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from zoo.models import ConfigError, build_model
from zoo.models.adaptdhm import normalize
from zoo.tasks.base import get_task, reduce_sums
from zoo.tasks.ctr import auc_from_histograms

CARDS = (5, 6)
NUMERIC = 2
DOMAINS = ("search", "feed", "ads")
SMALL = dict(name="adaptdhm", cardinalities=CARDS, numeric_features=NUMERIC, num_domains=3, embed_dim=4)
SMALL["tower_dims"] = (8, 4)


def _info(domains=DOMAINS):
  return {
    "format": "arrays",
    "features": {
      "categorical": ((len(CARDS),), "int32"),
      "numeric": ((NUMERIC,), "float32"),
      "domain": ((), "int32"),
      "label": ((), "int32"),
    },
    "num_classes": 2,
    "label_names": ("no_click", "click"),
    "domains": domains,
    "cardinalities": CARDS,
    "field_names": ("user", "item"),
    "numeric_names": ("price", "age"),
  }


def synthetic_ctr_batches(seed, batch=64):
  """Endless numpy batches of the 'arrays' format: two categorical fields, two numeric features, a domain given by
  the second field (domain = item % 3), and clicks drawn from a logistic rule whose sign on `numeric[:, 0]` depends
  on the domain (so one tower fits worse than one per distribution)."""
  rng = np.random.default_rng(seed)
  while True:
    categorical = np.stack([rng.integers(0, c, batch) for c in CARDS], axis=1).astype(np.int32)
    numeric = rng.normal(size=(batch, NUMERIC)).astype(np.float32)
    domain = (categorical[:, 1] % 3).astype(np.int32)
    sign = np.where(domain == 1, -1.0, 1.0)
    logit = 2.5 * sign * numeric[:, 0] + np.where(categorical[:, 0] % 2 == 1, 1.0, -1.0)
    label = (rng.random(batch) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    yield {
      "categorical": categorical,
      "numeric": numeric,
      "domain": domain,
      "label": label,
      "weight": np.ones(batch, np.float32),
    }


def _inputs(batch):
  return {k: jnp.asarray(batch[k]) for k in ("categorical", "numeric", "domain")}


def _init(config, batch):
  model = build_model(config)
  return model, jax.jit(lambda r: nn.unbox(model.init(r, **_inputs(batch))))(jax.random.key(1))


@pytest.fixture(scope="module")
def batch():
  return next(synthetic_ctr_batches(0, batch=32))


# ---------------------------------------------------------------------------------------------------------------------
# The task: binned AUC and log-loss


def test_auc_from_histograms_by_hand():
  # bins 0 < 1 < 2: positives in bins 1 and 2, negatives in bins 0 and 1. Pairs (pos, neg): (1, 0) wins, (1, 1) ties
  # (1/2), (2, 0) and (2, 1) win: 3.5 of 4.
  assert auc_from_histograms([0, 1, 1], [1, 1, 0]) == pytest.approx(0.875)
  scores, labels = np.array([1, 2, 0, 1]), np.array([1, 1, 0, 0])
  assert auc_from_histograms([0, 1, 1], [1, 1, 0]) == pytest.approx(roc_auc_score(labels, scores))
  assert np.isnan(auc_from_histograms([0, 0, 0], [1, 2, 0]))  # no positive: undefined


def _scored_batches(seed, n, rows):
  """Random (logits, labels, weights, domains) with ties (half the scores from 40 values) and zero weights."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    p = np.where(rng.random(rows) < 0.5, rng.choice(np.linspace(0.02, 0.98, 40), rows), rng.uniform(0.01, 0.99, rows))
    label = (rng.random(rows) < p).astype(np.int32)
    weight = np.where(rng.random(rows) < 0.2, 0.0, rng.uniform(0.5, 2.0, rows)).astype(np.float32)
    domain = rng.integers(0, len(DOMAINS), rows).astype(np.int32)
    logits = np.log(p / (1 - p)).astype(np.float32)
    out.append((logits, label, weight, domain))
  return out


def test_ctr_metrics_match_sklearn():
  task = get_task("ctr", {"num_domains": len(DOMAINS)})
  stats = jax.jit(lambda logits, batch: task.stats(logits, {}, batch))
  batches = _scored_batches(0, n=5, rows=200)
  sums = [stats(logits, {"label": y, "weight": w, "domain": d}) for logits, y, w, d in batches]
  metrics = task.finalize(reduce_sums([jax.device_get(s) for s in sums]), _info())
  logits, y, w, d = (np.concatenate(x) for x in zip(*batches))
  p = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)), np.float64)  # the scores the task bins
  assert metrics["auc"] == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-3)
  assert metrics["log_loss"] == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-5)
  assert metrics["loss"] == metrics["log_loss"]
  assert metrics["click_rate"] == pytest.approx(np.sum(w * y) / np.sum(w), rel=1e-6)
  for i, name in enumerate(DOMAINS):
    m = d == i
    assert metrics[f"auc/{name}"] == pytest.approx(roc_auc_score(y[m], p[m], sample_weight=w[m]), abs=1e-3)
    assert metrics[f"log_loss/{name}"] == pytest.approx(log_loss(y[m], p[m], sample_weight=w[m]), rel=1e-5)


def test_ctr_without_domains_and_bad_options():
  task = get_task("ctr", {"auc_bins": 64})
  logits, y, w, d = _scored_batches(1, n=1, rows=50)[0]
  sums = task.stats(jnp.asarray(logits)[:, None], {}, {"label": y, "weight": w, "domain": d})  # [B, 1] is read as [B]
  assert sums["hist_pos"].shape == (64,) and not any(k.startswith("domain_") for k in sums)
  assert sorted(task.finalize(jax.device_get(sums), _info())) == ["auc", "click_rate", "log_loss", "loss"]
  for options, key in (({"auc_bins": 1}, "auc_bins"), ({"num_domains": -1}, "num_domains"), ({"bins": 2}, "bins")):
    with pytest.raises(ConfigError, match=key):
      get_task("ctr", options)


def test_ctr_batch_spec_and_prepare(batch):
  task = get_task("ctr", {"num_domains": 3})
  spec = task.batch_spec(_info(), None, 8)
  assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
    "categorical": ((8, 2), jnp.int32),
    "numeric": ((8, 2), jnp.float32),
    "domain": ((8,), jnp.int32),
    "label": ((8,), jnp.int32),
    "weight": ((8,), jnp.float32),
  }
  inputs, targets = task.prepare(batch, {})
  assert sorted(inputs) == ["categorical", "domain", "numeric"] and targets == {}
  with pytest.raises(ConfigError, match="num_domains=3 .* 2 domains"):
    task.batch_spec(_info(domains=("a", "b")), None, 8)
  info = _info()
  del info["features"]["numeric"]
  with pytest.raises(ConfigError, match="numeric"):
    task.batch_spec(info, None, 8)


# ---------------------------------------------------------------------------------------------------------------------
# The model: config and inputs


@pytest.mark.parametrize(
  "change, key",
  [
    (dict(assignment="experts"), "assignment"),
    (dict(num_clusters=0), "num_clusters"),
    (dict(beta=1.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(iterations=0), "iterations"),
    (dict(centre_update="median"), "centre_update"),
    (dict(temperature=0.0), "temperature"),
    (dict(cardinalities=(3, 0)), "cardinalities"),
    (dict(tower_dims=(8, 0)), "tower_dims"),
    (dict(cardinalities=(), numeric_features=0), "cardinalities"),
  ],
)
def test_config_errors_name_the_key(change, key):
  with pytest.raises(ConfigError, match=f"config.model.{key}"):
    build_model({**SMALL, **change})


def test_config_error_lists_the_assignments():
  with pytest.raises(ConfigError, match="'clusters', 'shared', 'domain'"):
    build_model({**SMALL, "assignment": "experts"})


def test_input_errors(batch):
  model = build_model(SMALL)
  good = _inputs(batch)
  bad = [
    dict(good, categorical=good["categorical"][:, :1]),  # width != len(cardinalities)
    dict(good, categorical=good["categorical"].astype(jnp.float32)),
    dict(good, numeric=good["numeric"][:, 0]),
    dict(good, domain=good["domain"][:, None]),
  ]
  for inputs in bad:
    with pytest.raises(ValueError, match="must be"):
      model.init(jax.random.key(0), **inputs)
  with pytest.raises(ValueError, match="needs domain"):
    build_model({**SMALL, "assignment": "domain"}).init(jax.random.key(0), good["categorical"], good["numeric"])


# ---------------------------------------------------------------------------------------------------------------------
# The distribution-adaptation module


@pytest.mark.parametrize("reduction, temperature", [("mean", 1.0), ("sum", 1.0), ("mean", 0.5)])
def test_centre_update_by_hand(reduction, temperature):
  # Numeric features only, so x is the input itself: rows (1, 0), (0, 2), (3, 0) -> x_n = (1, 0), (0, 1), (1, 0).
  model = build_model(
    dict(
      name="adaptdhm",
      cardinalities=(),
      numeric_features=2,
      num_clusters=2,
      beta=0.5,
      iterations=1,
      centre_update=reduction,
      temperature=temperature,
      tower_dims=(4,),
    )
  )
  categorical = jnp.zeros((3, 0), jnp.int32)
  numeric = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
  variables = nn.unbox(model.init(jax.random.key(0), categorical, numeric))
  variables["clusters"]["centres"] = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  (_, out), state = model.apply(
    variables, categorical, numeric, deterministic=False, mutable=["clusters", "intermediates"]
  )
  # Similarities x_n C^T: rows 0 and 2 are (1, 0), row 1 is (0, 1); softmax with temperature t: a = e^(1/t) /
  # (1 + e^(1/t)) on the match, b = 1 - a.
  a = np.exp(1 / temperature) / (1 + np.exp(1 / temperature))
  b = 1 - a
  n = 3.0 if reduction == "mean" else 1.0
  pulled_0 = np.array([a + a, b]) / n  # a (1, 0) + b (0, 1) + a (1, 0)
  pulled_1 = np.array([b + b, a]) / n  # b (1, 0) + a (0, 1) + b (1, 0)
  c0 = 0.5 * np.array([1.0, 0.0]) + 0.5 * pulled_0
  c1 = 0.5 * np.array([0.0, 1.0]) + 0.5 * pulled_1
  expected = np.stack([c0 / np.linalg.norm(c0), c1 / np.linalg.norm(c1)])
  np.testing.assert_allclose(state["clusters"]["centres"], expected, rtol=1e-6)
  x_n = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  np.testing.assert_array_equal(state["intermediates"]["cluster_ids"], np.argmax(x_n @ expected.T, axis=1))
  assert float(out.metrics["cluster_load"].sum()) == pytest.approx(1.0)


def test_centres_stay_unit_norm_and_eval_keeps_them(batch):
  model, variables = _init(SMALL, batch)
  assert "clusters" not in variables["params"] and variables["clusters"]["centres"].shape == (4, 2 * 4 + 2)
  np.testing.assert_allclose(jnp.linalg.norm(variables["clusters"]["centres"], axis=-1), 1.0, rtol=1e-6)
  train = jax.jit(lambda v, x: model.apply(v, **x, deterministic=False, mutable=["clusters"]))
  evaluate = jax.jit(lambda v, x: model.apply(v, **x, deterministic=True, mutable=["clusters"]))
  before = variables["clusters"]["centres"]
  batches = synthetic_ctr_batches(1, batch=32)
  for _ in range(3):
    _, state = train(variables, _inputs(next(batches)))
    variables = {**variables, **state}
  after = variables["clusters"]["centres"]
  assert not np.allclose(after, before)
  np.testing.assert_allclose(jnp.linalg.norm(after, axis=-1), 1.0, rtol=1e-6)
  _, state = evaluate(variables, _inputs(batch))
  np.testing.assert_array_equal(state["clusters"]["centres"], after)
  # Training without 'clusters' mutable assigns with the updated centres all the same and stores nothing.
  (logits, _), state = train(variables, _inputs(batch))
  immutable = model.apply(variables, **_inputs(batch), deterministic=False)[0]
  np.testing.assert_allclose(immutable, logits, rtol=1e-6)


def test_no_gradient_reaches_the_centres(batch):
  model, variables = _init(SMALL, batch)

  def loss(params, clusters, deterministic):
    out = model.apply({"params": params, "clusters": clusters}, **_inputs(batch), deterministic=deterministic)
    return jnp.sum(out[0] ** 2)

  for deterministic in (True, False):
    g_params, g_clusters = jax.grad(loss, argnums=(0, 1))(variables["params"], variables["clusters"], deterministic)
    assert float(jnp.max(jnp.abs(g_clusters["centres"]))) == 0.0
    assert float(jnp.max(jnp.abs(g_params["towers"]["kernel_0"]))) > 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Per-group tower weights and the baselines


def _logits_and_ids(model, variables, batch):
  (logits, _), state = model.apply(variables, **_inputs(batch), mutable=["intermediates"])
  return np.asarray(logits), np.asarray(state["intermediates"]["cluster_ids"])


def _perturb_group(variables, group, seed=0):
  """The variables with every per-group weight and bias of `group` changed."""
  params = jax.tree.map(lambda x: x, variables["params"])
  towers = dict(params["towers"])
  rng = np.random.default_rng(seed)
  for name in [k for k in towers if k.startswith("group_")]:
    value = np.array(towers[name])
    value[group] += rng.normal(size=value[group].shape).astype(np.float32)
    towers[name] = jnp.asarray(value)
  return {**variables, "params": {**params, "towers": towers}}


def test_cluster_towers_start_as_the_shared_tower_and_are_separate(batch):
  model, variables = _init({**SMALL, "num_clusters": 3}, batch)
  shared_model = build_model({**SMALL, "assignment": "shared"})
  shared_params = {
    **variables["params"],
    "towers": {k: v for k, v in variables["params"]["towers"].items() if not k.startswith("group_")},
  }
  logits, ids = _logits_and_ids(model, variables, batch)
  shared_logits, shared_ids = _logits_and_ids(shared_model, {"params": shared_params}, batch)
  np.testing.assert_allclose(logits, shared_logits, rtol=1e-5, atol=1e-6)  # W^(k) = ones: every tower is the shared
  assert (shared_ids == 0).all()
  group = int(ids[0])
  assert (ids != group).any(), "the test batch needs rows of more than one cluster"
  changed, changed_ids = _logits_and_ids(model, _perturb_group(variables, group), batch)
  np.testing.assert_array_equal(changed_ids, ids)  # evaluation: the stored centres, the same assignment
  mine = ids == group
  assert np.all(np.abs(changed[mine] - logits[mine]) > 1e-6)
  np.testing.assert_array_equal(changed[~mine], logits[~mine])


def test_domain_assignment_uses_the_given_domain(batch):
  model, variables = _init({**SMALL, "assignment": "domain"}, batch)
  assert "clusters" not in variables
  assert variables["params"]["towers"]["group_scale_0"].shape == (3, 2 * 4 + 2, 8)
  logits, ids = _logits_and_ids(model, variables, batch)
  np.testing.assert_array_equal(ids, batch["domain"])
  changed, _ = _logits_and_ids(model, _perturb_group(variables, 1), batch)
  mine = batch["domain"] == 1
  assert mine.any() and (~mine).any()
  assert np.all(np.abs(changed[mine] - logits[mine]) > 1e-6)
  np.testing.assert_array_equal(changed[~mine], logits[~mine])
  _, out = model.apply(variables, **_inputs(batch))
  np.testing.assert_allclose(out.metrics["cluster_load"], np.bincount(batch["domain"], minlength=3) / len(ids))


@pytest.mark.parametrize("assignment, groups", [("clusters", 4), ("domain", 3), ("shared", 0)])
def test_param_counts(batch, assignment, groups):
  model, variables = _init({**SMALL, "assignment": assignment}, batch)
  d = len(CARDS) * 4 + NUMERIC
  tower = (d * 8 + 8) + (8 * 4 + 4) + (4 * 1 + 1)
  expected = sum(CARDS) * 4 + (1 + groups) * tower
  assert model.num_params() == expected == sum(x.size for x in jax.tree.leaves(variables["params"]))
  has_groups = any(k.startswith("group_") for k in variables["params"]["towers"])
  assert has_groups == (groups > 0)
  assert ("clusters" in variables) == (assignment == "clusters")


# ---------------------------------------------------------------------------------------------------------------------
# Training


def test_short_training_lowers_the_loss():
  task = get_task("ctr", {"num_domains": 3})
  batches = synthetic_ctr_batches(2, batch=128)
  held_out = next(synthetic_ctr_batches(3, batch=512))
  model, variables = _init({**SMALL, "num_clusters": 3}, held_out)
  tx = optax.adam(3e-2)
  opt_state = tx.init(variables["params"])

  def loss_fn(params, clusters, batch):
    inputs, targets = task.prepare(batch, {})
    (logits, _), state = model.apply(
      {"params": params, "clusters": clusters}, **inputs, deterministic=False, mutable=["clusters"]
    )
    stats = task.stats(logits, targets, batch)
    return stats["loss_sum"] / stats["weight"], state["clusters"]

  @jax.jit
  def step(params, clusters, opt_state, batch):
    (loss, clusters), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, clusters, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), clusters, opt_state, loss

  @jax.jit
  def eval_sums(variables, batch):
    inputs, targets = task.prepare(batch, {})
    logits, _ = model.apply(variables, **inputs)
    return task.stats(logits, targets, batch)

  before = task.finalize(jax.device_get(eval_sums(variables, held_out)), _info())
  params, clusters = variables["params"], variables["clusters"]
  for _ in range(60):
    params, clusters, opt_state, _ = step(params, clusters, opt_state, next(batches))
  after = task.finalize(jax.device_get(eval_sums({"params": params, "clusters": clusters}, held_out)), _info())
  assert after["loss"] < 0.8 * before["loss"], (before, after)
  assert after["auc"] > before["auc"] + 0.1 and after["auc"] > 0.75, (before, after)
  assert not np.allclose(clusters["centres"], variables["clusters"]["centres"])  # updated through mutable=['clusters']
  np.testing.assert_allclose(jnp.linalg.norm(clusters["centres"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(normalize(clusters["centres"]), clusters["centres"], rtol=1e-6)
