"""TFDS builders for the embedded datasets, which need no download.

* `pystdlib`: the running interpreter's standard-library source files (`*.py` under `sysconfig.get_paths()['stdlib']`)
  and the English documentation topics of `pydoc_data.topics` (one document per topic). Features: `text`, `path`
  (the file path relative to the stdlib, or `pydoc_data/topics/<topic>`) and `domain` (a ClassLabel: 'docs' for the
  topics, the top-level package for files in a package, 'modules' for top-level single-file modules). Splits
  `train` / `validation`, by a hash of the path (about 5% validation), so a file is never in both. One builder config
  per Python minor version (`py3_11`, ...), because the corpus is that interpreter's stdlib.
* `digits`: scikit-learn's 8x8 digits, `image` float32 [8, 8, 1] in [0, 1], `label` in 0..9; splits `train` (1500)
  and `test` (297), by a fixed permutation.

Both are written as array_record, read with `tfds.data_source`-style random access; no TensorFlow is needed.
`prepare(name, data_dir)` builds once under a file lock, so that processes starting together build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from zoo.data.config import resolve_data_dir

# Directories never read: installed packages, test suites, build files, codec tables.
# pydoc_data is replaced by its topics (below); __phello__ is a test package.
_SKIPPED_DIRS = frozenset(
  {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "lib-dynload",
    "encodings",
    "pydoc_data",
    "__phello__",
  }
)
MAX_FILE_BYTES = 256 * 1024  # larger stdlib files are skipped
MAX_CODE_BYTES = 4 * 1024 * 1024  # code files are taken in hash order of their path until this total
VALIDATION_PERCENT = 5


def _path_hash(salt: str, path: str) -> int:
  return int.from_bytes(hashlib.sha256(f"{salt}:{path}".encode()).digest()[:8], "big")


def split_of(path: str) -> str:
  """The split ('train' | 'validation') of a document, from a hash of its path alone."""
  return "validation" if _path_hash("split", path) % 100 < VALIDATION_PERCENT else "train"


def _domain_of(relpath: str) -> str:
  parts = relpath.split("/")
  return parts[0] if len(parts) > 1 else "modules"


@functools.cache
def stdlib_files() -> tuple[tuple[str, str], ...]:
  """The (relative path, absolute path) pairs of the stdlib code files in the corpus, sorted by relative path.

  Deterministic for a given interpreter: files over MAX_FILE_BYTES or not valid UTF-8 are skipped, and the rest are
  taken in the order of a hash of their relative path until MAX_CODE_BYTES.
  """
  root = sysconfig.get_paths()["stdlib"]
  candidates = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("config-"))
    for filename in sorted(filenames):
      if not filename.endswith(".py"):
        continue
      abspath = os.path.join(dirpath, filename)
      size = os.path.getsize(abspath)
      if size <= MAX_FILE_BYTES:
        candidates.append((os.path.relpath(abspath, root).replace(os.sep, "/"), abspath, size))
  chosen, total = [], 0
  for relpath, abspath, size in sorted(candidates, key=lambda c: _path_hash("order", c[0])):
    if total + size > MAX_CODE_BYTES:
      continue
    chosen.append((relpath, abspath))
    total += size
  return tuple(sorted(chosen))


def _pydoc_topics() -> dict[str, str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  return topics.topics


@functools.cache
def stdlib_domains() -> tuple[str, ...]:
  """The sorted domain names of the corpus ('docs', 'modules' and the stdlib packages)."""
  return tuple(sorted({"docs", "modules"} | {_domain_of(rel) for rel, _ in stdlib_files()}))


def _read_utf8(path: str) -> str | None:
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


class PyStdlib(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The Python standard library's source and documentation topics, as a text corpus (see module docstring)."""

  name = "pystdlib"
  # No checksums file: there is nothing to download (TFDS would otherwise locate one next to this module).
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stdlib *.py files (capped) + pydoc_data topics; hash-of-path split; domain labels."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name=f"py{sys.version_info.major}_{sys.version_info.minor}",
      description=f"The standard library of Python {sys.version_info.major}.{sys.version_info.minor}.",
    )
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),
          "path": tfds.features.Text(),
          "domain": tfds.features.ClassLabel(names=stdlib_domains()),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split: str):
    for relpath, abspath in stdlib_files():
      if split_of(relpath) == split:
        text = _read_utf8(abspath)
        if text is not None:
          yield relpath, {"text": text, "path": relpath, "domain": _domain_of(relpath)}
    for topic, text in sorted(_pydoc_topics().items()):
      path = f"pydoc_data/topics/{topic}"
      if split_of(path) == split:
        yield path, {"text": text, "path": path, "domain": "docs"}


DIGITS_TRAIN_SIZE = 1500


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """scikit-learn's 8x8 handwritten digits (UCI optical recognition set), 1797 images, 10 classes."""

  name = "digits"
  # No checksums file: there is nothing to download (TFDS would otherwise locate one next to this module).
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "float32 [8, 8, 1] images in [0, 1]; fixed 1500/297 train/test split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split: str):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    chosen = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
    for i in chosen:
      image = (digits.images[i] / 16.0).astype(np.float32)[:, :, None]
      yield int(i), {"image": image, "label": int(digits.target[i])}


EMBEDDED_BUILDERS = {"pystdlib": PyStdlib, "digits": Digits}


@contextlib.contextmanager
def _file_lock(path: str):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds the embedded dataset `name` into `data_dir` unless it is there, and returns its builder.

  Safe when several processes call it at once: the build runs under an exclusive lock on
  `data_dir/.<name>.lock`, and the others find the finished dataset. A prepared dataset is opened without the lock.

  Args:
    name: a key of EMBEDDED_BUILDERS.
    data_dir: the TFDS data directory; None = the default of `zoo.data.config.resolve_data_dir`.
  """
  if name not in EMBEDDED_BUILDERS:
    raise ValueError(f"prepare: unknown embedded dataset {name!r}; allowed: {sorted(EMBEDDED_BUILDERS)}")
  data_dir = resolve_data_dir(data_dir)
  builder = EMBEDDED_BUILDERS[name](data_dir=data_dir, file_format="array_record")
  # No lock needed, so a read-only data_dir works. A builder made while another process was finishing the build has
  # read no dataset info (empty splits) though the data is there by now: it takes the locked path and is made again.
  if builder.is_prepared() and builder.info.splits:
    return builder
  os.makedirs(data_dir, exist_ok=True)
  with _file_lock(os.path.join(data_dir, f".{name}.lock")):
    builder = EMBEDDED_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
  return builder
