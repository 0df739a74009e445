"""Text retrieval: an embedding model trained contrastively on (query, relevant document) pairs.

Data format 'text_pairs' (`zoo.data`, e.g. the embedded 'stdlib_doc_code': a docstring and its function's code):
`query`, `document` int32 [B, T], `query_mask`, `document_mask` float32 [B, T] (1 on real tokens), `domain` int32
[B]; row i's document is the one relevant to row i's query.

Model: one encoder for both sides (a bi-encoder with shared weights, as Contriever and Sentence-BERT), called once
on the queries and documents interleaved, `model(tokens=[2B, T], mask=[2B, T]) -> (embeddings [2B, D],
ModelOutput)` (row 2i the query i, row 2i + 1 its document; e.g. `text_encoder` with num_classes=0, L2-normalised).
Interleaving (a [B, 2, T] stack reshaped) keeps each row's query and document on the device that holds the row,
so the data-parallel layout needs no exchange before the encoder.

Loss: InfoNCE with in-batch negatives (van den Oord et al. 2018; as DPR, Karpukhin et al. 2020, sec. 3.2): with
cosine similarities s_ij = <q_i, d_j> / (|q_i| |d_j|), the loss of query i is `-log softmax_j(s_ij / temperature)[i]`
over every document of the batch; `symmetric` adds the document -> query direction and averages the two (as CLIP).
The negatives are the whole global batch: inside the jitted train step (`zoo.engine.trainer.make_train_step`) a batch
entry is one global array of train.batch_size rows laid over the mesh's batch axes (data, fsdp, expert), so the
[B, B] similarity below is over the global batch and XLA gathers the document embeddings across devices (and hosts)
for it. With train.grad_accum_steps = k the step scores k micro-batches of B / k rows one after the other, and the
negatives are those of the micro-batch; under DiLoCo/FedAvg, those of a replica's batch. Padding rows (weight 0, in
the last evaluation batch) are neither scored nor negatives.

Metrics: loss and in-batch accuracy (the query's own document is the most similar of the batch). Corpus-level
ranking (nDCG@10, recall@k over the whole evaluation split) is the 'retrieval' evaluator's (`zoo.evaluators`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from zoo.models import ConfigError
from zoo.tasks.base import Task, register_task

# A finite stand-in for -inf on the masked (padding) columns: a padding row's own loss stays finite (it is then
# weighted by 0) and the masked entries get exactly zero gradient.
_MASKED = -1e9


def interleave(queries, documents):
  """queries, documents: [B, ...] -> [2B, ...], row 2i = queries[i], row 2i + 1 = documents[i]."""
  return jnp.stack([queries, documents], axis=1).reshape(-1, *queries.shape[1:])


def split_embeddings(embeddings):
  """embeddings: [2B, D] (interleaved, see `interleave`) -> (queries [B, D], documents [B, D]), L2-normalised in
  float32."""
  pairs = embeddings.astype(jnp.float32).reshape(-1, 2, embeddings.shape[-1])
  pairs = pairs / jnp.maximum(jnp.linalg.norm(pairs, axis=-1, keepdims=True), 1e-6)
  return pairs[:, 0], pairs[:, 1]


def info_nce(queries, documents, weight, temperature, symmetric=False):
  """InfoNCE with in-batch negatives (see the module docstring).

  Args:
    queries: [B, D] float32, documents: [B, D] float32 (document i is the positive of query i; both L2-normalised
      for cosine similarity).
    weight: [B] float32; rows of weight 0 are padding: not scored, not negatives.
    temperature: the softmax temperature (> 0).
    symmetric: also the document -> query loss, averaged with the query -> document one.

  Returns:
    (loss [B], correct [B]): each row's loss and whether its own document scores highest (query -> document).
  """
  logits = jnp.einsum("qd,kd->qk", queries, documents, preferred_element_type=jnp.float32) / temperature
  valid = weight > 0
  logits = jnp.where(valid[None, :], logits, _MASKED)  # padding documents are no negatives
  positive = jnp.diagonal(logits)
  loss = jax.nn.logsumexp(logits, axis=1) - positive
  if symmetric:
    by_document = jnp.where(valid[:, None], logits, _MASKED)  # padding queries are no negatives of a document
    loss = 0.5 * (loss + jax.nn.logsumexp(by_document, axis=0) - positive)
  correct = (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).astype(jnp.float32)
  return loss, correct


@register_task("retrieval")
@dataclasses.dataclass(frozen=True)
class Retrieval(Task):
  """Contrastive (InfoNCE) training of a bi-encoder on (query, document) pairs; reports loss and in-batch accuracy.

  Attributes:
    temperature: the softmax temperature of InfoNCE; 0.05 as SimCSE (Gao et al. 2021, sec. 3) and Contriever
      (Izacard et al. 2022) use.
    symmetric: add the document -> query direction (False: query -> document only, as DPR).
  """

  temperature: float = 0.05
  symmetric: bool = False

  formats = ("text_pairs",)
  default_evals = ("retrieval",)
  throughput_key = "pairs_per_sec"

  def __post_init__(self):
    if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or self.temperature <= 0:
      raise ConfigError(f"config.task_options.temperature={self.temperature!r}; allowed: a number > 0")
    if not isinstance(self.symmetric, bool):
      raise ConfigError(f"config.task_options.symmetric={self.symmetric!r}; allowed: True or False")

  def batch_spec(self, info, data_config, batch_size):
    shape = (batch_size, int(data_config.seq_len))
    tokens, mask = jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.float32)
    return {
      "query": tokens,
      "query_mask": mask,
      "document": tokens,
      "document_mask": mask,
      "domain": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
    }

  def prepare(self, batch, rngs):
    """-> ({'tokens': int32 [2B, T], 'mask': float32 [2B, T]} (queries and documents interleaved), {})."""
    tokens = interleave(batch["query"], batch["document"])
    mask = interleave(batch["query_mask"], batch["document_mask"])
    return {"tokens": tokens, "mask": mask}, {}

  def stats(self, outputs, targets, batch):
    """outputs: embeddings [2B, D] (interleaved) -> weighted sums of the loss and of in-batch hits."""
    queries, documents = split_embeddings(outputs)
    loss, correct = info_nce(queries, documents, batch["weight"], float(self.temperature), self.symmetric)
    weight = batch["weight"]
    return {"loss_sum": jnp.sum(loss * weight), "weight": jnp.sum(weight), "correct": jnp.sum(correct * weight)}

  def finalize(self, sums, info):
    n = max(float(sums["weight"]), 1e-9)
    return {"loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n}
