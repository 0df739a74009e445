"""grain pipelines: packing, masks, determinism, checkpoint state, host sharding, mock TFDS datasets, errors."""

import collections
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from zoo.data import builders, dataset_info, default_data_config, make_iterator
from zoo.data.config import resolve_data_config
from zoo.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  builders.prepare("pystdlib", path)
  builders.prepare("digits", path)
  return path


def _config(data_dir, name="pystdlib", **overrides):
  cfg = default_data_config(name)
  cfg.data_dir = data_dir
  cfg.update(overrides)
  return cfg


def _documents(data_dir, split, domains=()):
  """The texts of `split` in source order, optionally only those of `domains`."""
  builder = builders.prepare("pystdlib", data_dir)
  names = builder.info.features["domain"].names
  source = builder.as_data_source(split=split)
  return [
    source[i]["text"].decode() for i in range(len(source)) if not domains or names[source[i]["domain"]] in domains
  ]


def _stream(batches):
  """Undoes the packing: each row is a chunk inputs[0] + targets; the real (mask 1) tokens, as one list of ids."""
  tokens = []
  for batch in batches:
    for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["mask"]):
      tokens.append(int(inputs[0]))
      tokens.extend(int(t) for t in targets[mask == 1])
  return tokens


def _split_documents(tokens):
  """Splits a packed stream at BOS and decodes each document."""
  text = []
  for token in tokens:
    if token == TOK.bos_id:
      text.append([])
    else:
      text[-1].append(token)
  assert all(doc[-1] == TOK.eos_id for doc in text)
  return [TOK.decode(doc) for doc in text]


def test_lm_batch_shapes_targets_and_masks(data_dir):
  it = make_iterator(_config(data_dir, seq_len=32), split="train", global_batch_size=4, seed=3)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {"inputs", "targets", "mask", "target_bytes"}
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, 32)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32 and batch["mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < TOK.vocab_size
    np.testing.assert_array_equal(batch["mask"], (batch["targets"] != TOK.pad_id).astype(np.float32))


def test_packing_concatenates_documents_and_pads_only_the_end(data_dir):
  """One unshuffled pass over validation: the real tokens are exactly BOS doc EOS for every document, in order."""
  cfg = _config(data_dir, seq_len=64, shuffle=False)
  batches = list(make_iterator(cfg, split="validation", global_batch_size=1, seed=0, repeat=False))
  docs = _documents(data_dir, "validation")
  expected = np.concatenate([TOK.encode(d) for d in docs])
  stream = _stream(batches)
  np.testing.assert_array_equal(stream, expected)
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks[:-1].min() == 1.0  # only the last row has padding
  last = batches[-1]
  padded = last["mask"][0] == 0
  assert padded.any() == (len(expected) % 65 != 0)
  assert (last["targets"][0][padded] == TOK.pad_id).all()


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  cfg = _config(data_dir, seq_len=16)
  first = [next(make_iterator(cfg, split="train", global_batch_size=2, seed=s))["inputs"] for s in (7, 7, 8)]
  np.testing.assert_array_equal(first[0], first[1])
  assert not np.array_equal(first[0], first[2])


@pytest.mark.parametrize("name,split", [("pystdlib", "train"), ("digits", "train")])
def test_state_restore_gives_the_same_next_batches(data_dir, name, split):
  cfg = _config(data_dir, name, seq_len=24)
  it = make_iterator(cfg, split=split, global_batch_size=4, seed=1)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(4)]
  resumed = make_iterator(cfg, split=split, global_batch_size=4, seed=1)
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(4))):
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_repeat_false_ends_repeat_true_goes_on(data_dir):
  cfg = _config(data_dir, "digits")
  one_pass = list(make_iterator(cfg, split="test", global_batch_size=8, seed=0, repeat=False))
  assert len(one_pass) == 297 // 8
  it = make_iterator(cfg, split="test", global_batch_size=8, seed=0)
  repeated = [next(it) for _ in range(2 * len(one_pass) + 3)]
  assert len(repeated) == 2 * len(one_pass) + 3
  epoch0 = collections.Counter(int(x) for b in one_pass for x in b["label"])
  epoch0_again = collections.Counter(int(x) for b in repeated[: len(one_pass)] for x in b["label"])
  assert epoch0 == epoch0_again


def test_digits_batches(data_dir):
  assert dataset_info(_config(data_dir, "digits")) == {"format": "images", "num_classes": 10, "image_shape": (8, 8, 1)}
  batch = next(make_iterator(_config(data_dir, "digits"), split="train", global_batch_size=16, seed=0))
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert 0 <= batch["label"].min() and batch["label"].max() <= 9
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_hosts_read_disjoint_documents_that_cover_the_split(data_dir):
  """Two hosts, one pass: each yields half the batch; their documents are disjoint and together are the split."""
  cfg = _config(data_dir, seq_len=32)
  host_docs = []
  for index in range(2):
    batches = list(
      make_iterator(
        cfg, split="validation", global_batch_size=2, seed=5, process_index=index, process_count=2, repeat=False
      )
    )
    assert all(b["inputs"].shape == (1, 32) for b in batches)
    host_docs.append(_split_documents(_stream(batches)))
  assert not set(host_docs[0]) & set(host_docs[1])
  assert sorted(host_docs[0] + host_docs[1]) == sorted(_documents(data_dir, "validation"))


def test_hosts_images_together_are_the_single_host_epoch(data_dir):
  cfg = _config(data_dir, "digits")
  single = list(make_iterator(cfg, split="test", global_batch_size=1, seed=0, repeat=False))
  hosts = [
    list(make_iterator(cfg, split="test", global_batch_size=2, seed=0, process_index=i, process_count=2, repeat=False))
    for i in range(2)
  ]
  key = lambda b: (b["image"][0].tobytes(), int(b["label"][0]))  # pylint: disable=unnecessary-lambda-assignment
  assert (len(hosts[0]), len(hosts[1])) == (149, 148)  # 297 examples dealt round-robin, one per row
  together = collections.Counter(key(b) for b in hosts[0] + hosts[1])
  assert together == collections.Counter(key(b) for b in single)


def test_domain_filter(data_dir):
  cfg = _config(data_dir, seq_len=64, shuffle=False, domains=("docs",))
  batches = list(make_iterator(cfg, split="validation", global_batch_size=1, seed=0, repeat=False))
  docs = _split_documents(_stream(batches))
  assert docs == _documents(data_dir, "validation", domains=("docs",))
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  assert docs and set(docs) <= set(topics.topics.values())
  assert "docs" in dataset_info(cfg)["domains"]


@pytest.mark.slow
def test_worker_process_gives_the_same_batches(data_dir):
  cfg = _config(data_dir, seq_len=16)
  want = make_iterator(cfg, split="train", global_batch_size=2, seed=0)
  cfg.worker_count = 1
  got = make_iterator(cfg, split="train", global_batch_size=2, seed=0)
  for _ in range(3):
    np.testing.assert_array_equal(next(want)["inputs"], next(got)["inputs"])


def test_mock_tfds_text_and_image_datasets(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    lm = default_data_config("lm1b")
    lm.data_dir, lm.seq_len = str(tmp_path), 16
    assert dataset_info(lm)["format"] == "text" and dataset_info(lm)["vocab_size"] == TOK.vocab_size
    batch = next(make_iterator(lm, split="train", global_batch_size=2, seed=0))
    assert batch["inputs"].shape == (2, 16)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    images = default_data_config("cifar10")
    images.data_dir = str(tmp_path)
    assert dataset_info(images) == {"format": "images", "num_classes": 10, "image_shape": (32, 32, 3)}
    batch = next(make_iterator(images, split="train", global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() and batch["label"].max() < 10


def test_unprepared_standard_dataset_fails_at_once(tmp_path):
  with pytest.raises(ValueError, match=r"'lm1b' is not prepared .*tfds build lm1b"):
    make_iterator({"name": "lm1b", "data_dir": str(tmp_path)}, split="train", global_batch_size=2, seed=0)


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(ValueError, match="name='no_such_dataset_zz' is not a dataset"):
    dataset_info({"name": "no_such_dataset_zz", "data_dir": str(tmp_path)})


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"vocab": 3}, r"unknown key\(s\) \['vocab'\]"),
    ({"seq_len": 1}, "seq_len=1; allowed: an int >= 2"),
    ({"domains": "docs"}, "domains='docs' is a string"),
    ({"domains": ("nope",)}, r"domains \['nope'\] are not domains of 'pystdlib'"),
    ({"worker_count": -1}, "worker_count=-1"),
  ],
)
def test_bad_config(data_dir, overrides, match):
  with pytest.raises(ValueError, match=match):
    make_iterator({"name": "pystdlib", "data_dir": data_dir, **overrides}, split="train", global_batch_size=2, seed=0)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"global_batch_size": 5, "process_count": 2}, "global_batch_size=5 is not divisible by process_count=2"),
    ({"process_index": 2, "process_count": 2}, "process_index=2"),
    ({"seed": -1}, "seed=-1"),
    ({"split": "test"}, r"split='test' is not a split of dataset 'pystdlib'; allowed: \['train', 'validation'\]"),
  ],
)
def test_bad_arguments(data_dir, kwargs, match):
  args = {"split": "train", "global_batch_size": 2, "seed": 0} | kwargs
  with pytest.raises(ValueError, match=match):
    make_iterator(_config(data_dir), **args)


def test_empty_selection(data_dir):
  validation_domains = set(dataset_info(_config(data_dir))["domains"])
  names = builders.prepare("pystdlib", data_dir).info.features["domain"].names
  source = builders.prepare("pystdlib", data_dir).as_data_source(split="validation")
  present = {names[source[i]["domain"]] for i in range(len(source))}
  absent = sorted(validation_domains - present)
  assert absent, "every domain has a validation file; pick another empty selection"
  with pytest.raises(ValueError, match="has no examples"):
    make_iterator(_config(data_dir, domains=(absent[0],)), split="validation", global_batch_size=1, seed=0)
  with pytest.raises(ValueError, match="has no examples for host 999 of 1000"):
    make_iterator(
      _config(data_dir), split="validation", global_batch_size=1000, seed=0, process_index=999, process_count=1000
    )


def test_data_dir_defaults_to_env(monkeypatch, tmp_path):
  monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
  assert resolve_data_config({"name": "digits"})["data_dir"] == str(tmp_path)
