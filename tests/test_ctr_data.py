"""zoo.data.ctr: the multi-domain click generator (seeded, domains that differ in features and in click models), its
encoding (train-only vocabulary, train statistics), the `ctr_domains` TFDS builder, and the MovieLens-100K loader
(on a small file in RecBole's format; on the real file where recbole is installed)."""

import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import OneHotEncoder

from zoo.data import ctr


@pytest.fixture(scope="module")
def splits():
  return ctr.make_splits()


@pytest.fixture(scope="module")
def raw():
  return ctr.generate(ctr.TRAIN_SIZE + ctr.TEST_SIZE, ctr.SEED)


def test_generate_is_seeded():
  a, b, c = ctr.generate(3000, seed=7), ctr.generate(3000, seed=7), ctr.generate(3000, seed=8)
  assert set(a) == {"categorical", "numeric", "domain", "label", "cluster", "click_prob"}
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["categorical"], c["categorical"])
  assert not np.array_equal(a["click_prob"], c["click_prob"])


def test_generate_ranges(raw):
  n = ctr.TRAIN_SIZE + ctr.TEST_SIZE
  assert raw["categorical"].shape == (n, len(ctr.FIELD_NAMES))
  assert raw["numeric"].shape == (n, len(ctr.NUMERIC_NAMES))
  assert (raw["categorical"] >= 0).all() and (raw["categorical"] < np.asarray(ctr.FIELD_SIZES)).all()
  assert np.isfinite(raw["numeric"]).all()
  assert set(np.unique(raw["label"])) == {0, 1} and set(np.unique(raw["domain"])) == set(range(len(ctr.DOMAIN_NAMES)))
  assert set(np.unique(raw["cluster"])) == set(range(ctr.NUM_CLUSTERS))
  np.testing.assert_allclose(np.bincount(raw["domain"]) / n, ctr.DOMAIN_SHARES, atol=0.01)


def test_splits_shapes_dtypes_ranges(splits):
  assert set(splits) == {"train", "test"}
  for split, size in (("train", ctr.TRAIN_SIZE), ("test", ctr.TEST_SIZE)):
    s = splits[split]
    assert s["categorical"].shape == (size, len(ctr.FIELD_NAMES)) and s["categorical"].dtype == np.int32
    assert s["numeric"].shape == (size, len(ctr.NUMERIC_NAMES)) and s["numeric"].dtype == np.float32
    assert s["domain"].shape == (size,) and s["domain"].dtype == np.int32
    assert s["label"].shape == (size,) and s["label"].dtype == np.int32
    assert (s["categorical"] >= 0).all() and (s["categorical"] < np.asarray(ctr.CARDINALITIES)).all()
    assert np.isfinite(s["numeric"]).all()
    assert set(np.unique(s["label"])) == {0, 1}
    assert ((s["domain"] >= 0) & (s["domain"] < len(ctr.DOMAIN_NAMES))).all()
  # Standardized with the train statistics: mean 0 / std 1 on train, close to that (not exactly) on test.
  np.testing.assert_allclose(splits["train"]["numeric"].mean(axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(splits["train"]["numeric"].std(axis=0), 1.0, atol=1e-4)
  np.testing.assert_allclose(splits["test"]["numeric"].mean(axis=0), 0.0, atol=0.05)
  assert ctr.CtrDomains.FORMAT_INFO == {
    "cardinalities": ctr.CARDINALITIES,
    "field_names": ctr.FIELD_NAMES,
    "numeric_names": ctr.NUMERIC_NAMES,
  }
  assert len(ctr.CARDINALITIES) == len(ctr.FIELD_NAMES)


def test_click_rates_per_domain_are_in_range_and_different(splits):
  for split in ("train", "test"):
    s = splits[split]
    rates = np.array([s["label"][s["domain"] == d].mean() for d in range(len(ctr.DOMAIN_NAMES))])
    assert ((rates > 0.04) & (rates < 0.32)).all(), rates
    np.testing.assert_allclose(rates, ctr.DOMAIN_CLICK_RATES, atol=0.02 if split == "train" else 0.03)
    assert np.diff(np.sort(rates)).min() > 0.015, rates  # every two domains differ


def test_domains_differ_in_feature_distributions(splits):
  s = splits["train"]

  def distribution(field, domain, size):
    values = s["categorical"][s["domain"] == domain, field]
    return np.bincount(values, minlength=size) / len(values)

  def tv(field, a, b):  # total variation distance between two domains' distributions of a field
    size = ctr.CARDINALITIES[field]
    return 0.5 * np.abs(distribution(field, a, size) - distribution(field, b, size)).sum()

  device, item = ctr.FIELD_NAMES.index("device"), ctr.FIELD_NAMES.index("item")
  feed, video, search = (ctr.DOMAIN_NAMES.index(n) for n in ("feed", "video", "search"))
  assert tv(device, feed, search) > 0.2
  # 'video' shares most of the 'feed' item popularity order, 'search' has its own.
  assert tv(item, feed, video) < tv(item, feed, search) - 0.2
  price = ctr.NUMERIC_NAMES.index("log_price")
  means = [s["numeric"][s["domain"] == d, price].mean() for d in range(len(ctr.DOMAIN_NAMES))]
  assert max(means) - min(means) > 0.5


def test_vocabulary_is_built_from_train_only(raw, splits):
  n_train = ctr.TRAIN_SIZE
  for f, size in enumerate(ctr.FIELD_SIZES):
    counts = np.bincount(raw["categorical"][:n_train, f], minlength=size)
    for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
      values = raw["categorical"][rows, f]
      expected = np.where(counts[values] >= ctr.MIN_COUNT, values + 1, 0)
      np.testing.assert_array_equal(splits[split]["categorical"][:, f], expected)
  # The long-tailed fields do have values seen only in test, and they map to 0.
  item = ctr.FIELD_NAMES.index("item")
  train_items = set(raw["categorical"][:n_train, item].tolist())
  test_only = np.array([v not in train_items for v in raw["categorical"][n_train:, item]])
  assert test_only.sum() > 0
  assert (splits["test"]["categorical"][test_only, item] == 0).all()
  assert (splits["train"]["categorical"][:, item] == 0).any()  # train values seen once are out of vocabulary too


def test_per_domain_logistic_regression_beats_a_pooled_one(splits):
  """The domains really differ in how features relate to clicks: for some domain, a logistic regression fitted on
  that domain alone predicts its held-out clicks better than one fitted on all domains (with a domain indicator)."""
  fields = [ctr.FIELD_NAMES.index(n) for n in ("category", "segment", "hour", "device", "position")]
  tr, te = splits["train"], splits["test"]
  encoder = OneHotEncoder(handle_unknown="ignore").fit(tr["categorical"][:, fields])
  num_domains = len(ctr.DOMAIN_NAMES)

  def features(s):
    domain = sp.csr_matrix(np.eye(num_domains)[s["domain"]])
    return sp.hstack([encoder.transform(s["categorical"][:, fields]), sp.csr_matrix(s["numeric"]), domain]).tocsr()

  x_tr, x_te = features(tr), features(te)
  pooled = LogisticRegression(max_iter=1000).fit(x_tr, tr["label"])
  gains = []
  for d in range(num_domains):
    mtr, mte = tr["domain"] == d, te["domain"] == d
    own = LogisticRegression(max_iter=1000).fit(x_tr[mtr], tr["label"][mtr])
    y = te["label"][mte]
    gains.append(log_loss(y, pooled.predict_proba(x_te[mte])[:, 1]) - log_loss(y, own.predict_proba(x_te[mte])[:, 1]))
  assert max(gains) > 0.005, gains


def test_builder_builds_and_reads(tmp_path, splits):
  builder = ctr.CtrDomains(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  features = builder.info.features
  assert features["domain"].names == list(ctr.DOMAIN_NAMES)
  assert features["label"].names == ["no_click", "click"]
  for split in ("train", "test"):
    source = builder.as_data_source(split)
    assert len(source) == len(splits[split]["label"])
    for i in range(0, len(source), len(source) // 50):
      record = source[i]
      assert record["categorical"].shape == (len(ctr.FIELD_NAMES),) and record["categorical"].dtype == np.int32
      assert record["numeric"].shape == (len(ctr.NUMERIC_NAMES),) and record["numeric"].dtype == np.float32
      assert (record["categorical"] < np.asarray(ctr.CARDINALITIES)).all() and (record["categorical"] >= 0).all()
      assert 0 <= record["domain"] < len(ctr.DOMAIN_NAMES) and record["label"] in (0, 1)
  record = builder.as_data_source("train")[0]
  # The record is one of the generated train rows.
  tr = splits["train"]
  match = (tr["categorical"] == record["categorical"]).all(axis=1) & (tr["numeric"] == record["numeric"]).all(axis=1)
  assert match.any() and tr["label"][match][0] == record["label"] and tr["domain"][match][0] == record["domain"]


# --- MovieLens-100K ------------------------------------------------------------------------------------------------


def _write_atomic(path, header, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\t".join(header) + "\n")
    for row in rows:
      f.write("\t".join(str(v) for v in row) + "\n")


@pytest.fixture
def small_movielens(tmp_path):
  """A 10-rating log in RecBole's atomic format: users 1-3 rate in train time, user 4 only in test time."""
  directory = tmp_path / "ml-100k"
  directory.mkdir()
  _write_atomic(
    directory / "ml-100k.user",
    ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"],
    [(1, 24, "M", "technician", 85711), (2, 53, "F", "other", 94043), (3, 23, "M", "writer", 32067),
     (4, 33, "F", "doctor", "T8H1N")],
  )  # fmt: skip
  _write_atomic(
    directory / "ml-100k.item",
    ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"],
    [(10, "A", 1995, "Animation Children's Comedy"), (20, "B", 1977, "Action Sci-Fi"), (30, "C", "", "Drama"),
     (40, "D", 1994, "Horror")],
  )  # fmt: skip
  # (user, item, rating, timestamp), deliberately not in time order; the last two by time are the test split.
  ratings = [(2, 20, 5, 104), (1, 10, 4, 100), (1, 20, 3, 101), (3, 30, 2, 107), (2, 10, 4, 103),
             (1, 30, 5, 102), (4, 40, 4, 109), (3, 40, 1, 105), (2, 30, 3, 106), (4, 10, 5, 108)]  # fmt: skip
  _write_atomic(
    directory / "ml-100k.inter", ["user_id:token", "item_id:token", "rating:float", "timestamp:float"], ratings
  )
  return str(directory)


def test_movielens_loader_on_a_small_file(small_movielens):
  splits, info = ctr.load_movielens(small_movielens)
  assert info["num_rows"] == {"train": 8, "test": 2}
  assert info["field_names"] == ctr.MOVIELENS_FIELD_NAMES and info["domain_names"] == ctr.MOVIELENS_DOMAINS
  tr, te = splits["train"], splits["test"]
  # Split by time: train is timestamps 100..107 in order, test 108, 109; click = rating >= 4.
  np.testing.assert_array_equal(tr["label"], [1, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(te["label"], [1, 1])
  user, item, gender = (ctr.MOVIELENS_FIELD_NAMES.index(n) for n in ("user", "item", "gender"))
  # Users 1, 2, 3 are seen 3, 3, 2 times in train -> 1, 2, 3; user 4 only in test -> 0.
  np.testing.assert_array_equal(tr["categorical"][:, user], [1, 1, 1, 2, 2, 3, 2, 3])
  np.testing.assert_array_equal(te["categorical"][:, user], [0, 0])
  # Items 10, 20, 30 seen 2, 2, 3 times in train, item 40 once: out of vocabulary even in train.
  np.testing.assert_array_equal(tr["categorical"][:, item], [1, 2, 3, 1, 2, 0, 3, 3])
  np.testing.assert_array_equal(te["categorical"][:, item], [1, 0])
  assert info["cardinalities"][user] == 4 and info["cardinalities"][item] == 4
  assert info["cardinalities"][gender] == 3  # F (3 train rows), M (5)
  for s in (tr, te):
    assert s["categorical"].dtype == np.int32 and s["numeric"].dtype == np.float32
    assert (s["categorical"] < np.asarray(info["cardinalities"])).all()
    assert np.isfinite(s["numeric"]).all()
  # Domains from the first listed genre: Animation -> comedy, Action -> action, Drama -> drama, Horror -> other.
  names = [ctr.MOVIELENS_DOMAINS[d] for d in tr["domain"]]
  assert names == ["comedy", "action", "drama", "comedy", "action", "other", "drama", "drama"]
  np.testing.assert_allclose(tr["numeric"].mean(axis=0), 0.0, atol=1e-6)  # train statistics; the missing year -> mean


def test_movielens_dir_needs_recbole(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="recbole==1.2.1"):
    ctr.movielens_dir()
