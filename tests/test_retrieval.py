"""Text retrieval: docstring -> code pairs (extraction, the `stdlib_doc_code` builder and its batches), the
'retrieval' task's InfoNCE loss, the 'retrieval' evaluator's metrics, and a run through the engine."""

import math
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.data import builders, dataset_info, make_iterator
from zoo.data.code_pairs import docstring_summary, extract_doc_code_pairs
from zoo.data.tokenizer import ByteTokenizer
from zoo.engine import sharding, trainer
from zoo.engine.writers import read_metrics
from zoo.evaluators.retrieval import corpus_ranks, ndcg_at_k, recall_at_k, relevant_ranks, retrieval_metrics
from zoo.models import ConfigError
from zoo.tasks import get_task
from zoo.tasks.retrieval import info_nce

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


# The task: InfoNCE over in-batch negatives.


def test_info_nce_on_a_hand_worked_two_by_two_batch():
  # q1 = (1, 0), q2 = (0, 1); d1 = (1, 0), d2 = (0.6, 0.8): similarities [[1, 0.6], [0, 0.8]]; temperature 0.5 gives
  # logits [[2, 1.2], [0, 1.6]].
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  d = jnp.array([[1.0, 0.0], [0.6, 0.8]])
  loss, correct = info_nce(q, d, jnp.ones(2), 0.5)
  # -log(e^2 / (e^2 + e^1.2)) = log(1 + e^-0.8); -log(e^1.6 / (e^0 + e^1.6)) = log(1 + e^-1.6)
  np.testing.assert_allclose(loss, [math.log(1 + math.exp(-0.8)), math.log(1 + math.exp(-1.6))], rtol=1e-6)
  np.testing.assert_array_equal(correct, [1, 1])
  # Document -> query: column 1 [2, 0] gives log(1 + e^-2), column 2 [1.2, 1.6] gives log(1 + e^-0.4).
  loss, _ = info_nce(q, d, jnp.ones(2), 0.5, symmetric=True)
  expected = [
    (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-2))) / 2,
    (math.log(1 + math.exp(-1.6)) + math.log(1 + math.exp(-0.4))) / 2,
  ]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Row 2 is padding: no negative of row 1, which is then alone (loss 0); row 2's own loss is finite.
  loss, correct = info_nce(q, d, jnp.array([1.0, 0.0]), 0.5)
  np.testing.assert_allclose(loss[0], 0.0, atol=1e-6)
  assert np.isfinite(loss[1]) and correct[0] == 1
  # A swap of the documents: each query's own document is now the worse one.
  loss, correct = info_nce(q, d[::-1], jnp.ones(2), 0.5)
  np.testing.assert_allclose(loss[0], math.log(1 + math.exp(0.8)), rtol=1e-6)
  np.testing.assert_array_equal(correct, [0, 0])


def test_task_interleaves_pairs_normalises_and_weights():
  task = get_task("retrieval", {"temperature": 0.5})
  batch = {
    "query": jnp.array([[1, 2], [3, 4]]),
    "document": jnp.array([[5, 6], [7, 8]]),
    "query_mask": jnp.ones((2, 2)),
    "document_mask": jnp.array([[1.0, 1.0], [1.0, 0.0]]),
    "weight": jnp.array([1.0, 1.0]),
  }
  inputs, _ = task.prepare(batch, {})
  np.testing.assert_array_equal(inputs["tokens"], [[1, 2], [5, 6], [3, 4], [7, 8]])  # q1, d1, q2, d2
  np.testing.assert_array_equal(inputs["mask"], [[1, 1], [1, 1], [1, 1], [1, 0]])
  outputs = jnp.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.6, 0.8]])  # unnormalised q1, d1, q2, d2
  sums = task.stats(outputs, {}, batch)
  metrics = task.finalize(jax.device_get(sums), {})
  expected = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
  assert metrics["accuracy"] == 1.0 and abs(metrics["loss"] - expected) < 1e-6
  for bad in (0.0, -1.0, "0.05"):
    with pytest.raises(ConfigError, match="temperature"):
      get_task("retrieval", {"temperature": bad})


def test_loss_over_a_sharded_global_batch_is_the_whole_batch_loss():
  """Under the engine's data-parallel layout (8 devices here) the [B, B] similarity spans the global batch."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
  task = get_task("retrieval", {"temperature": 0.1})
  rows = 16
  outputs = np.random.default_rng(0).normal(size=(2 * rows, 8)).astype(np.float32)
  weight = np.ones(rows, np.float32)
  weight[-3:] = 0  # padding rows
  spread = {
    "outputs": jax.device_put(outputs, sharding.batch_sharding(mesh, 2)),
    "weight": jax.device_put(weight, sharding.batch_sharding(mesh, 1)),
  }
  assert len(spread["outputs"].sharding.device_set) == 8
  sums = jax.jit(lambda b: task.stats(b["outputs"], {}, {"weight": b["weight"]}))(spread)
  q, d = outputs[0::2], outputs[1::2]
  q, d = q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)
  logits = (q @ d.T / 0.1)[:13, :13]  # the real rows, every real document a negative
  reference = np.log(np.exp(logits).sum(1)) - np.diag(logits)
  np.testing.assert_allclose(float(sums["loss_sum"]), reference.sum(), rtol=1e-4)
  assert float(sums["weight"]) == 13


# The evaluator's metrics, by hand.


def test_ranks_ndcg_and_recall_by_hand():
  scores = np.array(
    [
      [0.1, 0.9, 0.5, 0.3],  # relevant 2 (0.5): 0.9 above it -> rank 2
      [0.9, 0.2, 0.8, 0.7],  # relevant 3 (0.7): 0.9 and 0.8 above it -> rank 3
      [0.4, 0.3, 0.2, 0.1],  # relevant 0: rank 1
      [0.5, 0.5, 0.1, 0.0],  # relevant 1 ties with document 0: counted against it -> rank 2
    ]
  )
  ranks = relevant_ranks(scores, np.array([2, 3, 0, 1]))
  np.testing.assert_array_equal(ranks, [2, 3, 1, 2])
  # nDCG@10 = 1 / log2(rank + 1): rank 1 -> 1, rank 2 -> 1 / log2(3) = 0.6309, rank 3 -> 1 / log2(4) = 0.5.
  np.testing.assert_allclose(ndcg_at_k(ranks, 10), [1 / math.log2(3), 0.5, 1.0, 1 / math.log2(3)])
  np.testing.assert_allclose(ndcg_at_k([10, 11], 10), [1 / math.log2(11), 0.0])  # past the cut-off: 0
  np.testing.assert_array_equal(recall_at_k(ranks, 1), [0, 0, 1, 0])
  np.testing.assert_array_equal(recall_at_k([1, 10, 11], 10), [1, 1, 0])
  metrics = retrieval_metrics([3, 1, 12, 2], domains=[0, 0, 1, 1], domain_names=("a", "b", "empty"))
  assert metrics["queries"] == 4 and metrics["queries_a"] == metrics["queries_b"] == 2
  assert "queries_empty" not in metrics  # a domain without queries is not reported
  np.testing.assert_allclose(metrics["ndcg_at_10"], (0.5 + 1 + 0 + 1 / math.log2(3)) / 4)
  np.testing.assert_allclose(metrics["ndcg_at_10_a"], (0.5 + 1) / 2)
  np.testing.assert_allclose(metrics["ndcg_at_10_b"], (0 + 1 / math.log2(3)) / 2)
  assert metrics["recall_at_1"] == 0.25 and metrics["recall_at_10"] == 0.75
  assert metrics["recall_at_1_a"] == 0.5 and metrics["recall_at_10_b"] == 0.5


def test_corpus_ranks_rank_the_whole_corpus_in_chunks():
  rng = np.random.default_rng(1)
  queries, documents = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
  expected = relevant_ranks(queries @ documents.T, np.arange(7))
  np.testing.assert_array_equal(corpus_ranks(queries, documents, chunk=3), expected)
  unit = documents / np.linalg.norm(documents, axis=1, keepdims=True)
  np.testing.assert_array_equal(corpus_ranks(unit, unit), np.ones(7))  # a unit vector finds itself first


def test_a_small_run_lowers_the_loss_and_evaluates_the_whole_corpus(data_dir, tmp_path):
  from configs.retrieval_stdlib import get_config

  c = get_config()
  c.data.data_dir = data_dir
  c.data.seq_len = 32
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64)
  c.train.update(steps=16, batch_size=16, log_every_steps=1, eval_every_steps=0, eval_batches=2)
  c.optimizer.update(lr=3e-3, warmup_steps=2)
  c.checkpoint.update(every_steps=0, async_save=False)
  trainer.train(c, str(tmp_path), progress=False)
  losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
  assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
  step, results, _ = trainer.evaluate(c, str(tmp_path))
  validation = len(_records(data_dir, "validation"))
  assert step == 16 and results["corpus_size"] == results["queries"] == validation
  assert sum(results[f"queries_{d}"] for d in builders.DOC_CODE_DOMAINS) == validation
  for key in ("ndcg_at_10", "recall_at_1", "recall_at_10", "ndcg_at_10_gui"):
    assert 0 <= results[key] <= 1
  assert results["recall_at_1"] <= results["ndcg_at_10"] <= results["recall_at_10"]
