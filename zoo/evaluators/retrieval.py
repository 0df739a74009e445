"""Corpus-level retrieval (task 'retrieval'): every query of the evaluation split ranks every document of the split.

Each query has exactly one relevant document (its own pair's; the 'stdlib_doc_code' builder keeps no repeated query
or document), so with r the rank of that document (1 = best):
  nDCG@k = 1 / log2(r + 1) if r <= k else 0   (the ideal DCG is 1: one relevant document, gain 1),
  recall@k = 1 if r <= k else 0,
averaged over the queries (Jarvelin & Kekalainen 2002 for nDCG; BEIR, Thakur et al. 2021, reports nDCG@10 as its
headline, as RouterRetriever does). A document scoring the same as the relevant one is counted as ranked before it
(a constant embedding ranks every relevant document last, not first). Per domain: the mean over the queries of
that domain, each still ranking the whole corpus (all domains).
"""

import jax
import numpy as np

from zoo.evaluators.base import Evaluator, register_evaluator
from zoo.tasks.retrieval import split_embeddings

CUTOFFS = {"ndcg": (10,), "recall": (1, 10)}


def relevant_ranks(scores, relevant):
  """The 1-based rank of each query's relevant document.

  Args:
    scores: [queries, documents] similarities.
    relevant: [queries] int, the index of each query's relevant document.

  Returns:
    int64 [queries]: the number of documents scoring at least as high as the relevant one (itself included).
  """
  scores = np.asarray(scores)
  target = scores[np.arange(len(scores)), np.asarray(relevant)]
  return np.sum(scores >= target[:, None], axis=1)


def ndcg_at_k(ranks, k):
  """[queries] ranks -> [queries] nDCG@k of one relevant document: 1 / log2(rank + 1) within the first k, else 0."""
  ranks = np.asarray(ranks, np.float64)
  return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def recall_at_k(ranks, k):
  """[queries] ranks -> [queries] recall@k of one relevant document: 1 within the first k, else 0."""
  return (np.asarray(ranks) <= k).astype(np.float64)


def corpus_ranks(queries, documents, chunk=1024):
  """queries, documents: [N, D] (row i of documents is relevant to row i of queries) -> ranks [N], by dot product
  over the whole corpus, `chunk` queries at a time."""
  queries, documents = np.asarray(queries, np.float32), np.asarray(documents, np.float32)
  ranks = [
    relevant_ranks(queries[i : i + chunk] @ documents.T, np.arange(i, min(i + chunk, len(queries))))
    for i in range(0, len(queries), chunk)
  ]
  return np.concatenate(ranks) if ranks else np.zeros((0,), np.int64)


def retrieval_metrics(ranks, domains=None, domain_names=()):
  """{'ndcg_at_10', 'recall_at_1', 'recall_at_10'} means over all queries, plus each with the suffix '_<domain>'
  over the queries of each domain in `domain_names` that has any, and 'queries' (and 'queries_<domain>') counts.

  Args:
    ranks: [queries] 1-based ranks of the relevant documents.
    domains: [queries] int domain ids (None: no per-domain means).
    domain_names: the names of the domain ids.
  """
  ranks = np.asarray(ranks)
  groups = {"": np.ones(len(ranks), bool)}
  if domains is not None:
    domains = np.asarray(domains)
    groups.update({f"_{name}": domains == i for i, name in enumerate(domain_names) if np.any(domains == i)})
  out = {}
  for suffix, chosen in groups.items():
    out[f"queries{suffix}"] = int(chosen.sum())
    for metric, fn in (("ndcg", ndcg_at_k), ("recall", recall_at_k)):
      for k in CUTOFFS[metric]:
        out[f"{metric}_at_{k}{suffix}"] = float(fn(ranks[chosen], k).mean()) if chosen.any() else 0.0
  return out


def embed_split(exp, state, split=None, max_pairs=None):
  """The query and document embeddings of every pair of `split` (default `config.data.eval_split`), or of its first
  batches holding `max_pairs` pairs.

  Args:
    exp: the `zoo.engine.trainer.Experiment` (its task must be 'retrieval').
    state: the train state whose variables embed.

  Returns:
    (queries [N, D], documents [N, D] float32, L2-normalised; domains [N] int32), padding rows dropped. Every pair
    once in a single-process run; with several processes the last partial global batch is dropped (see
    `Experiment.make_iterator`).
  """
  from zoo.engine import sharding  # pylint: disable=g-import-not-at-top

  def forward(variables, batch):
    inputs, _ = exp.task.prepare(batch, exp.eval_rngs())
    embeddings, _ = exp.model.apply(variables, **inputs, deterministic=True)
    return (*split_embeddings(embeddings), batch["domain"], batch["weight"])  # the global rows, in one order

  forward = jax.jit(forward, out_shardings=sharding.replicated(exp.mesh))
  split = exp.config.data.eval_split if split is None else split
  variables, queries, documents, domains = state.variables(), [], [], []
  for batch in exp.make_iterator(split, repeat=False, drop_remainder=False):
    q, d, domain, weight = jax.device_get(forward(variables, sharding.global_batch(exp.pad(batch), exp.mesh)))
    real = weight > 0
    queries.append(q[real])
    documents.append(d[real])
    domains.append(domain[real])
    if max_pairs is not None and sum(len(x) for x in queries) >= max_pairs:
      break
  queries, documents, domains = (np.concatenate(x)[:max_pairs] for x in (queries, documents, domains))
  return queries, documents, domains.astype(np.int32)


def corpus_retrieval(exp, state):
  """`retrieval_metrics` of `state` over the evaluation split, each query ranking the whole split, plus
  'corpus_size'."""
  queries, documents, domains = embed_split(exp, state)
  names = tuple(exp.info.get("domains", ()))
  return {**retrieval_metrics(corpus_ranks(queries, documents), domains, names), "corpus_size": len(documents)}


@register_evaluator("retrieval")
class CorpusRetrieval(Evaluator):
  """nDCG@10, recall@1 and recall@10 over the whole evaluation split, overall and per domain (see the module
  docstring); keys 'ndcg_at_10', 'recall_at_1', 'recall_at_10', the same with '_<domain>', 'queries[_<domain>]' and
  'corpus_size'."""

  tasks = ("retrieval",)

  def __call__(self, ctx):
    return corpus_retrieval(ctx.exp, ctx.state)
