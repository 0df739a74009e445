"""RouterRetriever (Lee et al. 2024, papers.md B4): route every query and document to one per-domain LoRA expert of a
frozen embedding model by its base embedding's mean similarity to each expert's pilot embeddings, then embed it with
base + that expert; scored by corpus-level retrieval (`zoo.evaluators.retrieval`) against the baselines.

- Experts: `config.router_retriever.expert_runs`, zoo runs of the same embedding model, each a LoRA (`config.lora`)
  trained from the evaluated run (the base) on its own domains (`config.data.domains` of that run).
- Pilots (paper sec. 3, "pilot embedding library"): each training query (up to `max_train_pairs` of the training
  split) goes to the expert that ranks its document best among those training documents (ties: its own domain's
  expert); an expert's pilots are the base embeddings of its queries. Routing takes the expert with the highest mean
  similarity `mean_j <e(x), p_ej>` (= the similarity to the pilots' mean: the paper's k-means of the pilots does not
  change a size-weighted mean, so none is run [guess]).
- Documents are routed as queries are, each on its own [guess: the paper routes instances; one index per expert is
  not built].

Keys (each with the `retrieval_metrics` suffixes): `rr_base_*` (the base alone), `rr_routed_*` (RouterRetriever),
`rr_oracle_*` (each query and document with the expert of its own domain), and `rr_routing_accuracy` (the routed
expert is the oracle's, over queries and documents), `rr_pilots_<e>` (pilots per expert).

Options (`config.router_retriever`): `expert_runs` (workdirs, one per expert), `max_train_pairs` (2048).
"""

import os

import numpy as np

from zoo.evaluators.base import Evaluator, register_evaluator
from zoo.evaluators.retrieval import corpus_ranks, embed_split, retrieval_metrics
from zoo.models import ConfigError

DEFAULTS = {"expert_runs": (), "max_train_pairs": 2048}


def options(config):
  """`config.router_retriever` over `DEFAULTS`, checked."""
  given = dict(config.get("router_retriever") or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"unknown key config.router_retriever.{unknown[0]}; valid keys: {sorted(DEFAULTS)}")
  o = {**DEFAULTS, **given}
  o["expert_runs"] = tuple(o["expert_runs"])
  if len(o["expert_runs"]) < 2:
    raise ConfigError(
      f"config.router_retriever.expert_runs has {len(o['expert_runs'])} runs; allowed: two or more LoRA runs, one per "
      "domain, trained from the evaluated run"
    )
  if not isinstance(o["max_train_pairs"], int) or o["max_train_pairs"] < 1:
    raise ConfigError(f"config.router_retriever.max_train_pairs={o['max_train_pairs']!r} is invalid; allowed: >= 1")
  return o


def route(embeddings, pilots):
  """embeddings [N, D], pilots: E arrays [P_e, D] -> [N] int, the expert of highest mean similarity."""
  means = np.stack([p.mean(axis=0) if len(p) else np.zeros(embeddings.shape[1]) for p in pilots])
  scores = np.where([len(p) > 0 for p in pilots], embeddings @ means.T, -np.inf)  # an expert without pilots: never
  return np.argmax(scores, axis=1)


def assign_pilots(query_embeddings, document_embeddings, own_expert):
  """Each training query's best expert: the one ranking its own document best among the training documents.

  Args:
    query_embeddings, document_embeddings: E arrays [N, D] (row i of each is pair i) under each expert.
    own_expert: [N] int, the expert of each pair's domain (wins ties; -1: none, then the lowest index).

  Returns:
    [N] int expert per query.
  """
  ranks = np.stack([corpus_ranks(q, d) for q, d in zip(query_embeddings, document_embeddings)], axis=1)  # [N, E]
  best = ranks.min(axis=1, keepdims=True)
  own = np.asarray(own_expert)
  own_best = (own >= 0) & (ranks[np.arange(len(own)), np.maximum(own, 0)] == best[:, 0])
  return np.where(own_best, own, np.argmax(ranks == best, axis=1))


def _pick(per_expert, chosen):
  """per_expert: E arrays [N, D]; chosen [N] -> [N, D], row i from expert chosen[i]."""
  stacked = np.stack(per_expert)
  return stacked[np.asarray(chosen), np.arange(stacked.shape[1])]


def _expert_experiment(exp, run):
  """The Experiment of expert `run` (its model, adapters and task) reading the evaluated config's data."""
  from zoo.engine import trainer, writers  # pylint: disable=g-import-not-at-top

  config = writers.read_config(run)
  if config.get("lora", {}).get("r", 0) == 0:
    raise ConfigError(f"config.router_retriever.expert_runs: {run} has no LoRA adapters (its config.lora.r is 0)")
  domains = tuple(config.data.domains)
  config.data = exp.config.data
  config.init_from = ""
  return trainer.Experiment(config, exp.mesh.devices.reshape(-1).tolist()), domains


@register_evaluator("router_retriever")
class RouterRetriever(Evaluator):
  """See the module docstring."""

  tasks = ("retrieval",)
  by_default = False  # needs expert runs

  def __call__(self, ctx):
    from zoo.engine import trainer  # pylint: disable=g-import-not-at-top

    o = options(ctx.config)
    exp, names = ctx.exp, tuple(ctx.exp.info.get("domains", ()))
    train_split = ctx.config.data.train_split
    base_q, base_d, domains = embed_split(exp, ctx.state)
    base_tq, base_td, train_domains = embed_split(exp, ctx.state, train_split, o["max_train_pairs"])
    expert_of_domain = np.full(max(len(names), 1), -1)
    q_e, d_e, tq_e, td_e = [], [], [], []
    for e, run in enumerate(o["expert_runs"]):
      if not os.path.isdir(run):
        raise ConfigError(f"config.router_retriever.expert_runs: no such run directory {run!r}")
      expert_exp, expert_domains = _expert_experiment(exp, run)
      for d in expert_domains:
        if d not in names:
          raise ConfigError(f"config.router_retriever.expert_runs: {run} was trained on domain {d!r}, not in {names}")
        expert_of_domain[names.index(d)] = e
      _, state, _ = trainer.restore_run(expert_exp, run)
      for (queries, documents), split, limit in ((q_e, d_e), None, None), ((tq_e, td_e), train_split, len(base_tq)):
        q, d, _ = embed_split(expert_exp, state, split, limit)
        queries.append(q)
        documents.append(d)
    owner = assign_pilots(tq_e, td_e, expert_of_domain[train_domains])
    pilots = [base_tq[owner == e] for e in range(len(q_e))]
    routed_q, routed_d = route(base_q, pilots), route(base_d, pilots)
    oracle = expert_of_domain[domains]
    fallback = lambda chosen: np.where(chosen >= 0, chosen, 0)
    results = {}
    for name, (q, d) in {
      "base": (base_q, base_d),
      "routed": (_pick(q_e, routed_q), _pick(d_e, routed_d)),
      "oracle": (_pick(q_e, fallback(oracle)), _pick(d_e, fallback(oracle))),
    }.items():
      metrics = retrieval_metrics(corpus_ranks(q, d), domains, names)
      results.update({f"rr_{name}_{k}": v for k, v in metrics.items()})
    results["rr_routing_accuracy"] = float(np.mean(np.concatenate([routed_q == oracle, routed_d == oracle])))
    results.update({f"rr_pilots_{e}": int(len(p)) for e, p in enumerate(pilots)})
    return results
