"""grain input pipelines over TFDS array_record data sources (no TensorFlow needed). A dataset states its format;
tasks (`zoo.tasks`) say which formats they read.

Format 'text' (a Text feature `text_key`): each document becomes BOS + tokens + EOS (`data.tokenizer`, bytes by
default); documents are read in a seeded shuffled order (a new order each epoch), concatenated and cut into chunks of
seq_len + 1 tokens (grain's concat-then-split packing; a chunk may span documents, which stay separated by their
EOS/BOS; positions are not reset at document starts). Each chunk gives `inputs = chunk[:-1]`, `targets = chunk[1:]`
(so the first token of a chunk is context only, never a target) and `target_bytes` (the UTF-8 bytes of text each
target stands for); only the last chunk of a finite stream (repeat=False) has padding, which holds PAD and has mask 0.

Format 'labelled_text' (a text dataset read with `data.label_key`, a ClassLabel feature such as pystdlib's
'domain'): every document is tokenized once when the iterator is made and cut into windows of seq_len tokens (the
last one padded), each labelled with its document's label; the windows are shuffled (a new order each epoch).
`inputs` int32 [B, T], `mask` float32 [B, T], `label` int32 [B]. Meant for corpora that fit in memory as tokens.

Format 'text_pairs' (a dataset with Text features `query` and `document`, e.g. the embedded 'stdlib_doc_code'):
each record gives one row, its query and its document each tokenized (BOS + ids + EOS), cut to seq_len tokens and
padded: `query` int32 [B, T], `query_mask` float32 [B, T], `document` int32 [B, T], `document_mask` float32 [B, T],
and `domain` int32 [B] (the record's `domain` label; 0 when the dataset has none). Records are shuffled (a new order
each epoch); row i's document is the one relevant to row i's query.

Format 'images': `image` as float32 (uint8 images are scaled to [0, 1]), `label` as int32. Explicit options make
the images those a model takes: `data.channels` (1 -> C replicates the gray channel; 3 -> 1 takes the luminance) and
`data.image_size` (bilinear resize to S x S, `resize_bilinear`); `dataset_info` reports the shape after both.
Augmentation (`data.augment`, training iterator only, see `make_iterator(augment=)`): `crop_padding` (zero padding +
a random crop of the image's size), `flip` (left-right, probability 1/2), then, per batch, `mixup` (the batch mixed
with a permutation of itself; the batches then carry `label_b` and `mix`, see `zoo.data.config`). Every random draw
comes from a generator seeded by (the seed, this host, the stream) and the position of the example (or batch) in the
shuffled, repeated sequence, so the batches are a function of the seed and the iterator position: the same seed gives
the same batches and a restored iterator state the same next batches; each epoch draws anew.

Format 'arrays' (a dataset whose features are all fixed-shape numeric tensors or ClassLabels, one ClassLabel named
'label', e.g. the embedded 'loopback_traffic', 'can_bus' and 'ctr_domains'): every feature under its own name,
integers as int32 and floats as float32 (uint8 bytes become int32 0..255, not scaled). The dataset info lists them
(`features`: name -> (shape, dtype)) with what the builder's `FORMAT_INFO` adds (vocabulary sizes, cardinalities).

Multi-host: the examples of a split are dealt to hosts round-robin (host p reads examples p, p + P, ...), so hosts
read disjoint examples; each host packs and batches its own share and yields global_batch_size // process_count rows.
The rows of all hosts together are not the rows a single host would yield.

The returned iterator is a grain `DatasetIterator`: `get_state()` returns a small JSON-serialisable dict and
`set_state(state)` resumes so that the next batches are exactly those that followed when the state was taken.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from zoo.data import builders, partition
from zoo.data.config import resolve_data_config
from zoo.data.tokenizer import make_tokenizer

# Reads run ahead in a few threads; the order (and so the iterator state) does not depend on them.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


def _builder(cfg: dict[str, Any]) -> tfds.core.DatasetBuilder:
  name, data_dir = cfg["name"], cfg["data_dir"]
  if name in builders.EMBEDDED_BUILDERS:
    return builders.EMBEDDED_BUILDERS[name](data_dir=data_dir, file_format="array_record")
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f"data config: name={name!r} is not a dataset; allowed: {sorted(builders.EMBEDDED_BUILDERS)} "
      f"or a TFDS dataset name (see `tfds.list_builders()`)"
    ) from e


def _format_info(builder: tfds.core.DatasetBuilder, cfg: dict[str, Any]) -> dict[str, Any]:
  features = builder.info.features
  text_key = cfg["text_key"]
  if _has_text_pairs(features):
    if cfg["label_key"]:
      raise ValueError(
        f"data config: label_key={cfg['label_key']!r} but dataset {cfg['name']!r} holds (query, document) pairs "
        f"(format 'text_pairs'); allowed: label_key=''"
      )
    tok = make_tokenizer(cfg["tokenizer"])
    info = {
      "format": "text_pairs",
      "vocab_size": tok.vocab_size,
      "pad_id": _pad_id(tok),
      "bos_id": tok.bos_id,
      "eos_id": tok.eos_id,
    }
  elif text_key in features and isinstance(features[text_key], tfds.features.Text):
    tok = make_tokenizer(cfg["tokenizer"])
    info = {
      "format": "text",
      "vocab_size": tok.vocab_size,
      "pad_id": _pad_id(tok),
      "bos_id": tok.bos_id,
      "eos_id": tok.eos_id,
    }
    label_key = cfg["label_key"]
    if label_key:
      if not isinstance(features[label_key] if label_key in features else None, tfds.features.ClassLabel):
        labels = sorted(k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel))
        raise ValueError(
          f"data config: label_key={label_key!r} is not a ClassLabel feature of dataset "
          f"{cfg['name']!r}; allowed: {labels} or '' (packed text)"
        )
      info.update(
        format="labelled_text",
        num_classes=features[label_key].num_classes,
        label_names=tuple(features[label_key].names),
      )
  elif cfg["label_key"]:
    raise ValueError(
      f"data config: label_key={cfg['label_key']!r} but dataset {cfg['name']!r} has no Text feature "
      f"text_key={text_key!r}; allowed: label_key='' for it"
    )
  elif "image" in features and "label" in features and isinstance(features["label"], tfds.features.ClassLabel):
    shape = tuple(features["image"].shape)
    if None in shape:
      raise ValueError(
        f"dataset {cfg['name']!r} has images of varying shape {shape}; allowed: datasets whose "
        f"'image' feature has a fixed shape (e.g. cifar10, digits)"
      )
    info = {"format": "images", "num_classes": features["label"].num_classes, "image_shape": _image_shape(shape, cfg)}
    if cfg.get("clusters"):
      info["clusters"] = cfg["clusters"]
  elif _has_arrays(features):
    info = {
      "format": "arrays",
      "features": {k: _array_spec(f) for k, f in features.items()},
      "num_classes": features["label"].num_classes,
      "label_names": tuple(features["label"].names),
      **getattr(builder, "FORMAT_INFO", {}),
    }
  else:
    raise ValueError(
      f"dataset {cfg['name']!r} has features {sorted(features)}; allowed: a Text feature named "
      f"text_key={text_key!r} (format 'text'), 'image' + ClassLabel 'label' (format 'images'), or fixed-shape "
      f"tensors + ClassLabel 'label' (format 'arrays')"
    )
  if info["format"] != "images":
    given = [k for k in ("image_size", "channels") if cfg[k]] + [f"augment.{k}" for k, v in cfg["augment"].items() if v]
    if given:
      raise ValueError(
        f"data config: {given[0]}={_get(cfg, given[0])!r} applies to image datasets; dataset {cfg['name']!r} has "
        f"format {info['format']!r} (allowed: {given[0]}=0/False for it)"
      )
  if "domain" in features and isinstance(features["domain"], tfds.features.ClassLabel):
    info["domains"] = tuple(features["domain"].names)
  if cfg.get("clusters") and info["format"] != "images":
    raise ValueError(
      f"data config: clusters={cfg['clusters']} partitions image datasets; dataset {cfg['name']!r} has format "
      f"{info['format']!r}"
    )
  return info


def _get(cfg: dict[str, Any], key: str):
  """cfg[key] for a dotted key ('augment.flip')."""
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def _image_shape(stored: tuple[int, ...], cfg: dict[str, Any]) -> tuple[int, int, int]:
  """The (H, W, C) the pipeline yields for images stored as `stored` under `data.image_size` and `data.channels`.

  Raises:
    ValueError: a channel conversion other than 1 -> C or 3 -> 1, or images that are not [H, W, C].
  """
  if len(stored) != 3:
    raise ValueError(f"dataset {cfg['name']!r} has images of shape {stored}; allowed: [height, width, channels]")
  height, width, channels = stored
  want = cfg["channels"] or channels
  if want != channels and channels != 1 and (channels, want) != (3, 1):
    raise ValueError(
      f"data config: channels={want} cannot be made from the {channels}-channel images of dataset {cfg['name']!r}; "
      f"allowed: 0 or {channels} (as stored), 1 (luminance, from 3 channels) or any C from 1 channel (replicated)"
    )
  if cfg["image_size"]:
    height = width = cfg["image_size"]
  return (height, width, want)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of one image [h, w, C] float32 to [height, width, C] (half-pixel centres, edges clamped, no
  antialiasing: `jax.image.resize(..., 'linear', antialias=False)`)."""
  image = np.asarray(image, np.float32)
  if image.shape[:2] == (height, width):
    return image
  rows = _interpolation_matrix(image.shape[0], height)
  cols = _interpolation_matrix(image.shape[1], width)
  return np.einsum("yh,hwc,xw->yxc", rows, image, cols).astype(np.float32)


def _interpolation_matrix(size: int, new_size: int) -> np.ndarray:
  """[new_size, size] float32 weights of linear interpolation at the half-pixel centres of `new_size` samples."""
  centres = (np.arange(new_size) + 0.5) * (size / new_size) - 0.5
  centres = np.clip(centres, 0, size - 1)
  low = np.floor(centres).astype(np.int64)
  high = np.minimum(low + 1, size - 1)
  frac = (centres - low).astype(np.float32)
  matrix = np.zeros((new_size, size), np.float32)
  np.add.at(matrix, (np.arange(new_size), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(new_size), high), frac)
  return matrix


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """image [H, W, c] float32 with `channels` channels: the same; 1 -> C replicated; 3 -> 1 luminance (BT.601)."""
  have = image.shape[-1]
  if channels in (0, have):
    return image
  if have == 1:
    return np.repeat(image, channels, axis=-1)
  if (have, channels) == (3, 1):
    return (image @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
  raise ValueError(f"convert_channels: {have} -> {channels} channels; allowed: 1 -> C, 3 -> 1")


def _has_arrays(features) -> bool:
  """Whether every feature is a fixed-shape numeric tensor or a ClassLabel, one of them 'label' (format 'arrays')."""
  if not isinstance(features["label"] if "label" in features else None, tfds.features.ClassLabel):
    return False
  return all(
    isinstance(f, tfds.features.ClassLabel)
    or (isinstance(f, tfds.features.Tensor) and None not in f.shape and np.dtype(f.np_dtype).kind in "biuf")
    for f in features.values()
  )


def _array_dtype(dtype) -> str:
  """The batch dtype of an 'arrays' feature: integers (and booleans) as int32, floats as float32."""
  return "float32" if np.dtype(dtype).kind == "f" else "int32"


def _array_spec(feature) -> tuple[tuple[int, ...], str]:
  """(shape, batch dtype name) of one feature of an 'arrays' dataset (a ClassLabel is an int32 scalar)."""
  if isinstance(feature, tfds.features.ClassLabel):
    return (), "int32"
  return tuple(feature.shape), _array_dtype(feature.np_dtype)


def _has_text_pairs(features) -> bool:
  """Whether a dataset's features hold (query, document) text pairs (format 'text_pairs')."""
  return all(isinstance(features[k] if k in features else None, tfds.features.Text) for k in ("query", "document"))


def dataset_info(data_config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """What the engine needs to know about a dataset, without reading it.

  Args:
    data_config: the data config (`zoo.data.config`).

  Returns:
    {'format': 'text', 'vocab_size', 'pad_id', 'bos_id', 'eos_id'} (the tokenizer's) for text; the same plus
    'num_classes' and 'label_names' with format 'labelled_text'; the same keys as text with format 'text_pairs';
    {'format': 'images', 'num_classes', 'image_shape':
    (H, W, C)} for images; plus 'domains' (the names) when the dataset has a `domain` label.
  """
  cfg = resolve_data_config(data_config)
  return _format_info(_builder(cfg), cfg)


def _pad_id(tokenizer) -> int:
  """The id padding rows hold (always with mask 0): the tokenizer's PAD, else 0 [guess: any id works under mask 0]."""
  return tokenizer.pad_id if tokenizer.pad_id is not None else 0


def _open_source(cfg: dict[str, Any], split: str):
  """The random-access source of `split` and the builder; builds the embedded datasets on first use."""
  name, data_dir = cfg["name"], cfg["data_dir"]
  if name in builders.EMBEDDED_BUILDERS:
    builder = builders.prepare(name, data_dir)
    if split not in builder.info.splits:
      raise ValueError(f"split={split!r} is not a split of dataset {name!r}; allowed: {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split), builder
  builder = _builder(cfg)
  try:
    return builder.as_data_source(split=split), builder
  except Exception as e:  # Turned into a clear message when the cause is a missing or unreadable preparation.
    if not builder.is_prepared():
      raise ValueError(
        f"dataset {name!r} is not prepared in data_dir={data_dir!r} (looked for {builder.data_path}). Prepare it "
        f"once, on a machine with TensorFlow and network access, with `tfds build {name} --data_dir={data_dir} "
        f"--file_format=array_record`, or set data.data_dir (or $ZOO_DATA_DIR) to a directory that has it."
      ) from e
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(
        f"dataset {name!r} in {builder.data_path} is stored as {builder.info.file_format.value}; reading it needs "
        f"array_record. Convert it with `tfds convert_format --dataset_dir={builder.data_path} "
        f"--out_file_format=array_record` or rebuild it with `--file_format=array_record`."
      ) from e
    raise


class _Subset:
  """The records `indices` of a random-access source, as a random-access source."""

  def __init__(self, source, indices: list[int]):
    self._source = source
    self._indices = indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[self._indices[i]]


def _select(source, builder, cfg: dict[str, Any]) -> list[int]:
  """The indices of the records of `source` in the wanted domains (all when `domains` is empty)."""
  if not cfg["domains"]:
    return list(range(len(source)))
  features = builder.info.features
  feature = features["domain"] if "domain" in features else None
  if not isinstance(feature, tfds.features.ClassLabel):
    raise ValueError(
      f"data config: domains={cfg['domains']} but dataset {cfg['name']!r} has no 'domain' label; "
      f"allowed: domains=() for it"
    )
  unknown = sorted(set(cfg["domains"]) - set(feature.names))
  if unknown:
    raise ValueError(f"data config: domains {unknown} are not domains of {cfg['name']!r}; allowed: {feature.names}")
  wanted = {feature.str2int(d) for d in cfg["domains"]}
  return [i for i in range(len(source)) if int(source[i]["domain"]) in wanted]


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
  """Record -> {'tokens': int32 [BOS + ids + EOS], 'token_bytes': float32 [same]} (`make_tokenizer(tokenizer)`)."""

  text_key: str
  tokenizer: str

  def map(self, record):
    tokens, token_bytes = make_tokenizer(self.tokenizer).encode_with_bytes(record[self.text_key])
    return {"tokens": tokens, "token_bytes": token_bytes}


@dataclasses.dataclass(frozen=True)
class _ToLmExample(grain.transforms.Map):
  """Packed chunk {'tokens', 'token_bytes', 'tokens_segment_ids'} [T+1] -> inputs/targets int32 [T], mask and
  target_bytes float32 [T]."""

  pad_id: int

  def map(self, packed):
    real = packed["tokens_segment_ids"] != 0
    tokens = np.where(real, packed["tokens"], self.pad_id).astype(np.int32)
    mask = real[1:].astype(np.float32)
    return {
      "inputs": tokens[:-1],
      "targets": tokens[1:],
      "mask": mask,
      "target_bytes": np.where(real[1:], packed["token_bytes"][1:], 0).astype(np.float32),
    }


def _labelled_windows(source, cfg: dict[str, Any], pad_id: int) -> list[dict[str, np.ndarray]]:
  """Every record of `source` tokenized and cut into windows of seq_len tokens (last one padded), in record order:
  [{'inputs': int32 [T], 'mask': float32 [T], 'label': int32 []}]."""
  tok, length, windows = make_tokenizer(cfg["tokenizer"]), cfg["seq_len"], []
  for i in range(len(source)):
    record = source[i]
    ids = tok.encode(record[cfg["text_key"]])
    label = np.int32(record[cfg["label_key"]])
    for start in range(0, len(ids), length):
      piece = ids[start : start + length]
      mask = np.zeros(length, np.float32)
      mask[: len(piece)] = 1.0
      windows.append(
        {
          "inputs": np.pad(piece, (0, length - len(piece)), constant_values=pad_id).astype(np.int32),
          "mask": mask,
          "label": label,
        }
      )
  return windows


@dataclasses.dataclass(frozen=True)
class _ToPairExample(grain.transforms.Map):
  """Record {'query', 'document', ['domain']} -> {'query', 'document': int32 [T], 'query_mask', 'document_mask':
  float32 [T], 'domain': int32 []}: each text as BOS + ids + EOS, cut to seq_len tokens, padded with pad_id."""

  tokenizer: str
  seq_len: int
  pad_id: int

  def map(self, record):
    tok, example = make_tokenizer(self.tokenizer), {}
    for key in ("query", "document"):
      ids = tok.encode(record[key])[: self.seq_len]
      mask = np.zeros(self.seq_len, np.float32)
      mask[: len(ids)] = 1.0
      example[key] = np.pad(ids, (0, self.seq_len - len(ids)), constant_values=self.pad_id).astype(np.int32)
      example[f"{key}_mask"] = mask
    example["domain"] = np.int32(record["domain"] if "domain" in record else 0)
    return example


@dataclasses.dataclass(frozen=True)
class _ToImageExample(grain.transforms.Map):
  """Record -> {'image': float32 [H, W, C] (uint8 scaled to [0, 1]; `channels` converted and resized to `size` x
  `size` when non-zero), 'label': int32 [] (and 'cluster' int32 [] with `data.clusters`)}."""

  image_size: int = 0
  channels: int = 0

  def map(self, record):
    image = np.asarray(record["image"])
    image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    image = convert_channels(image, self.channels)
    if self.image_size:
      image = resize_bilinear(image, self.image_size, self.image_size)
    example = {"image": image, "label": np.int32(record["label"])}
    if "cluster" in record:
      example["cluster"] = np.int32(record["cluster"])
    return example


@dataclasses.dataclass(frozen=True)
class _CropFlip(grain.transforms.RandomMap):
  """Example {'image': [H, W, C], ...} -> the same with the image randomly cropped from its zero-padded self
  (`padding` pixels on every side; offsets uniform in [0, 2 padding]) and, with `flip`, flipped left-right with
  probability 1/2 (the CIFAR recipe of ResNet, He et al. 2016, sec. 4.2). Draws the offsets first, then the flip."""

  padding: int
  flip: bool

  def random_map(self, example, rng):
    image = example["image"]
    if self.padding:
      p = self.padding
      dy, dx = rng.integers(0, 2 * p + 1, size=2)
      padded = np.pad(image, ((p, p), (p, p), (0, 0)))
      image = padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {**example, "image": np.ascontiguousarray(image)}


@dataclasses.dataclass(frozen=True)
class _Mixup(grain.transforms.RandomMap):
  """Batch {'image': [B, H, W, C], 'label': [B], ...} -> mixed with a permutation of itself (mixup, Zhang et al.
  2018, eq. (1)): image = lam image + (1 - lam) image[perm], `label_b` = label[perm], `mix` = lam [B], one lam ~
  Beta(alpha, alpha) per batch and a uniform permutation (as the authors' code). With `alpha` = 0 (evaluation) the
  batch gets `label_b` = label and `mix` = 1, so that every batch of a mixup run has the same entries."""

  alpha: float

  def random_map(self, batch, rng):
    labels, rows = batch["label"], len(batch["label"])
    if not self.alpha:
      return {**batch, "label_b": labels.copy(), "mix": np.ones(rows, np.float32)}
    lam = np.float32(rng.beta(self.alpha, self.alpha))
    perm = rng.permutation(rows)
    image = lam * batch["image"] + (1 - lam) * batch["image"][perm]
    return {**batch, "image": image.astype(np.float32), "label_b": labels[perm], "mix": np.full(rows, lam)}


def _augment_seed(seed: int, process_index: int, stream: int) -> int:
  """A seed in [0, 2**32) for one augmentation stream of one host, independent of the shuffle's."""
  return int(np.random.SeedSequence([int(seed), process_index, stream]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _ToArrays(grain.transforms.Map):
  """Record -> every feature as a numpy array, integers as int32 and floats as float32 (format 'arrays')."""

  def map(self, record):
    return {k: np.asarray(v).astype(_array_dtype(np.asarray(v).dtype)) for k, v in record.items()}


class _Clustered:
  """A random-access source whose records also carry their k-means cluster (`zoo.data.partition`)."""

  def __init__(self, source, clusters):
    self._source = source
    self._clusters = clusters

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    return {**self._source[i], "cluster": self._clusters[i]}


def _cluster_filter(cfg):
  return f" cluster={cfg['cluster']} of {cfg['clusters']}" if cfg["clusters"] and cfg["cluster"] >= 0 else ""


def _with_clusters(source, indices, cfg, info):
  """(source, indices) with `data.clusters` > 0: the records carry their cluster and, with `data.cluster` >= 0, only
  that cluster's are kept."""
  k = cfg["clusters"]
  if not k:
    return source, indices
  if info["format"] != "images":
    raise ValueError(
      f"data config: clusters={k} partitions image datasets; dataset {cfg['name']!r} has format {info['format']!r}"
    )
  train, _ = _open_source(cfg, cfg["train_split"])
  key = (cfg["name"], cfg["data_dir"], cfg["train_split"])
  centroids = partition.centroids(key, k, lambda: partition.flat_images(train, range(len(train))))
  clusters = np.full(len(source), -1, np.int32)
  clusters[indices] = partition.assign(partition.flat_images(source, indices), centroids)
  if cfg["cluster"] >= 0:
    indices = [i for i in indices if clusters[i] == cfg["cluster"]]
  return _Clustered(source, clusters), indices


def make_iterator(
  data_config: Mapping[str, Any] | ml_collections.ConfigDict,
  *,
  split: str,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  repeat: bool = True,
  drop_remainder: bool = True,
  augment: bool | None = None,
) -> "DataIterator":
  """A checkpointable iterator over this host's share of the batches of one split.

  Args:
    data_config: the data config (`zoo.data.config`).
    split: a split of the dataset ('train', 'validation' for pystdlib, 'test' for digits, TFDS slices such as
      'train[:10%]' for standard datasets).
    global_batch_size: rows per step over all hosts; a multiple of process_count.
    seed: shuffle seed, in [0, 2**32).
    process_index: this host, in [0, process_count).
    process_count: the number of hosts.
    repeat: loop forever (a new shuffle each epoch); False ends after one pass.
    drop_remainder: with repeat=False, drop the last partial batch (True) or yield it with fewer than B rows
      (False, for exact evaluation: every example exactly once).
    augment: apply `data.augment` (image datasets); None = only when training, i.e. `split` is `data.train_split`
      and `repeat` is True (evaluation iterators have repeat=False).

  Returns:
    A `DataIterator` (`get_state()`/`set_state()`, see there) of dicts of numpy arrays, B = global_batch_size //
    process_count: text {'inputs': int32 [B, T], 'targets': int32 [B, T], 'mask': float32 [B, T]} with T = seq_len;
    text_pairs {'query', 'document': int32 [B, T], 'query_mask', 'document_mask': float32 [B, T], 'domain': int32 [B]};
    images {'image': float32 [B, H, W, C], 'label': int32 [B]} (plus 'label_b' int32 [B] and 'mix' float32 [B]
    with `data.augment.mixup` > 0, also when not augmenting).

  Raises:
    ValueError: a bad config key or value, batch size, host index, split or domain filter, an empty selection, or a
      standard dataset that is not prepared.
  """
  cfg = resolve_data_config(data_config)
  for key, value in (("global_batch_size", global_batch_size), ("process_count", process_count)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"make_iterator: {key}={value!r}; allowed: an int >= 1")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(
      f"make_iterator: process_index={process_index!r}; allowed: 0 <= process_index < process_count={process_count}"
    )
  if global_batch_size % process_count:
    raise ValueError(
      f"make_iterator: global_batch_size={global_batch_size} is not divisible by "
      f"process_count={process_count}; allowed: a multiple of process_count"
    )
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"make_iterator: seed={seed!r}; allowed: an int in [0, 2**32)")
  batch_size = global_batch_size // process_count

  source, builder = _open_source(cfg, split)
  info = _format_info(builder, cfg)
  indices = _select(source, builder, cfg)
  source, indices = _with_clusters(source, indices, cfg, info)
  if info["format"] == "labelled_text":  # the windows, not the documents, are dealt to the hosts
    source, indices = _labelled_windows(_Subset(source, indices), cfg, info["pad_id"]), None
    indices = list(range(len(source)))
  indices = indices[process_index::process_count]
  if not indices:
    raise ValueError(
      f"dataset {cfg['name']!r} split={split!r} domains={cfg['domains'] or 'all'}{_cluster_filter(cfg)} has no "
      f"examples for "
      f"host {process_index} of {process_count}; allowed: a split, domain filter and process_count "
      f"that leave every host at least one example"
    )
  ds = grain.MapDataset.source(_Subset(source, indices))
  if cfg["shuffle"]:
    ds = ds.shuffle(int(seed))
  if repeat:
    ds = ds.repeat()
  if info["format"] == "text":
    it = ds.map(_Tokenize(cfg["text_key"], cfg["tokenizer"])).to_iter_dataset(_READ_OPTIONS)
    length = cfg["seq_len"] + 1
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": length, "token_bytes": length})
    it = it.map(_ToLmExample(info["pad_id"])).batch(batch_size, drop_remainder=drop_remainder)
  elif info["format"] == "labelled_text":
    it = ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset(_READ_OPTIONS)
  elif info["format"] == "text_pairs":
    ds = ds.map(_ToPairExample(cfg["tokenizer"], cfg["seq_len"], info["pad_id"]))
    it = ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset(_READ_OPTIONS)
  elif info["format"] == "arrays":
    it = ds.map(_ToArrays()).batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset(_READ_OPTIONS)
  else:
    augment = (repeat and split == cfg["train_split"]) if augment is None else augment
    it = _image_batches(ds, cfg, batch_size, drop_remainder, augment, int(seed), process_index)
  if cfg["worker_count"]:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a script without absl.app has not parsed them
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg["worker_count"]))
  fingerprint = {
    "dataset": cfg["name"],
    "split": split,
    "domains": list(cfg["domains"]),
    "examples": len(indices),
    "process_count": process_count,
  }
  if cfg["clusters"]:
    fingerprint.update(clusters=cfg["clusters"], cluster=cfg["cluster"])
  if info["format"] not in ("images", "arrays"):
    fingerprint["seq_len"] = cfg["seq_len"]
    fingerprint["tokenizer"] = cfg["tokenizer"]
  return DataIterator(iter(it), fingerprint)


def _image_batches(ds, cfg, batch_size, drop_remainder, augment, seed, process_index):
  """The iter dataset of image batches: examples converted (`_ToImageExample`), cropped and flipped when augmenting,
  batched, then mixed (`_Mixup`, entries added even when not augmenting)."""
  ds = ds.map(_ToImageExample(cfg["image_size"], cfg["channels"]))
  aug = cfg["augment"]
  if augment and (aug["crop_padding"] or aug["flip"]):
    ds = ds.random_map(_CropFlip(aug["crop_padding"], aug["flip"]), seed=_augment_seed(seed, process_index, 1))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if aug["mixup"]:
    ds = ds.random_map(_Mixup(aug["mixup"] if augment else 0.0), seed=_augment_seed(seed, process_index, 2))
  return ds.to_iter_dataset(_READ_OPTIONS)


class DataIterator:
  """A grain iterator whose state also records which data it reads (`fingerprint`).

  `get_state()` -> {'grain': grain's JSON state, 'fingerprint': {dataset, split, domains, examples, process_count,
  seq_len}}. `set_state` refuses a state taken over other data (a resumed run would silently read another order), and
  still takes the bare grain state that older checkpoints hold.
  """

  def __init__(self, iterator, fingerprint):
    self._iterator = iterator
    self.fingerprint = fingerprint

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def get_state(self):
    return {"grain": self._iterator.get_state(), "fingerprint": dict(self.fingerprint)}

  def set_state(self, state):
    """Raises ValueError naming the first key whose saved value differs from this iterator's data."""
    if isinstance(state, dict) and "grain" in state and "fingerprint" in state:
      for key, value in self.fingerprint.items():
        saved = state["fingerprint"].get(key)
        if saved != value:
          raise ValueError(
            f"the saved data position was taken over {key}={saved!r} but this run reads {key}={value!r}; "
            f"allowed: the data config the checkpoint was written with (start a new workdir, with "
            f"config.init_from=<old workdir>, to train on other data)"
          )
      state = state["grain"]
    self._iterator.set_state(state)
