"""EllieSQL: complexity-aware routing between text-to-SQL pipelines of increasing cost (HKUSTDial/EllieSQL;
`papers.md` C4).

EllieSQL sends each question to the cheapest of three pipelines that can answer it (basic, intermediate, advanced);
a router trained on labels "the cheapest pipeline whose SQL executes to the gold result" (`cheapest_sufficient`)
decides before generation. The zoo's pipelines are made of the zoo's own SQL LMs (`configs/sql_lm.py`) on the
`text_to_sql` questions (`zoo.data.text_to_sql`) [guess: the authors' pipelines are GPT-4o-mini prompts with schema
linking, divide-and-conquer and online-synthesis generators, and a refiner]:

- `basic`: the small SQL LM, one greedy decode.
- `intermediate`: the medium SQL LM, one greedy decode; while its SQL fails to run, up to `retries` = 2 more decodes
  sampled at temperature 0.7 (a stand-in for the authors' refiner, which repairs SQL from execution feedback).
- `advanced`: the medium SQL LM, the greedy decode and 7 samples at temperature 0.7; among the candidates that run,
  the majority answer by execution result wins (self-consistency, as the authors' advanced pipeline selects among
  generated candidates).

Every pipeline first links the question's values (`zoo.data.text_to_sql.link_values`, the stand-in for the authors'
value retrieval); the LMs write SQL with them as parameters ?1, ?2, ..., bound when the SQL runs.

Cost: the tokens every LM call reads and writes (prompt + generated up to EOS; each call re-reads the prompt, as an
API bills it), and FLOPs = tokens x the member's forward FLOPs per token. Quality: execution match (0/1). Confidence
(for confidence cascades): the mean probability of the generated tokens of the kept SQL.

Routers: EllieSQL's `rule`, `label_knn` (k = 5), `classifier`, `binary_cascade`, `pairwise` live in
`zoo.routing.model_routers`; the DPO-trained LM router is `DpoLmRouter` here (registered 'dpo_lm'). Token Elasticity of
Performance (`tep`): the relative accuracy gained per relative token spent against the basic pipeline [guess: the
formula of `papers.md` C4].
"""

from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar

import numpy as np

from zoo.data.text_to_sql import SQL_MAX_CHARS, link_values, prompt_text, run_sql
from zoo.data.tokenizer import ByteTokenizer
from zoo.registry import ConfigError
from zoo.routing.model_routers import (
  Decision,
  ModelRouter,
  RoutingData,
  cheapest_sufficient,
  label_preference_pairs,
  one_member,
  register_model_router,
)

EOS = ByteTokenizer.eos_id


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """One text-to-SQL pipeline: `member` (the SQL LM it calls, 'small' or 'medium'), `samples` (candidates: the first
  greedy, the rest sampled at `temperature`, majority-voted by execution result), `retries` (extra samples drawn while
  the kept SQL fails to run)."""

  name: str
  member: str
  samples: int = 1
  retries: int = 0
  temperature: float = 0.7


PIPELINES = (
  Pipeline("basic", "small"),
  Pipeline("intermediate", "medium", retries=2),
  Pipeline("advanced", "medium", samples=8),
)


@dataclasses.dataclass(frozen=True)
class PipelineResult:
  """A pipeline's answers to Q questions: `sql` (Q strings, with parameters), `correct` bool [Q], `tokens` int [Q]
  (read + written over its LM calls), `calls` int [Q], `confidence` float [Q]."""

  sql: tuple[str, ...]
  correct: np.ndarray
  tokens: np.ndarray
  calls: np.ndarray
  confidence: np.ndarray


def prompt_tokens(questions, text=prompt_text):
  """int32 [Q, P]: BOS + the bytes of `text(question)` (no EOS); one length for every question."""
  tokenizer = ByteTokenizer()
  rows = [tokenizer.encode(text(q), add_eos=False) for q in questions]
  if len({len(r) for r in rows}) != 1:
    raise ValueError("prompt_tokens: the prompts differ in length; pad the questions to one width")
  return np.stack(rows).astype(np.int32)


def decode_sql(model, variables, prompts, *, temperature, seed, batch_size=256):
  """Decodes one SQL per prompt row.

  Args:
    model, variables: a SQL LM (LM-task zoo model).
    prompts: int32 [Q, P] (`prompt_tokens`).
    temperature: 0 = greedy.
    seed: the sampling seed.
    batch_size: rows decoded together.

  Returns:
    (sql: list of Q strings, generated: int [Q] tokens written including EOS, confidence: float [Q] the mean
    probability of the written tokens).
  """
  import jax

  from zoo.routing.r2r import sampled_responses

  tokenizer, sql, generated, confidence = ByteTokenizer(), [], [], []
  response_len = SQL_MAX_CHARS + 1
  for start in range(0, len(prompts), batch_size):
    chunk = np.asarray(prompts[start : start + batch_size])
    pad = batch_size - len(chunk) if len(prompts) > batch_size else 0  # one compiled shape per call site
    rows = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)]) if pad else chunk
    rng = jax.random.fold_in(jax.random.key(seed), start)
    tokens, probs = sampled_responses(model, variables, rows, response_len, temperature=temperature, rng=rng)
    tokens, probs = np.asarray(tokens)[: len(chunk), chunk.shape[1] :], np.asarray(probs)[: len(chunk)]
    for row, p in zip(tokens, probs):
      ends = np.flatnonzero(row == EOS)
      n = int(ends[0]) + 1 if len(ends) else response_len
      sql.append(tokenizer.decode(row[: n - 1] if len(ends) else row))
      generated.append(n)
      confidence.append(float(np.mean(p[:n])))
  return sql, np.asarray(generated), np.asarray(confidence)


def vote(connection, candidates, params=()):
  """Index of the kept candidate: the first of the largest group of candidates that run (with `params`) and return
  the same rows (groups ordered by their first member); 0 when none runs."""
  groups = collections.OrderedDict()
  for i, sql in enumerate(candidates):
    rows = run_sql(connection, sql, params)
    if rows is not None:
      groups.setdefault(rows, []).append(i)
  if not groups:
    return 0
  return max(groups.values(), key=len)[0]  # max keeps the first of equal sizes


def run_pipeline(pipeline, models, questions, gold_sql, connection, *, seed=0, batch_size=256):
  """Runs `pipeline` on every question.

  Args:
    pipeline: a `Pipeline`.
    models: {'small' | 'medium': (model, variables)}.
    questions, gold_sql: Q strings each.
    connection: the database (`zoo.data.text_to_sql.build_database`).
    seed: the sampling seed.

  Returns:
    PipelineResult.
  """
  if pipeline.member not in models:
    raise ConfigError(f"pipeline {pipeline.name!r} calls member {pipeline.member!r}; allowed: {sorted(models)}")
  model, variables = models[pipeline.member]
  prompts = prompt_tokens(questions)
  values = [link_values(q) for q in questions]
  prompt_len = prompts.shape[1]
  decode = lambda rows, temperature, s: decode_sql(
    model, variables, prompts[rows], temperature=temperature, seed=s, batch_size=batch_size
  )
  q = len(questions)
  everyone = np.arange(q)
  candidates = [[] for _ in range(q)]
  confidences = [[] for _ in range(q)]
  tokens, calls = np.zeros(q, np.int64), np.zeros(q, np.int64)

  def add(rows, sql, generated, confidence):
    for r, s, g, c in zip(rows, sql, generated, confidence):
      candidates[r].append(s)
      confidences[r].append(c)
      tokens[r] += prompt_len + g
      calls[r] += 1

  add(everyone, *decode(everyone, 0.0, seed))
  for k in range(1, pipeline.samples):
    add(everyone, *decode(everyone, pipeline.temperature, seed * 1000 + k))
  for k in range(pipeline.retries):
    failing = [r for r in everyone if run_sql(connection, candidates[r][-1], values[r]) is None]
    failing = np.asarray(failing, np.int64)
    if not len(failing):
      break
    add(failing, *decode(failing, pipeline.temperature, seed * 1000 + 100 + k))
  kept = [vote(connection, c, v) if pipeline.samples > 1 else len(c) - 1 for c, v in zip(candidates, values)]
  sql = tuple(c[i] for c, i in zip(candidates, kept))
  return PipelineResult(
    sql=sql,
    correct=np.asarray([run_sql(connection, s, v) == run_sql(connection, g) for s, v, g in zip(sql, values, gold_sql)]),
    tokens=tokens,
    calls=calls,
    confidence=np.asarray([c[i] for c, i in zip(confidences, kept)], np.float64),
  )


def question_features(model, variables, prompts, *, batch_size=256):
  """float32 [Q, D]: the LM's mean final-norm hidden state over each prompt (the routers' question embedding; the
  authors embed with RoBERTa or Qwen2.5-0.5B [guess: the zoo's small SQL LM is the encoder])."""
  import jax

  from zoo.routing.r2r import lm_forward

  fn = jax.jit(lambda v, t: lm_forward(model, v, t)[1].mean(axis=1))
  return np.concatenate(
    [np.asarray(fn(variables, prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)]
  )


def tep(accuracy, tokens, reference_accuracy, reference_tokens):
  """Token Elasticity of Performance: (relative accuracy change) / (relative token change) against a reference (the
  basic pipeline) [guess: `papers.md` C4]; nan when the tokens equal the reference's or its accuracy is 0."""
  d_tokens = (tokens - reference_tokens) / reference_tokens
  if abs(d_tokens) < 1e-12 or reference_accuracy <= 0:
    return float("nan")
  return float(((accuracy - reference_accuracy) / reference_accuracy) / d_tokens)


def dpo_pairs(label, num_members):
  """EllieSQL's DPO preference pairs (chosen, rejected) for one label (`src/dpo/generate_dpo_pairs.py`): the pairwise
  router's pairs (`label_preference_pairs`: the label beats every other member, a member above the label beats one
  below it) and, for label 0, the cheaper of two costlier members beats the other; for three members: 0: (0,1) (0,2)
  (1,2); 1: (1,2) (1,0) (2,0); 2: (2,0) (2,1) [general M: guess]."""
  prefer = label_preference_pairs(num_members)[label]
  if label == 0:
    a, b = np.meshgrid(np.arange(num_members), np.arange(num_members), indexing="ij")
    prefer = prefer | ((a > 0) & (b > a))
  return [(int(a), int(b)) for a, b in zip(*np.nonzero(prefer))]


@register_model_router("dpo_lm")
@dataclasses.dataclass
class DpoLmRouter(ModelRouter):
  """EllieSQL's DPO-trained LM router (`src/dpo/`): an LM reads the question and writes the label of the pipeline
  ('0', '1', '2' ... one byte each). It is first fine-tuned on the labels (SFT, cross-entropy on the label token), then
  trained with DPO (Rafailov et al. 2023, eq. 7; beta = 0.1 as the authors') on `dpo_pairs`, with the SFT model as the
  reference. Routing takes the label token of highest probability (decoding constrained to the labels [guess]).

  The zoo starts from the small SQL LM (`model`, `variables`; the authors start from Qwen2.5-0.5B) and reads the
  queries' `RoutingData.tokens` (its prompts). Its prompt pass is the routing cost (`uses_features`: the features'
  cost is the same pass). Steps, batch and learning rate [guess: sized for a CPU; the authors use lr 1e-6 for 12
  epochs on a 0.5B model].
  """

  family: ClassVar[str] = "generative"
  knob_name: ClassVar[str] = "threshold"
  model: object = None
  variables: dict | None = None
  sft_steps: int = 150
  dpo_steps: int = 150
  batch_size: int = 32
  lr: float = 1e-3
  beta: float = 0.1

  def knobs(self):
    return np.array([0.5])

  def _label_ids(self, num_members):
    return np.asarray([ByteTokenizer().encode(str(m), add_bos=False, add_eos=False)[0] for m in range(num_members)])

  def _log_probs(self, params, tokens):
    """float [B, M]: log-probability of each label token after the prompt."""
    import jax

    logits = self.model.apply({**self.variables, "params": params}, tokens)[0][:, -1].astype("float32")
    return jax.nn.log_softmax(logits, axis=-1)[:, self._ids]

  def fit(self, train, seed=0):
    import jax
    import jax.numpy as jnp
    import optax

    if self.model is None or train.tokens is None:
      raise ConfigError("dpo_lm router needs model=, variables= and RoutingData.tokens (the question prompts)")
    if min(self.sft_steps, self.dpo_steps) < 0 or self.batch_size < 1 or self.lr <= 0:
      raise ConfigError(
        f"dpo_lm: sft_steps={self.sft_steps}, dpo_steps={self.dpo_steps} must be >= 0, batch_size={self.batch_size} "
        f">= 1 and lr={self.lr} > 0"
      )
    m = len(train.members)
    self._ids = jnp.asarray(self._label_ids(m))
    labels = cheapest_sufficient(train.quality)
    tokens = jnp.asarray(train.tokens, jnp.int32)
    rng = np.random.default_rng(seed)
    optimizer = optax.adamw(self.lr, weight_decay=0.0)

    def train_loop(params, loss_fn, steps, rows_of):
      state, loss = optimizer.init(params), float("nan")

      @jax.jit
      def step(params, state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

      for _ in range(steps):
        params, state, loss = step(params, state, *rows_of())
      return params, float(loss)

    def sft_loss(params, rows, y):
      return -jnp.mean(jnp.take_along_axis(self._log_probs(params, tokens[rows]), y[:, None], axis=1))

    def sft_batch():
      rows = rng.integers(0, len(labels), self.batch_size)
      return jnp.asarray(rows), jnp.asarray(labels[rows])

    params, self.sft_loss_ = train_loop(self.variables["params"], sft_loss, self.sft_steps, sft_batch)
    reference = params
    pairs = np.asarray([(q, c, r) for q in range(len(labels)) for c, r in dpo_pairs(int(labels[q]), m)], np.int32)

    def dpo_loss(params, rows, chosen, rejected):
      logp = self._log_probs(params, tokens[rows])
      ref = jax.lax.stop_gradient(self._log_probs(reference, tokens[rows]))
      pick = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]
      margin = (pick(logp, chosen) - pick(ref, chosen)) - (pick(logp, rejected) - pick(ref, rejected))
      return -jnp.mean(jax.nn.log_sigmoid(self.beta * margin))

    def dpo_batch():
      p = pairs[rng.integers(0, len(pairs), self.batch_size)]
      return jnp.asarray(p[:, 0]), jnp.asarray(p[:, 1]), jnp.asarray(p[:, 2])

    self._params, self.dpo_loss_ = train_loop(params, dpo_loss, self.dpo_steps, dpo_batch)
    self._predict = jax.jit(lambda p, t: self._log_probs(p, t))
    return self

  def label_log_probs(self, data):
    """float [Q, M]: the trained router's log-probability of each label."""
    if data.tokens is None:
      raise ConfigError("dpo_lm router needs RoutingData.tokens (the question prompts) to route")
    return np.concatenate(
      [np.asarray(self._predict(self._params, data.tokens[i : i + 256])) for i in range(0, len(data), 256)]
    )

  def route(self, data, knob):
    del knob
    choice = np.argmax(self.label_log_probs(data), axis=1)  # argmax keeps the first (cheaper) of ties
    return Decision(choice, one_member(choice, len(data.members)), uses_features=True)


def routing_data(results, pipelines, *, features, feature_tokens, flops_per_token, levels, level_names, complexity,
                 router_tokens=None):  # fmt: skip
  """The `RoutingData` of the pipelines' results (cost in tokens) and the same in FLOPs.

  Args:
    results: {pipeline name: PipelineResult}, every pipeline run on the same Q questions.
    pipelines: the `Pipeline`s in increasing cost.
    features: float [Q, F] (`question_features`).
    feature_tokens: int [Q], the tokens the features read (charged to feature-using routers).
    flops_per_token: {member: forward FLOPs per token}; the features are read by the 'small' member.
    levels: int [Q] (the questions' level); level_names: their names.
    complexity: float [Q] (`zoo.data.text_to_sql.tables_mentioned`).
    router_tokens: int [Q, P] prompts of an LM router (DpoLmRouter), or None.

  Returns:
    (data with cost in tokens, data with cost in FLOPs).
  """
  names = [p.name for p in pipelines]
  quality = np.stack([results[n].correct.astype(np.float64) for n in names], axis=1)
  tokens = np.stack([results[n].tokens.astype(np.float64) for n in names], axis=1)
  data = RoutingData(
    quality=quality,
    cost=tokens,
    features=np.asarray(features, np.float32),
    feature_cost=np.asarray(feature_tokens, np.float64),
    confidence=np.stack([results[n].confidence for n in names], axis=1),
    category=np.asarray(levels, np.int64),
    members=tuple(names),
    categories=tuple(level_names),
    complexity=np.asarray(complexity, np.float64),
    tokens=router_tokens,
  )
  flops = tokens * np.asarray([flops_per_token[p.member] for p in pipelines])[None, :]
  return data, data.with_cost(flops, np.asarray(feature_tokens, np.float64) * flops_per_token["small"])
