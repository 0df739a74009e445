"""Text retrieval: docstring -> code pairs (extraction, the `stdlib_doc_code` builder and its batches)."""

import os
import sysconfig

import numpy as np
import pytest

from zoo.data import builders, dataset_info, make_iterator
from zoo.data.code_pairs import docstring_summary, extract_doc_code_pairs
from zoo.data.tokenizer import ByteTokenizer

SOURCE = '''
import os


@cache
def add(a, b):
    """Add two numbers together.

    Longer text that is not part of the query.
    """
    return a + b


def short():
    """Too short."""
    return 1


class Box:
    """A box that holds one value."""

    size = 1

    def get(self):
        """Return the value the box holds."""
        def helper():
            """Help with nothing at all."""
            return 0
        return self.value

    def abstract(self):
        """Subclasses implement this method."""


def inline(): "Return two on one line."; return 2


def only_doc():
    """A function with only a docstring."""
'''


def test_extraction_from_source_text():
  pairs = extract_doc_code_pairs(SOURCE)
  assert [(p.name, p.query) for p in pairs] == [
    ("add", "Add two numbers together."),
    ("Box", "A box that holds one value."),
    ("Box.get", "Return the value the box holds."),
    ("Box.get.helper", "Help with nothing at all."),
    ("inline", "Return two on one line."),
  ]  # 'short' (2 words), 'Box.abstract' and 'only_doc' (no code besides the docstring) are left out
  documents = {p.name: p.document for p in pairs}
  assert documents["add"] == "@cache\ndef add(a, b):\n    return a + b"
  assert documents["Box.get"] == "def get(self):\n    def helper():\n        return 0\n    return self.value"
  assert documents["Box.get.helper"] == "def helper():\n    return 0"
  assert documents["inline"] == "def inline(): return 2"
  assert documents["Box"] == (
    "class Box:\n    size = 1\n    def get(self):\n        def helper():\n            return 0\n"
    "        return self.value\n    def abstract(self):\n        ..."
  )  # every docstring inside is removed; a body that was only a docstring becomes '...'
  for pair in pairs:
    assert '"""' not in pair.document and pair.query not in pair.document


def test_docstring_summary_is_the_first_paragraph():
  assert docstring_summary("\n  First line\n  goes on.\n\n  Second paragraph.\n") == "First line goes on."
  assert docstring_summary("One line.") == "One line."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  builders.prepare("stdlib_doc_code", path)
  return path


def _records(data_dir, split):
  source = builders.prepare("stdlib_doc_code", data_dir).as_data_source(split=split)
  return [{k: v.decode() if isinstance(v, bytes) else v for k, v in source[i].items()} for i in range(len(source))]


def test_builder_splits_by_file_with_unique_queries_and_documents(data_dir):
  builder = builders.prepare("stdlib_doc_code", data_dir)
  names = builder.info.features["domain"].names
  assert tuple(names) == tuple(sorted(builders.DOC_CODE_DOMAINS))
  records = {split: _records(data_dir, split) for split in ("train", "validation")}
  paths = {split: {r["path"] for r in rs} for split, rs in records.items()}
  assert not paths["train"] & paths["validation"]
  for split, rs in records.items():
    assert all(builders.split_of(r["path"], builders.DOC_CODE_VALIDATION_PERCENT) == split for r in rs)
    assert {names[r["domain"]] for r in rs} == set(names)  # every domain in both splits
  everything = records["train"] + records["validation"]
  assert len({r["query"] for r in everything}) == len({r["document"] for r in everything}) == len(everything)
  assert 0.1 < len(records["validation"]) / len(everything) < 0.35
  # A record is what extraction gives for its file, and its domain is its package's group.
  root = sysconfig.get_paths()["stdlib"]
  for record in everything[:: max(1, len(everything) // 20)]:
    with open(os.path.join(root, record["path"]), encoding="utf-8") as f:
      pairs = extract_doc_code_pairs(f.read())
    assert (record["name"], record["query"], record["document"]) in {(p.name, p.query, p.document) for p in pairs}
    member = record["path"].split("/")[0].removesuffix(".py")
    assert member in builders.DOC_CODE_DOMAINS[names[record["domain"]]]
  # Deterministic: the same pairs as building again from scratch (the extraction, not the cached result).
  builders.doc_code_pairs.cache_clear()
  again = sorted((p["path"], p["name"], p["query"]) for p in builders.doc_code_pairs() if p["split"] == "validation")
  assert again == sorted((r["path"], r["name"], r["query"]) for r in records["validation"])


def test_pair_batches_hold_each_validation_pair_once(data_dir):
  config = {"name": "stdlib_doc_code", "data_dir": data_dir, "seq_len": 32}
  info = dataset_info(config)
  assert info["format"] == "text_pairs" and info["domains"] == tuple(sorted(builders.DOC_CODE_DOMAINS))
  batches = list(
    make_iterator(config, split="validation", global_batch_size=64, seed=0, repeat=False, drop_remainder=False)
  )
  b = batches[0]
  assert b["query"].shape == b["document"].shape == b["query_mask"].shape == (64, 32) and b["domain"].shape == (64,)
  assert b["query"].dtype == np.int32 and b["query_mask"].dtype == np.float32 and b["domain"].dtype == np.int32
  tok = ByteTokenizer()
  rows = []
  for batch in batches:
    for i in range(len(batch["query"])):
      for key in ("query", "document"):
        ids, mask = batch[key][i], batch[f"{key}_mask"][i]
        assert ids[0] == tok.bos_id and np.all(ids[mask == 0] == tok.pad_id) and np.all(mask[: int(mask.sum())] == 1)
      rows.append((batch["query"][i].tobytes(), batch["document"][i].tobytes(), int(batch["domain"][i])))

  def cut(text):  # BOS + bytes + EOS, cut to 32 tokens, padded
    ids = tok.encode(text)[:32]
    return np.pad(ids, (0, 32 - len(ids)), constant_values=tok.pad_id).astype(np.int32).tobytes()

  expected = [(cut(r["query"]), cut(r["document"]), r["domain"]) for r in _records(data_dir, "validation")]
  assert sorted(rows) == sorted(expected)  # every validation pair once, query with its own document and domain
