"""Multi-domain click-through-rate (CTR) data, for AdaptDHM and its baselines (one shared tower; one tower per domain).

Two sources, one row format: `categorical` int32 [F] (per field, the value's vocabulary index in
[0, cardinality_f), 0 = out of vocabulary: a value seen fewer than `MIN_COUNT` times in the train split, or only
outside it), `numeric` float32 [N] (standardized with the train split's mean and standard deviation), `domain` (the
domain index) and `label` (1 = click).

* `ctr_domains` (`CtrDomains`, always available): a seeded GENERATOR, `generate()`, not a real log. One "world"
  (value embeddings, popularity orders, the user -> segment and item -> category maps, cluster click models) is
  drawn from the seed; rows are drawn from it i.i.d.:
  - D = 4 domains ('feed', 'video', 'search', 'mall'), of 40 / 25 / 20 / 15% of the rows;
  - categorical fields `FIELD_NAMES`: `user` (2000) and `item` (3000) are Zipf-popular (exponent 1.1) over a
    per-domain popularity order ('video' keeps 80% of the 'feed' item order and half its user order, 'search' and
    'mall' have their own; the user and item ids are shared by all domains), `category`
    (40, Zipf-sized groups of items) and `segment` (12) are functions of the item and the user, `hour` (24) follows a
    per-domain daily profile, `device` (5) and `position` (the slot, 8) per-domain categorical / geometric laws;
  - numeric fields `NUMERIC_NAMES`: `user_activity` (normal per user, plus noise), `log_price` (normal per category
    and item, shifted per domain: 'mall' dearest) and `log_recency` (log1p of an exponential with a per-domain mean);
  - clicks: each row belongs to one of K = 3 latent clusters that cross domains, drawn from p(c | domain, segment)
    ~ `CLUSTER_MIX[domain][c]` * affinity[segment, c] (so the cluster is partly readable from the features: 'feed' and
    'video' are mostly cluster 0 and alike, 'search' mostly cluster 1, 'mall' mixes 1 and 2). The click logit is
    bias[domain] + position bias + 0.7 u . z + 1.2 w_c . z + beta_c . numeric, where z is the sum of the row's shared
    value embeddings (k = 8) and u, w_c, beta_c are a shared and per-cluster logistic models (the true click
    probability ranks the clicks of a domain with an AUC of about 0.82-0.89); bias[domain] is solved
    for the base click rate `DOMAIN_CLICK_RATES` (12 / 8 / 25 / 5%). So domains differ both in their feature
    distributions and in how features relate to clicks, and some (feed, video) are similar.
  Vocabulary: index = raw value + 1 when the value is seen at least `MIN_COUNT` times in train, else 0, so the
  cardinalities (`CARDINALITIES`, raw size + 1) are fixed. Split: the first `TRAIN_SIZE` rows (80,000) are train, the
  next `TEST_SIZE` (20,000) test (rows are i.i.d., so this is a random 80/20 split).
* `ctr_movielens100k` (`CtrMovielens100k`, needs the optional package `recbole==1.2.1`, which ships the file): the
  real MovieLens-100K ratings (GroupLens; 100,000 ratings of 1682 films by 943 users, Sep 1997 - Apr 1998) in
  RecBole's atomic-file format, `recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}` (RecBole is MIT; no
  licence for the data ships with it: GroupLens' terms for MovieLens are research use with citation, Harper &
  Konstan, 2015). Read as plain text, without importing
  recbole (the package is located with `importlib.util.find_spec`, which runs none of its code). Click = rating >= 4
  (55% of the ratings); domain = the film's first listed genre, grouped (`MOVIELENS_DOMAINS`); fields
  `MOVIELENS_FIELD_NAMES` (user, item, age group, gender, occupation, zip prefix, release decade, genre); numeric
  `MOVIELENS_NUMERIC_NAMES` (user age, release year, the number of genres). Split by time: the first 80% of the
  ratings by timestamp are train, the rest test (80,000 / 20,000; MovieLens users arrive over time, so 85% of the test
  rows have a user unseen in train, index 0). Vocabulary: the train values seen at least `MIN_COUNT` times, in
  sorted order, get 1..V; the cardinalities of the pinned file are in `MOVIELENS_FORMAT_INFO`.

How this differs from the data of the AdaptDHM paper (industrial multi-domain impression logs of business domains,
far larger, with many more sparse ID features and real, unknown distribution shifts between and within domains): the
generator's clusters and domain differences are planted and known, with a few fields and 100k rows; MovieLens is
small, its "clicks" are thresholded explicit ratings rather than clicks on impressions, and its domains are genre
groups of the catalogue, not serving scenarios.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

MIN_COUNT = 2  # a categorical value seen fewer times in the train split maps to 0 (out of vocabulary)

# --- The generator ---------------------------------------------------------------------------------------------------

FIELD_NAMES = ("user", "item", "category", "segment", "hour", "device", "position")
FIELD_SIZES = (2000, 3000, 40, 12, 24, 5, 8)  # raw values 0..size-1
CARDINALITIES = tuple(size + 1 for size in FIELD_SIZES)  # index 0 = out of vocabulary
NUMERIC_NAMES = ("user_activity", "log_price", "log_recency")
DOMAIN_NAMES = ("feed", "video", "search", "mall")
DOMAIN_SHARES = (0.40, 0.25, 0.20, 0.15)
DOMAIN_CLICK_RATES = (0.12, 0.08, 0.25, 0.05)
NUM_CLUSTERS = 3
CLUSTER_MIX = ((0.80, 0.15, 0.05), (0.70, 0.20, 0.10), (0.05, 0.85, 0.10), (0.10, 0.30, 0.60))
TRAIN_SIZE, TEST_SIZE = 80_000, 20_000
SEED = 0

_EMBED_DIM = 8
_ZIPF_EXPONENT = 1.1
_ITEMS_SHARED_BY_VIDEO = 0.8  # 'video' keeps this fraction of the 'feed' popularity order
_DEVICE_MIX = ((0.55, 0.30, 0.10, 0.04, 0.01), (0.80, 0.15, 0.03, 0.01, 0.01), (0.20, 0.20, 0.50, 0.05, 0.05),
               (0.35, 0.35, 0.10, 0.15, 0.05))  # fmt: skip
_HOUR_PEAKS = ((8.0, 21.0), (12.0, 22.0), (10.0, 15.0), (13.0, 20.0))  # two daily peaks per domain
_POSITION_DECAY = (0.35, 0.25, 0.6, 0.3)  # geometric parameter of the slot, per domain
_PRICE_SCALE = (0.0, -0.3, 0.2, 0.8)  # added to the log price, per domain
_RECENCY_SCALE = (2.0, 0.5, 5.0, 10.0)  # mean of the exponential recency, per domain
_CLUSTER_NUMERIC = ((0.6, -0.2, 0.0), (0.1, 0.5, -0.3), (-0.2, -0.8, -0.4))  # beta_c over the standardized numeric


def _zipf_probs(n: int, exponent: float = _ZIPF_EXPONENT) -> np.ndarray:
  p = 1.0 / np.arange(1, n + 1) ** exponent
  return p / p.sum()


def _partial_shuffle(rng: np.random.Generator, order: np.ndarray, keep: float) -> np.ndarray:
  """`order` with a random (1 - keep) fraction of its positions permuted among themselves."""
  order = order.copy()
  moved = rng.choice(len(order), size=int(round((1 - keep) * len(order))), replace=False)
  order[moved] = order[rng.permutation(moved)]
  return order


def _world(seed: int) -> dict:
  """Everything shared by the rows of one seed: popularity orders, value maps, embeddings, click models."""
  rng = np.random.default_rng([seed, 0])
  n_user, n_item, n_cat, n_seg = FIELD_SIZES[:4]
  w = {}
  feed_items = rng.permutation(n_item)
  w["item_order"] = [
    feed_items,
    _partial_shuffle(rng, feed_items, _ITEMS_SHARED_BY_VIDEO),
    rng.permutation(n_item),
    rng.permutation(n_item),
  ]
  feed_users = rng.permutation(n_user)
  w["user_order"] = [
    feed_users,
    _partial_shuffle(rng, feed_users, 0.5),
    rng.permutation(n_user),
    rng.permutation(n_user),
  ]
  w["item_category"] = rng.choice(n_cat, size=n_item, p=_zipf_probs(n_cat, 0.8))
  w["user_segment"] = rng.integers(0, n_seg, size=n_user)
  w["user_activity"] = rng.normal(0.0, 0.8, size=n_user)
  w["category_price"] = rng.normal(3.0, 0.7, size=n_cat)
  w["item_price"] = w["category_price"][w["item_category"]] + rng.normal(0.0, 0.3, size=n_item)
  w["segment_affinity"] = rng.dirichlet(np.full(NUM_CLUSTERS, 2.0), size=n_seg)
  # Shared value embeddings, scaled so that z (their sum over fields) has about unit variance per coordinate.
  w["embeddings"] = [rng.normal(0.0, 1.0 / np.sqrt(len(FIELD_SIZES)), size=(size, _EMBED_DIM)) for size in FIELD_SIZES]
  w["shared_weights"] = rng.normal(0.0, 1.0 / np.sqrt(_EMBED_DIM), size=_EMBED_DIM)
  w["cluster_weights"] = rng.normal(0.0, 1.0 / np.sqrt(_EMBED_DIM), size=(NUM_CLUSTERS, _EMBED_DIM))
  w["position_bias"] = -0.15 * np.arange(FIELD_SIZES[6])
  return w


def _solve_bias(logits: np.ndarray, rate: float) -> float:
  """The b with mean(sigmoid(logits + b)) = rate (bisection; the mean is increasing in b)."""
  lo, hi = -20.0, 20.0
  for _ in range(60):
    mid = (lo + hi) / 2
    if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < rate:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


def generate(num_rows: int, seed: int = SEED) -> dict[str, np.ndarray]:
  """`num_rows` i.i.d. rows of the multi-domain click generator (see the module docstring), raw and unencoded.

  Returns a dict of arrays: `categorical` int64 [n, F] (raw values, field f in [0, FIELD_SIZES[f])), `numeric`
  float64 [n, N] (unstandardized), `domain` int64 [n], `label` int64 [n] (0/1), and the latent `cluster` int64 [n]
  and click probability `click_prob` float64 [n] (for diagnostics; not features). The same (num_rows, seed) gives
  the same rows; the first rows of a larger draw are not those of a smaller one.
  """
  w = _world(seed)
  rng = np.random.default_rng([seed, 1])
  n = num_rows
  domain = rng.choice(len(DOMAIN_NAMES), size=n, p=DOMAIN_SHARES)
  cat = np.zeros((n, len(FIELD_SIZES)), np.int64)
  numeric = np.zeros((n, len(NUMERIC_NAMES)))
  cluster = np.zeros(n, np.int64)
  for d in range(len(DOMAIN_NAMES)):
    rows = np.flatnonzero(domain == d)
    m = len(rows)
    users = w["user_order"][d][rng.choice(FIELD_SIZES[0], size=m, p=_zipf_probs(FIELD_SIZES[0]))]
    items = w["item_order"][d][rng.choice(FIELD_SIZES[1], size=m, p=_zipf_probs(FIELD_SIZES[1]))]
    peak = rng.choice(_HOUR_PEAKS[d], size=m)
    hours = np.round(rng.normal(peak, 2.5)).astype(np.int64) % 24
    devices = rng.choice(FIELD_SIZES[5], size=m, p=_DEVICE_MIX[d])
    positions = np.minimum(rng.geometric(_POSITION_DECAY[d], size=m) - 1, FIELD_SIZES[6] - 1)
    segments = w["user_segment"][users]
    cat[rows] = np.stack([users, items, w["item_category"][items], segments, hours, devices, positions], axis=1)
    numeric[rows, 0] = w["user_activity"][users] + rng.normal(0.0, 0.3, size=m)
    numeric[rows, 1] = w["item_price"][items] + _PRICE_SCALE[d] + rng.normal(0.0, 0.1, size=m)
    numeric[rows, 2] = np.log1p(rng.exponential(_RECENCY_SCALE[d], size=m))
    mix = np.asarray(CLUSTER_MIX[d])[None, :] * w["segment_affinity"][segments]
    mix /= mix.sum(axis=1, keepdims=True)
    cluster[rows] = (rng.random((m, 1)) > np.cumsum(mix, axis=1)).sum(axis=1)
  # Click logits (before the per-domain bias): shared + per-cluster models over shared embeddings and numeric features.
  z = sum(w["embeddings"][f][cat[:, f]] for f in range(len(FIELD_SIZES)))
  num_std = (numeric - numeric.mean(axis=0)) / numeric.std(axis=0)
  logit = (
    w["position_bias"][cat[:, 6]]
    + 0.7 * z @ w["shared_weights"]
    + 1.2 * np.einsum("nk,nk->n", z, w["cluster_weights"][cluster])
    + np.einsum("nj,nj->n", num_std, np.asarray(_CLUSTER_NUMERIC)[cluster])
  )
  for d, rate in enumerate(DOMAIN_CLICK_RATES):
    rows = domain == d
    logit[rows] += _solve_bias(logit[rows], rate)
  click_prob = 1.0 / (1.0 + np.exp(-logit))
  label = (rng.random(n) < click_prob).astype(np.int64)
  return {
    "categorical": cat,
    "numeric": numeric,
    "domain": domain.astype(np.int64),
    "label": label,
    "cluster": cluster,
    "click_prob": click_prob,
  }


def _identity_vocab(train_values: np.ndarray, size: int, min_count: int = MIN_COUNT) -> np.ndarray:
  """The lookup raw value -> index of a field: value + 1 when seen at least `min_count` times in `train_values`, else
  0 (so the cardinality is size + 1, whatever the data)."""
  counts = np.bincount(train_values, minlength=size)
  return np.where(counts >= min_count, np.arange(1, size + 1), 0).astype(np.int32)


def _standardize(numeric: np.ndarray, train_rows: slice | np.ndarray) -> np.ndarray:
  mean, std = numeric[train_rows].mean(axis=0), numeric[train_rows].std(axis=0)
  return ((numeric - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


@functools.cache
def make_splits(
  seed: int = SEED, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE
) -> dict[str, dict[str, np.ndarray]]:
  """The encoded train / test splits of the generator: {split: {'categorical' int32 [n, F], 'numeric' float32
  [n, N], 'domain' int32 [n], 'label' int32 [n]}}, with the vocabulary and the numeric statistics of the train rows
  (the first `train_size` of `generate(train_size + test_size, seed)`). Cached: do not modify the arrays."""
  rows = generate(train_size + test_size, seed)
  cat = rows["categorical"]
  lookups = [_identity_vocab(cat[:train_size, f], size) for f, size in enumerate(FIELD_SIZES)]
  encoded = np.stack([lookups[f][cat[:, f]] for f in range(len(FIELD_SIZES))], axis=1)
  numeric = _standardize(rows["numeric"], slice(0, train_size))
  parts = {"train": slice(0, train_size), "test": slice(train_size, train_size + test_size)}
  return {
    split: {
      "categorical": encoded[part],
      "numeric": numeric[part],
      "domain": rows["domain"][part].astype(np.int32),
      "label": rows["label"][part].astype(np.int32),
    }
    for split, part in parts.items()
  }


# --- MovieLens-100K, as shipped by recbole ---------------------------------------------------------------------------

MOVIELENS_PACKAGE = "recbole"  # pinned: recbole==1.2.1 (the FORMAT_INFO below is of its file)
MOVIELENS_SUBDIR = ("dataset_example", "ml-100k")
MOVIELENS_FIELD_NAMES = ("user", "item", "age_group", "gender", "occupation", "zip_prefix", "release_decade", "genre")
MOVIELENS_NUMERIC_NAMES = ("age", "release_year", "num_genres")
MOVIELENS_DOMAINS = ("action", "comedy", "drama", "other")
# The film's first listed genre (RecBole lists them in MovieLens' column order) -> domain; other genres -> 'other'.
MOVIELENS_GENRE_DOMAIN = {
  "Action": "action",
  "Adventure": "action",
  "Comedy": "comedy",
  "Animation": "comedy",
  "Children's": "comedy",
  "Drama": "drama",
}
MOVIELENS_CLICK_RATING = 4.0  # click = rating >= 4
MOVIELENS_TRAIN_FRACTION = 0.8
_AGE_GROUPS = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age bands: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+


def movielens_dir() -> str:
  """The directory of MovieLens-100K in the installed recbole, found without importing recbole (whose import pulls
  torch); FileNotFoundError when recbole is not installed."""
  spec = importlib.util.find_spec(MOVIELENS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"MovieLens-100K ships with the package {MOVIELENS_PACKAGE!r}, which is not installed: "
      "`pip install recbole==1.2.1` (or `pip install --no-deps recbole==1.2.1`: reading the file needs none of its "
      "dependencies)"
    )
  return os.path.join(list(spec.submodule_search_locations)[0], *MOVIELENS_SUBDIR)


def _read_atomic(path: str) -> dict[str, list[str]]:
  """A RecBole atomic file (tab-separated, header `name:type`) as {column name: list of strings}."""
  with open(path, encoding="utf-8") as f:
    names = [column.split(":")[0] for column in f.readline().rstrip("\n").split("\t")]
    columns = [[] for _ in names]
    for line in f:
      values = line.rstrip("\n").split("\t")
      if len(values) < len(names):
        values += [""] * (len(names) - len(values))
      for column, value in zip(columns, values):
        column.append(value)
  return dict(zip(names, columns))


def _token_vocab(train_tokens: list[str], min_count: int = MIN_COUNT) -> dict[str, int]:
  """Tokens seen at least `min_count` times in train, sorted, -> 1..V (anything else -> 0)."""
  counts: dict[str, int] = {}
  for token in train_tokens:
    counts[token] = counts.get(token, 0) + 1
  return {token: i + 1 for i, token in enumerate(sorted(t for t, c in counts.items() if c >= min_count))}


def _age_group(age: str) -> str:
  return str(int(np.searchsorted(_AGE_GROUPS, int(age), side="right"))) if age.isdigit() else ""


def load_movielens(directory: str | None = None) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """MovieLens-100K as multi-domain CTR data (see the module docstring): ({split: arrays as `make_splits`}, info).

  Args:
    directory: the folder of `ml-100k.{inter,user,item}` in RecBole's atomic format; None = the installed recbole's.

  Returns the splits and info {'cardinalities', 'field_names', 'numeric_names', 'domain_names', 'num_rows'}.
  """
  directory = movielens_dir() if directory is None else directory
  prefix = os.path.join(directory, os.path.basename(os.path.normpath(directory)))
  inter = _read_atomic(prefix + ".inter")
  users = _read_atomic(prefix + ".user")
  items = _read_atomic(prefix + ".item")
  user_rows = {u: i for i, u in enumerate(users["user_id"])}
  item_rows = {m: i for i, m in enumerate(items["item_id"])}

  timestamps = np.asarray(inter["timestamp"], np.float64)
  order = np.argsort(timestamps, kind="stable")  # split by time; ties keep the file's order
  num_train = int(round(MOVIELENS_TRAIN_FRACTION * len(order)))
  u = [user_rows.get(inter["user_id"][i]) for i in order]
  m = [item_rows.get(inter["item_id"][i]) for i in order]

  def user_col(name):
    return [users[name][j] if j is not None else "" for j in u]

  def item_col(name):
    return [items[name][j] if j is not None else "" for j in m]

  genres = [g.split() for g in item_col("class")]
  first_genre = [g[0] if g else "" for g in genres]
  years = item_col("release_year")
  tokens = {
    "user": [inter["user_id"][i] for i in order],
    "item": [inter["item_id"][i] for i in order],
    "age_group": [_age_group(a) for a in user_col("age")],
    "gender": user_col("gender"),
    "occupation": user_col("occupation"),
    "zip_prefix": [z[:3] for z in user_col("zip_code")],
    "release_decade": [y[:3] + "0s" if y.isdigit() else "" for y in years],
    "genre": first_genre,
  }
  vocabs = [_token_vocab(tokens[name][:num_train]) for name in MOVIELENS_FIELD_NAMES]
  categorical = np.array(
    [[vocab.get(t, 0) for t in tokens[name]] for name, vocab in zip(MOVIELENS_FIELD_NAMES, vocabs)], np.int32
  ).T

  def as_float(values):
    out = np.array([float(v) if v.replace(".", "", 1).isdigit() else np.nan for v in values])
    return np.where(np.isnan(out), np.nanmean(out[:num_train]), out)  # missing -> the train mean

  numeric = np.stack([as_float(user_col("age")), as_float(years), np.array([len(g) for g in genres], float)], axis=1)
  numeric = _standardize(numeric, slice(0, num_train))
  domain_index = {name: i for i, name in enumerate(MOVIELENS_DOMAINS)}
  domain = np.array([domain_index[MOVIELENS_GENRE_DOMAIN.get(g, "other")] for g in first_genre], np.int32)
  label = (np.asarray(inter["rating"], np.float64)[order] >= MOVIELENS_CLICK_RATING).astype(np.int32)
  parts = {"train": slice(0, num_train), "test": slice(num_train, len(order))}
  splits = {
    split: {"categorical": categorical[p], "numeric": numeric[p], "domain": domain[p], "label": label[p]}
    for split, p in parts.items()
  }
  info = {
    "cardinalities": tuple(len(vocab) + 1 for vocab in vocabs),
    "field_names": MOVIELENS_FIELD_NAMES,
    "numeric_names": MOVIELENS_NUMERIC_NAMES,
    "domain_names": MOVIELENS_DOMAINS,
    "num_rows": {split: p.stop - p.start for split, p in parts.items()},
  }
  return splits, info


# Hard-coded from recbole 1.2.1's file (checked when the builder runs): TFDS needs the shapes before reading the data.
MOVIELENS_FORMAT_INFO = {
  "cardinalities": (751, 1480, 8, 3, 22, 344, 10, 19),
  "field_names": MOVIELENS_FIELD_NAMES,
  "numeric_names": MOVIELENS_NUMERIC_NAMES,
}


# --- TFDS builders ---------------------------------------------------------------------------------------------------


def _features(num_fields: int, num_numeric: int, domain_names: tuple[str, ...]) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
    {
      "categorical": tfds.features.Tensor(shape=(num_fields,), dtype=np.int32),
      "numeric": tfds.features.Tensor(shape=(num_numeric,), dtype=np.float32),
      "domain": tfds.features.ClassLabel(names=domain_names),
      "label": tfds.features.ClassLabel(names=("no_click", "click")),
    }
  )


def _examples(arrays: dict[str, np.ndarray]):
  for i in range(len(arrays["label"])):
    yield (
      i,
      {
        "categorical": arrays["categorical"][i],
        "numeric": arrays["numeric"][i],
        "domain": int(arrays["domain"][i]),
        "label": int(arrays["label"][i]),
      },
    )


class CtrDomains(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic multi-domain click log from a seeded generator (`zoo.data.ctr.generate`; see the module docstring):
  4 domains, 7 categorical fields, 3 numeric fields, 80,000 train and 20,000 test rows."""

  name = "ctr_domains"
  # No checksums file: there is nothing to download (TFDS would otherwise locate one next to this module).
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generator (seed 0): 4 domains, 3 latent clusters; 80k/20k train/test; train vocabulary."}
  FORMAT_INFO = {"cardinalities": CARDINALITIES, "field_names": FIELD_NAMES, "numeric_names": NUMERIC_NAMES}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=_features(len(FIELD_NAMES), len(NUMERIC_NAMES), DOMAIN_NAMES),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the rows are generated.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split: str):
    yield from _examples(make_splits()[split])


class CtrMovielens100k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """MovieLens-100K ratings as a multi-domain click log (click = rating >= 4, domain = genre group), read from the
  file that recbole 1.2.1 ships (see the module docstring); needs `recbole==1.2.1` installed (not imported)."""

  name = "ctr_movielens100k"
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "recbole 1.2.1's ml-100k; split 80/20 by time; train vocabulary (min count 2)."}
  FORMAT_INFO = MOVIELENS_FORMAT_INFO

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=_features(len(MOVIELENS_FIELD_NAMES), len(MOVIELENS_NUMERIC_NAMES), MOVIELENS_DOMAINS),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the file ships with recbole.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split: str):
    yield from _examples(_movielens_checked(self.FORMAT_INFO["cardinalities"])[split])


@functools.cache
def _movielens_checked(cardinalities: tuple[int, ...]) -> dict[str, dict[str, np.ndarray]]:
  """The installed recbole's MovieLens splits, once per process, after checking their cardinalities."""
  splits, info = load_movielens()
  if info["cardinalities"] != cardinalities:
    raise ValueError(
      f"{movielens_dir()} gives cardinalities {info['cardinalities']}, not those of recbole 1.2.1's file "
      f"{cardinalities}"
    )
  return splits
