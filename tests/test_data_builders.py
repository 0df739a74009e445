"""The embedded TFDS builders: pystdlib (split by file, domains, contents) and digits; concurrent builds."""

import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from zoo.data import builders


def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def stdlib_builder(tmp_path_factory):
  return builders.prepare("pystdlib", str(tmp_path_factory.mktemp("data")))


def test_split_is_disjoint_by_file_and_deterministic(stdlib_builder, tmp_path):
  paths = {s: [_text(r["path"]) for r in _records(stdlib_builder, s)] for s in ("train", "validation")}
  train, validation = set(paths["train"]), set(paths["validation"])
  assert len(train) == len(paths["train"]) and len(validation) == len(paths["validation"])  # one record per file
  assert not train & validation
  assert 0.01 < len(validation) / (len(train) + len(validation)) < 0.15  # about 5%
  assert all(builders.split_of(p) == "validation" for p in validation)
  assert all(builders.split_of(p) == "train" for p in train)
  again = builders.prepare("pystdlib", str(tmp_path))  # an independent build gives the same files per split
  for split, expected in paths.items():
    assert sorted(_text(r["path"]) for r in _records(again, split)) == sorted(expected)


def test_records_hold_the_files_and_topics(stdlib_builder):
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  root = sysconfig.get_paths()["stdlib"]
  names = stdlib_builder.info.features["domain"].names
  records = _records(stdlib_builder, "train") + _records(stdlib_builder, "validation")
  doc_paths = set()
  for record in records:
    path, text, domain = _text(record["path"]), _text(record["text"]), names[record["domain"]]
    if path.startswith("pydoc_data/topics/"):
      assert domain == "docs"
      assert text == topics.topics[path.rsplit("/", 1)[1]]
      doc_paths.add(path)
    else:
      assert domain == (path.split("/")[0] if "/" in path else "modules")
      with open(os.path.join(root, path), encoding="utf-8") as f:
        assert text == f.read()
      assert "site-packages" not in path
  assert len(doc_paths) == len(topics.topics)
  code_bytes = sum(len(_text(r["text"]).encode()) for r in records if names[r["domain"]] != "docs")
  assert 0 < code_bytes <= builders.MAX_CODE_BYTES


def test_digits(tmp_path):
  builder = builders.prepare("digits", str(tmp_path))
  assert builder.info.splits["train"].num_examples == 1500
  assert builder.info.splits["test"].num_examples == 297
  records = _records(builder, "test")
  images = np.stack([r["image"] for r in records])
  labels = np.array([r["label"] for r in records])
  assert images.shape == (297, 8, 8, 1) and images.dtype == np.float32
  assert images.min() == 0.0 and images.max() == 1.0
  assert set(labels.tolist()) <= set(range(10)) and len(set(labels.tolist())) == 10


def test_two_processes_build_at_once(tmp_path):
  code = (
    "import sys; from zoo.data import builders; "
    "b = builders.prepare('pystdlib', sys.argv[1]); print(b.info.splits['train'].num_examples)"
  )
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    for _ in range(2)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  for proc, (_, err) in zip(procs, outs):
    assert proc.returncode == 0, err.decode()
  # Exactly one of them built it (TFDS prints this line when a build finishes); the other waited and opened it.
  assert sum(out.decode().count("downloaded and prepared to") for out, _ in outs) == 1
  counts = {int(out.split()[-1]) for out, _ in outs}
  assert len(counts) == 1
  built = builders.prepare("pystdlib", str(tmp_path))
  assert built.info.splits["train"].num_examples == counts.pop()


def test_prepare_unknown_name(tmp_path):
  with pytest.raises(ValueError, match=r"unknown embedded dataset 'nope'; allowed: \['can_bus', 'ctr_domains', "):
    builders.prepare("nope", str(tmp_path))
